"""The default job: a small Llama-style model on the embedded Shakespeare corpus, sized for a CPU.

python -m jaxlm.train --config=configs/shakespeare.py

4.5M parameters (d_model 256, 4 layers, 4 heads, SwiGLU 768, vocab 4096, tied embeddings), rows of
256 tokens. On 2 CPU cores it runs about 10 minutes: ~1.8M tokens, about 1.2 passes over the 35
training plays. Small batches: at this budget more, noisier updates learn faster per token than
fewer large ones.
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.model.matmul_dtype = "bfloat16"  # bf16 operands, float32 accumulation: ~2x XLA:CPU matmul rate
  c.model.scan_layers = False  # 4 layers compile fast unrolled, and run ~5% faster on CPU
  c.model.attention_blocks = 4  # skip the key blocks the causal mask hides
  c.train.batch_size = 8  # 2,048 tokens per update
  c.train.steps = 900
  c.train.warmup_steps = 50
  c.train.learning_rate = 3e-3
  c.train.log_every = 25
  c.train.workdir = "runs/shakespeare"
  return c
