"""Mixtral-8x7B with its published shapes: 46.7B parameters, 12.9B active per token.

Shapes (Mistral AI's config.json): vocab 32000, d_model 4096, 32 layers, 32 query and 8 KV heads
(head_dim 128), every layer a mixture of 8 SwiGLU experts of width 14336 with 2 per token (softmax
router, the two weights renormalized), RMSNorm eps 1e-5, RoPE theta 1e6, a 32K context, untied
embeddings, no sliding window. The counts are exact (tests/test_presets.py): 46,702,792,704
parameters, 12,879,925,248 active per token.

Where it runs: a TPU v5p-128 slice (64 chips), experts split over the `expert` axis (8 experts, 8
ways) and FSDP over the rest (fsdp 8); global batch 256 rows x 4096 tokens = 1M tokens a step in
2 accumulation steps. MaxText reports 54.9% MFU for it on v5p-128 (../shared/ANCHORS.md). Planned,
not yet measured: `python -m jaxlm.aot --config=configs/mixtral_8x7b.py --topology=v5p-128` gives
73.6 GB per chip of 95 (10.9 arguments, 62.6 temporaries); in one step (no accumulation) 110.5 GB,
which does not fit.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5p-128"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1, expert=8)
GPU_NODES = 8  # x 8 H100
PUBLISHED_PARAMS = 46.7e9
PUBLISHED_ACTIVE_PARAMS = 12.9e9


def get_config():
  c = pretrain_config(
      name="mixtral_8x7b", mesh=MESH, vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
      num_kv_heads=8, mlp_dim=14336, norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768,
      tie_embeddings=False, moe_num_experts=8, moe_experts_per_token=2, moe_router="softmax",
      moe_norm_topk=True,
      seq_len=4096, batch_size=256, steps=100_000, learning_rate=3e-4, warmup_steps=2000)
  c.train.grad_accum_steps = 2  # 4 rows a chip in one step need 110.5 GB of a v5p's 95
  return c
