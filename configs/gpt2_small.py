"""A GPT-2-small-sized Llama-style model: 124M parameters.

GPT-2 small's size (d_model 768, 12 layers, 12 heads of 64, its 50257-token vocabulary padded to
50304, a multiple of 128, context 1024, tied embeddings) in the Llama layout: RMSNorm, RoPE instead
of learned positions, SwiGLU 2048 (8/3 x 768, so the MLP has GPT-2's 4 x 768 x 768 x 2 weights
spread over 3 matrices), no biases. 123.6M parameters, our own shape; GPT-2 small is 124.4M.

Where it runs: a TPU v5e-8 slice (v5litepod-8: 8 chips, one host), pure data parallel; global batch
512 rows x 1024 tokens = 0.5M tokens a step (GPT-3 small's). On GPUs: 1 node of 8 H100.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5e-8"
MESH = dict(data=-1, fsdp=1, tensor=1, sequence=1, stage=1)
GPU_NODES = 1  # x 8 H100
PUBLISHED_PARAMS = 123.6e6  # our stated count (GPT-2 small itself: 124.4M)


def get_config():
  return pretrain_config(
      name="gpt2_small", mesh=MESH,
      vocab_size=50304, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=2048,
      max_seq_len=1024, tie_embeddings=True,
      remat_policy="none",  # activations of a 124M model fit without recomputation
      loss_chunk=0,  # the logits fit; a chunked head's extra forward would add 10% to the FLOPs
      seq_len=1024, batch_size=512, steps=20_000, learning_rate=6e-4, warmup_steps=700)
