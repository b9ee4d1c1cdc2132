"""Analytic training FLOPs per token and the per-device peak they are measured against (MFU).

Counted: every matmul (2 FLOPs per multiply-add) in q/k/v/o, the MLP and the output logits, plus
the attention score and value products (QK^T and PV) with causal attention counted as half. Not
counted: the embedding lookup, norms, softmax. Training = forward + backward = 3 x forward.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# bf16 dense peak TFLOP/s per chip, from the vendors' spec sheets.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
}


def matmul_params(m) -> int:
  """Parameters that take part in a matmul for every token (m = config.model)."""
  hd = m.head_dim or m.d_model // m.num_heads
  attn = m.d_model * hd * (2 * m.num_heads + 2 * m.num_kv_heads)
  mlp = m.d_model * m.mlp_dim * (2 if m.mlp_kind == "gelu" else 3)
  return m.num_layers * (attn + mlp) + m.d_model * m.vocab_size  # + the output logits


def train_flops_per_token(m, seq_len: int) -> float:
  hd = m.head_dim or m.d_model // m.num_heads
  context = min(seq_len, m.sliding_window) if m.sliding_window else seq_len
  # QK^T and PV: 2 products x 2 FLOPs x context x heads x head_dim; causal halves the context.
  attention = m.num_layers * 2 * 2 * m.num_heads * hd * context * 0.5
  return 3 * (2 * matmul_params(m) + attention)


def _measured_cpu_tflops(dot_dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """XLA's matmul rate on this host for the model's matmul dtype (float32 accumulation): the
  practical roof for CPU training."""
  a = jnp.ones((n, n), dot_dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def peak_tflops_per_device(override: float = 0.0, dot_dtype: str = "float32") -> float:
  """train.peak_tflops if set; else the table entry for this device kind (dense bf16); else a CPU
  measurement in `dot_dtype`."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS.items():
    if kind.startswith(name):
      return tflops
  return _measured_cpu_tflops(dot_dtype)
