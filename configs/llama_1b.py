"""A ~1B-parameter Llama-style model: 1.05B parameters.

Our own shape: d_model 2048, 20 layers, 16 query and 8 KV heads (GQA, head_dim 128), SwiGLU 5632
(2.75 x 2048, a multiple of 256), GPT-2's vocabulary padded to 50304, context 2048, tied
embeddings, RMSNorm, RoPE theta 10000.

Where it runs: a TPU v5p-16 slice (8 chips, 2 hosts), pure FSDP (float32 weights and Adam state:
17 GB, 2 GB a chip); global batch 256 rows x 2048 tokens = 0.5M tokens a step, dots-only remat. On
GPUs: 1 node of 8 H100.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5p-16"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1)
GPU_NODES = 1  # x 8 H100
PUBLISHED_PARAMS = 1.047e9  # our stated count


def get_config():
  return pretrain_config(
      name="llama_1b", mesh=MESH,
      vocab_size=50304, d_model=2048, num_layers=20, num_heads=16, num_kv_heads=8, mlp_dim=5632,
      max_seq_len=2048, tie_embeddings=True,
      remat_policy="dots_no_batch",  # keep the weight-side matmul outputs, recompute the rest
      seq_len=2048, batch_size=256, steps=50_000, learning_rate=3e-4, warmup_steps=1000)
