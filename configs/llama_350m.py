"""A ~350M-parameter Llama-style model (GPT-2-medium-sized): 350.4M parameters.

Our own shape: d_model 1024, 24 layers, 16 heads of 64 (MHA), SwiGLU 2688 (about 8/3 x 1024, a
multiple of 128), GPT-2's vocabulary padded to 50304, context 2048, tied embeddings, RMSNorm, RoPE.

Where it runs: a TPU v5e-16 slice (v5litepod-16: 16 chips, 4 hosts), pure data parallel; global batch
256 rows x 2048 tokens = 0.5M tokens a step. On GPUs: 1 node of 8 H100.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5e-16"
MESH = dict(data=-1, fsdp=1, tensor=1, sequence=1, stage=1)
GPU_NODES = 1  # x 8 H100
PUBLISHED_PARAMS = 350.4e6  # our stated count


def get_config():
  return pretrain_config(
      name="llama_350m", mesh=MESH,
      vocab_size=50304, d_model=1024, num_layers=24, num_heads=16, num_kv_heads=16, mlp_dim=2688,
      max_seq_len=2048, tie_embeddings=True,
      remat_policy="none",  # fits without recomputation at 16 rows a chip
      loss_chunk=0,  # the logits fit; a chunked head's extra forward would add 4% to the FLOPs
      seq_len=2048, batch_size=256, steps=50_000, learning_rate=3e-4, warmup_steps=1000)
