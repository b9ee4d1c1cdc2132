"""The default job: a small Llama-style model on the embedded Shakespeare corpus, sized for a CPU.

python -m jaxlm.train --config=configs/shakespeare.py

4.5M parameters (d_model 256, 4 layers, 4 heads, SwiGLU 768, vocab 4096, tied embeddings), rows of
256 tokens, bf16 matmuls with float32 accumulation, activations and master weights. On 2 CPU cores
it trains about 11 minutes: ~2.9M tokens, about 1.9 passes over the 35 training plays, to ~1.92
validation bits per byte (1200 steps measured 1.937 and 1.946 from two inits: keep a margin). Small batches: at this budget more, noisier updates learn faster per
token than fewer large ones; lr 1.5e-3 beat 3e-3 and 5e-3 at this batch.
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.compute.matmul_dtype = "bfloat16"  # bf16 operands, float32 accumulation: ~2x XLA:CPU matmul rate
  c.compute.scan_layers = False  # 4 layers compile fast unrolled, and run ~5% faster on CPU
  c.compute.attention_blocks = 4  # skip the key blocks the causal mask hides
  c.train.batch_size = 8  # 2,048 tokens per update
  c.train.steps = 1400
  c.train.warmup_steps = 50
  c.train.learning_rate = 1.5e-3
  c.train.log_every = 25
  c.train.workdir = "runs/shakespeare"
  return c
