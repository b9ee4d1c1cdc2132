"""What is static about one flash-attention call, and which blocks of one side a block of the other sees.

Shared by the TPU (flash_tpu.py) and GPU (flash_gpu.py) kernels, so both skip exactly the same
hidden blocks.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
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


def kv_range(spec: Spec, qi, q_offset=0):
  """First and last key block that query block qi can see (ints or traced, inclusive; lo > hi when
  none). Query row i is at position q_offset + i, key j at j."""
  bq, bk = spec.block_q, spec.block_k
  nk = pl.cdiv(spec.kv_len, bk)
  lo, hi = 0, nk - 1
  q_first = q_offset + qi * bq
  q_last = q_first + bq - 1
  if spec.causal:
    hi = jnp.minimum(hi, q_last // bk)
  elif spec.window:
    hi = jnp.minimum(hi, (q_last + spec.window - 1) // bk)
  if spec.window:
    lo = jnp.maximum(q_first - spec.window + 1, 0) // bk
  return lo, hi


def q_range(spec: Spec, ki, q_offset=0):
  """First and last query block that can see key block ki (ints or traced, inclusive; lo > hi when
  none); positions as in `kv_range`."""
  bq, bk = spec.block_q, spec.block_k
  nq = pl.cdiv(spec.q_len, bq)
  lo, hi = 0, nq - 1
  k_first = ki * bk - q_offset  # key positions relative to query row 0
  k_last = k_first + bk - 1
  if spec.causal:
    lo = jnp.maximum(k_first, 0) // bq
  elif spec.window:
    lo = jnp.maximum(k_first - spec.window + 1, 0) // bq
  if spec.window:
    hi = jnp.minimum(hi, (k_last + spec.window - 1) // bq)
  return lo, hi


def clamp_block(i, lo, hi, n: int):
  """Block index i moved into [lo, hi] and then into the array's n blocks: an index_map's answer for a
  hidden block, which then repeats a neighbour's index so the pipeline starts no DMA for it."""
  return jnp.clip(jnp.clip(i, lo, hi), 0, n - 1)


def visited_blocks(spec: Spec, q_offset: int = 0) -> int:
  """How many (query block, key block) pairs a kernel with this spec computes per (batch, head):
  the work of one call, e.g. of one sequence shard whose queries start at q_offset."""
  qi = np.arange(pl.cdiv(spec.q_len, spec.block_q))
  lo, hi = (np.broadcast_to(np.asarray(x), qi.shape) for x in kv_range(spec, qi, int(q_offset)))
  return int(np.sum(np.maximum(hi - lo + 1, 0)))
