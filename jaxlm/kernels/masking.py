"""What every attention kernel computes alike: which (query, key) pairs are visible, and the scores.

The TPU kernels (flash_tpu.py), the GPU kernels (flash_gpu.py) and the XLA reference
(`jaxlm.models.attention`) must hide exactly the same pairs and cap scores the same way, so the
conditions are written once here. Positions and segment ids come in already broadcast to the tile
(the backends build them with different iota layouts).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

MASKED = -1e30  # score of a hidden key: finite, so m_prev - m_new never becomes inf - inf
EMPTY_LSE = 1e30  # lse of a fully masked row: exp(s - lse) = 0 for every key
LOG2E = math.log2(math.e)


def visible(spec, q_pos, k_pos, q_seg=None, k_seg=None):
  """Bool of visible pairs from broadcastable query/key positions and segment ids; None when the
  spec hides nothing (so a kernel can skip the select)."""
  conds = []
  if spec.kv_len % spec.block_k:  # the last key block reaches into the padding
    conds.append(k_pos < spec.kv_len)
  if spec.causal:
    conds.append(k_pos <= q_pos)
  if spec.window:
    conds.append(q_pos - k_pos < spec.window)
    if not spec.causal:
      conds.append(k_pos - q_pos < spec.window)
  if q_seg is not None:
    conds.append(q_seg == k_seg)
  if not conds:
    return None
  mask = conds[0]
  for c in conds[1:]:
    mask = mask & c
  return mask


def scores(spec, qk, log2: bool = False):
  """Raw float32 q.k -> scaled, soft-capped scores (times log2(e) when log2, for exp2 softmax),
  plus tanh of the capping (None without a cap) for its gradient: d(c tanh(x / c)) / dx = 1 - t^2."""
  unit = LOG2E if log2 else 1.0
  if not spec.softcap:
    return qk * (spec.scale * unit), None
  t = jnp.tanh(qk * (spec.scale / spec.softcap))
  return (spec.softcap * unit) * t, t
