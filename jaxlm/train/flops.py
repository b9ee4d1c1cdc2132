"""Analytic training FLOPs per token and the per-device peak they are measured against (MFU).

Counted: every matmul (2 FLOPs per multiply-add) in q/k/v/o (MLA: q_a, q_b or q, kv_a, kv_b, o),
the MLP and the output logits, plus the attention score and value products (QK^T and PV) with
causal attention counted as half (with a sliding window: the keys in the window; under
model.layer_pattern only its local layers have one). MLA is counted in the form training runs,
keys and values expanded per head: QK^T over nope + rope features, PV over v_head_dim. A
mixture-of-experts layer counts its active parameters: the router, the top-k routed experts and
the shared ones (not the experts a token skips; capacity-mode drops are not subtracted). Not counted: the embedding lookup, norms, softmax, the optimizer. Training = forward +
backward = 3 x forward. Recomputation (remat) is not counted either: these are model FLOPs, so MFU
does not reward recomputing.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxlm import chips
from jaxlm.config import layer_kinds, moe_layers


def attention_params(m) -> int:
  """One layer's attention projection weights (m = config.model)."""
  if m.attention_kind == "mla":
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank:
      q = m.d_model * m.q_lora_rank + m.q_lora_rank * m.num_heads * qk
    else:
      q = m.d_model * m.num_heads * qk
    kv = (m.d_model * (m.kv_lora_rank + m.qk_rope_head_dim)
          + m.kv_lora_rank * m.num_heads * (m.qk_nope_head_dim + m.v_head_dim))
    return q + kv + m.num_heads * m.v_head_dim * m.d_model
  hd = m.head_dim or m.d_model // m.num_heads
  return m.d_model * hd * (2 * m.num_heads + 2 * m.num_kv_heads)


def matmul_params(m) -> int:
  """Parameters that take part in a matmul for every token (m = config.model): with MoE layers,
  the active ones (router, moe_experts_per_token routed experts, shared experts)."""
  attn = attention_params(m)
  per_width = m.d_model * (2 if m.mlp_kind == "gelu" else 3)  # one MLP's params per hidden unit
  mlp = per_width * m.mlp_dim
  expert_dim = m.moe_mlp_dim or m.mlp_dim
  moe = (m.d_model * m.moe_num_experts  # the router
         + per_width * expert_dim * (m.moe_experts_per_token + m.moe_shared_experts))
  n_moe = sum(moe_layers(m))
  return (m.num_layers * attn + (m.num_layers - n_moe) * mlp + n_moe * moe
          + m.d_model * m.vocab_size)  # + the output logits


def attention_context(m, seq_len: int, causal: bool = True, window: int | None = None) -> float:
  """Keys each query attends to, averaged over a row of seq_len tokens.

  window: the layer's sliding window (default model.sliding_window; 0: none).

  causal: the causal mask counts as half the score matrix (seq_len / 2); with a sliding window w <
  seq_len the same convention gives w - w^2 / (2 seq_len): the first w queries see a half
  triangle, the rest w keys each.
  causal=False: every query meets every key of the row, window or not: the score matrix a dense
  masked attention computes, and what XLA's cost_analysis() counts for it.
  """
  w = m.sliding_window if window is None else window
  if not causal:
    return float(seq_len)
  if not w or w >= seq_len:
    return seq_len / 2
  return w - w * w / (2 * seq_len)


def train_flops_per_token(m, seq_len: int, causal: bool = True) -> float:
  """Model FLOPs of one training token (forward + backward) at rows of seq_len tokens."""
  if m.attention_kind == "mla":  # QK^T over nope + rope features, PV over v
    widths = m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim
  else:
    widths = 2 * (m.head_dim or m.d_model // m.num_heads)
  # QK^T and PV: 2 FLOPs x heads x (their widths) per key attended to.
  kinds = layer_kinds(m) or (True,) * m.num_layers  # model.layer_pattern's G layers have no window
  context = sum(attention_context(m, seq_len, causal, None if local else 0) for local in kinds)
  attention = 2 * m.num_heads * widths * context
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
  """train.peak_tflops if set; else jaxlm.chips' figure for this device kind (dense bf16); else a
  CPU measurement in `dot_dtype`."""
  if override:
    return override
  chip = chips.chip(jax.devices()[0].device_kind)
  return chip.peak_tflops if chip is not None else _measured_cpu_tflops(dot_dtype)
