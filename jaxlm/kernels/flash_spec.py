"""What is static about one flash-attention call, and which blocks of one side a block of the other sees.

Shared by the TPU (flash_tpu.py) and GPU (flash_gpu.py) kernels, so both skip exactly the same
hidden blocks.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about one attention call; hashable, so it can be a nondiff argument."""
  causal: bool
  window: int  # 0: off; causal: q - k < window; non-causal: |q - k| < window
  softcap: float  # 0: off
  scale: float
  q_len: int  # real lengths; the arrays are padded to block multiples
  kv_len: int
  block_q: int
  block_k: int
  groups: int  # query heads per KV head
  segments: bool  # whether segment-id arrays are passed
  interpret: bool  # run under Pallas' interpreter (CPU)
  gpu: bool = False  # the Mosaic GPU kernels (flash_gpu.py) instead of the TPU ones


def kv_range(spec: Spec, qi):
  """First and last key block that query block qi can see (traced ints, inclusive)."""
  bq, bk = spec.block_q, spec.block_k
  nk = pl.cdiv(spec.kv_len, bk)
  lo, hi = 0, nk - 1
  q_first, q_last = qi * bq, qi * bq + bq - 1
  if spec.causal:
    hi = jnp.minimum(hi, q_last // bk)
  elif spec.window:
    hi = jnp.minimum(hi, (q_last + spec.window - 1) // bk)
  if spec.window:
    lo = jnp.maximum(q_first - spec.window + 1, 0) // bk
  return lo, hi


def q_range(spec: Spec, ki):
  """First and last query block that can see key block ki (traced ints, inclusive)."""
  bq, bk = spec.block_q, spec.block_k
  nq = pl.cdiv(spec.q_len, bq)
  lo, hi = 0, nq - 1
  k_first, k_last = ki * bk, ki * bk + bk - 1
  if spec.causal:
    lo = k_first // bq
  elif spec.window:
    lo = jnp.maximum(k_first - spec.window + 1, 0) // bq
  if spec.window:
    hi = jnp.minimum(hi, (k_last + spec.window - 1) // bq)
  return lo, hi
