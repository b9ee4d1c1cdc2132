"""Attention through a kernel (compute.attention = flash | splash | cudnn) in training and prefill.

  flash   jaxlm's Pallas flash attention (jaxlm/kernels): the backend is compute.kernel_backend.
  splash  JAX's own TPU splash-attention kernel (jaxlm/kernels/splash.py).
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): GPU only.

Everything here sees self-attention over whole rows (the KV-cache decode path always uses the xla
reference). Under active axis rules a Pallas kernel runs inside shard_map, one program per device:
batch and heads are split as the rules say. With compute.sequence_shards > 1 (flash), each shard
keeps its own queries, which arrive in the balanced order of jaxlm/parallel/sequence.py, and
attends them to the whole row's keys: its share of the work, not the whole row's. With
compute.context_parallel="ring" (attention xla or flash) the keys are never gathered: ring
attention (jaxlm/models/ring_attention.py) passes them round the sequence axis instead.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.kernels.flash_attention import flash_attention
from jaxlm.models import ring_attention
from jaxlm.models.compute import Compute
from jaxlm.parallel import rules, sequence

log = logging.getLogger(__name__)


def _cudnn(q, k, v, segments, window: int):
  mask = None
  if segments is not None:
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]  # [batch, 1, t, t]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation="cudnn",
      local_window_size=(window - 1, 0) if window else None)


def _head_axes() -> tuple[str, str]:
  """Logical names for the heads dims inside shard_map: local query heads must map onto local KV
  heads by h // groups, so both are split alike or neither is."""
  if rules.mesh_axes("heads") != rules.mesh_axes("kv_heads"):
    log.warning("attention kernel: heads and kv_heads are sharded differently; it runs with heads "
                "replicated instead")
    return None, None
  return "heads", "kv_heads"


def self_attention(cfg, compute: Compute, q, k, v, segments, window: int):
  """q: [batch, t, heads, head_dim]; k, v: [batch, t, kv_heads, head_dim]; segments: [batch, t]|None.
  window: this layer's sliding window (0: none), static.

  Rows are in natural order unless compute.sequence_shards > 1 (then in sequence.balanced_order).
  Returns [batch, t, heads, head_dim].
  """
  head_dim = q.shape[-1]
  if cfg.query_pre_attn_scalar and cfg.query_pre_attn_scalar != head_dim:
    # the kernels scale scores by head_dim**-0.5: fold the rest of query_pre_attn_scalar**-0.5 into q
    q = q * jnp.asarray((head_dim / cfg.query_pre_attn_scalar) ** 0.5, q.dtype)
  if compute.attention == "cudnn":
    return _cudnn(q, k, v, segments, window)
  if segments is not None:
    segments = segments.astype(jnp.int32)
  heads, kv_heads = _head_axes()
  if compute.context_parallel == "ring" and compute.sequence_shards > 1:
    ring = ring_attention.Ring(
        axes=rules.mesh_axes("length"), shards=compute.sequence_shards, window=window,
        softcap=cfg.attn_logit_softcap, block=compute.attention, backend=compute.kernel_backend,
        block_q=compute.flash_block_q, block_k=compute.flash_block_k)
    return ring_attention.ring_attention(ring, q, k, v, segments, heads, kv_heads)
  if compute.attention == "splash":
    from jaxlm.kernels.splash import splash_attention  # pylint: disable=g-import-not-at-top

    def kernel(q, k, v, seg):
      return splash_attention(q, k, v, seg, causal=True, window=window,
                              softcap=cfg.attn_logit_softcap,
                              interpret=compute.kernel_backend == "interpret")
  else:
    def kernel(q, k, v, seg, k_seg=None, q_offset=None):
      return flash_attention(
          q, k, v, seg, seg if k_seg is None else k_seg, causal=True, window=window,
          softcap=cfg.attn_logit_softcap, block_q=compute.flash_block_q or None,
          block_k=compute.flash_block_k or None, backend=compute.kernel_backend, q_offset=q_offset)

  seg_names = None if segments is None else ("batch", None)
  if compute.sequence_shards == 1:
    fn = rules.shard_map(kernel, (("batch", None, heads, None), ("batch", None, kv_heads, None),
                                  ("batch", None, kv_heads, None), seg_names),
                         ("batch", None, heads, None))
    return fn(q, k, v, segments)
  return _balanced_flash(kernel, compute.sequence_shards, q, k, v, segments, heads, kv_heads)


def _balanced_flash(kernel, shards, q, k, v, segments, heads, kv_heads):
  """Flash attention with queries split along length in the balanced order (see module doc)."""
  t = q.shape[1]
  natural = np.argsort(sequence.balanced_order(t, shards))  # keys back to positions 0..t-1
  k, v = k[:, natural], v[:, natural]
  k_segments = None if segments is None else segments[:, natural]

  def local(q, k, v, q_seg, k_seg):  # q: [batch, t / shards, heads, head_dim], two chunks
    half = q.shape[1] // 2
    starts = sequence.chunk_starts(t, shards, rules.axis_position("length"))
    outs = []
    for i, start in enumerate(starts):
      rows = slice(i * half, (i + 1) * half)
      outs.append(kernel(q[:, rows], k, v, None if q_seg is None else q_seg[:, rows], k_seg,
                         q_offset=start))
    return jnp.concatenate(outs, axis=1)

  seg_q = None if segments is None else ("batch", "length")
  seg_k = None if segments is None else ("batch", None)
  fn = rules.shard_map(local, (("batch", "length", heads, None), ("batch", None, kv_heads, None),
                               ("batch", None, kv_heads, None), seg_q, seg_k),
                       ("batch", "length", heads, None))
  return fn(q, k, v, segments, k_segments)
