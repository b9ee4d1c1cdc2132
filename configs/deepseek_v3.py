"""DeepSeek-V3 with its published shapes: 671B parameters, 37B active per token.

Shapes (DeepSeek's config.json): vocab 129280, d_model 7168, 61 layers, 128 heads of multi-head
latent attention (q_lora_rank 1536, kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64,
v_head_dim 128), the first 3 layers dense SwiGLU of width 18432, the other 58 a mixture of 256
routed experts of width 2048 (8 per token, sigmoid scores with a bias for auxiliary-loss-free
balancing, 8 groups of which the best 4 are eligible, weights renormalized and scaled by 2.5) plus
one shared expert; RMSNorm eps 1e-6; RoPE theta 10000 with YaRN (factor 40 over a 4096 original
context, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1) for a 160K context; untied
embeddings. The multi-token prediction module (one more layer, 14B parameters; 685B in the
published checkpoint) is not built: the 671B are the main model's. The counts are exact
(tests/test_presets.py): 671,026,419,200 parameters, 37,552,297,472 active per token (8 of 256
routed experts, the shared one, attention, dense layers and embeddings).

Where it runs: a TPU v5p-1024 slice (512 chips), experts over a 64-way `expert` axis and FSDP
over the rest (DeepSeek trained on 2048 H800 with 64-way expert parallelism); global batch
1024 rows x 4096 tokens = 4M tokens a step. The expert-parallel all-to-all buffers hold 1.25x a
device's balanced share (model.moe_exchange_factor; the worst-case dropless buffers are 64x it,
~30 GB each at this size, and do not fit): with the bias-balanced router little overflows, and
moe/dropped counts what does. Planned with
`python -m jaxlm.aot --config=configs/deepseek_v3.py --topology=v5p-1024` (figure: README planner).
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5p-1024"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1, expert=64)
GPU_NODES = 256  # x 8 H100
PUBLISHED_PARAMS = 671e9
PUBLISHED_ACTIVE_PARAMS = 37e9


def get_config():
  return pretrain_config(
      name="deepseek_v3", mesh=MESH, vocab_size=129280, d_model=7168, num_layers=61,
      num_heads=128, num_kv_heads=128, mlp_dim=18432, norm_eps=1e-6, rope_theta=10000.0,
      rope_scaling="yarn", rope_scaling_factor=40.0, rope_original_max_len=4096,
      yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0,
      max_seq_len=163840, tie_embeddings=False,
      attention_kind="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
      qk_rope_head_dim=64, v_head_dim=128,
      moe_num_experts=256, moe_experts_per_token=8, moe_mlp_dim=2048, moe_shared_experts=1,
      moe_router="sigmoid", moe_norm_topk=True, moe_routed_scale=2.5, moe_groups=8,
      moe_topk_groups=4, moe_first_dense_layers=3, moe_exchange_factor=1.25,
      seq_len=4096, batch_size=1024, steps=100_000, learning_rate=2.2e-4, warmup_steps=2000)
