"""Qwen3-30B-A3B with its published shapes: 30.5B parameters, 3.3B active per token.

Shapes (Qwen's config.json): vocab 151936, d_model 2048, 48 layers, 32 query and 4 KV heads of
head_dim 128 with QK-norm, every layer a mixture of 128 SwiGLU experts of width 768 with 8 per
token (softmax router, the eight weights renormalized), no shared expert, RMSNorm eps 1e-6, RoPE
theta 1e6, a 40K context, untied embeddings. The counts are exact (tests/test_presets.py):
30,532,122,624 parameters, 3,353,032,704 active per token.

Where it runs: a TPU v5p-64 slice (32 chips), experts over an 8-way `expert` axis, FSDP over the
rest; global batch 256 rows x 4096 tokens = 1M tokens a step. Planned with
`python -m jaxlm.aot --config=configs/qwen3_30b_a3b.py --topology=v5p-64`, not yet measured.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5p-64"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1, expert=8)
GPU_NODES = 4  # x 8 H100
PUBLISHED_PARAMS = 30.5e9
PUBLISHED_ACTIVE_PARAMS = 3.3e9


def get_config():
  return pretrain_config(
      name="qwen3_30b_a3b", mesh=MESH, vocab_size=151936, d_model=2048, num_layers=48,
      num_heads=32, num_kv_heads=4, head_dim=128, qk_norm=True, mlp_dim=6144, norm_eps=1e-6,
      rope_theta=1e6, max_seq_len=40960, tie_embeddings=False, moe_num_experts=128,
      moe_experts_per_token=8, moe_mlp_dim=768, moe_router="softmax", moe_norm_topk=True,
      seq_len=4096, batch_size=256, steps=100_000, learning_rate=3e-4, warmup_steps=2000)
