"""The TPU flash kernels (flash_tpu.py; interpret mode on CPU) on one (query block, key block) pair of a
longer row, for ring attention (jaxlm/models/ring_attention.py).

`flash_attention` hides the row log-sum-exp inside its custom_vjp. Ring attention needs it out in
the open: each device attends its queries to one key/value block at a time and merges the partial
outputs by their lse, and its backward pass hands every block's kernel the whole row's output and
lse (so the recomputed probabilities are the final ones, not the block's own). So here:

  block_forward(...)   -> (o, lse) of the queries against this block alone
  block_backward(...)  -> (dq, dk, dv) of this block's share, given the row's final o and lse

Positions: query row i is at `offset + i` and key j at j, so a block pair from anywhere in the row
is described by one (possibly traced) offset: query chunk start - key chunk start. Layouts are the
model's ([batch, length, heads, head_dim]); lse is [batch, heads, length] float32, with rows that
see no key of the block at -1e30 (not the kernel's +1e30), so a merge gives them no weight.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.kernels import flash_tpu
from jaxlm.kernels.flash_attention import round_up, tpu_blocks, resolve_backend
from jaxlm.kernels.flash_spec import Spec
from jaxlm.kernels.masking import EMPTY_LSE

NO_KEYS = -1e30  # lse of a row that sees no key: exp(NO_KEYS - anything finite) = 0 in a merge


def _spec(q, k, segments: bool, window: int, softcap: float, block_q, block_k, backend: str):
  backend = resolve_backend(backend)
  if backend not in ("tpu", "interpret"):
    raise ValueError(f"ring attention runs jaxlm's TPU flash kernels (tpu or interpret), not {backend!r}")
  t, s, h, kvh, d = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
  bq, bk = tpu_blocks(backend, t, s, block_q, block_k)
  return Spec(causal=True, window=int(window), softcap=float(softcap), scale=float(d) ** -0.5,
              q_len=t, kv_len=s, block_q=bq, block_k=bk, groups=h // kvh, segments=segments,
              interpret=backend == "interpret")


def _head_major(x, length):  # [b, n, heads, d] -> [b, heads, padded n, d]
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _padded(spec: Spec, q_seg, k_seg, offset):
  tq, tk = round_up(spec.q_len, spec.block_q), round_up(spec.kv_len, spec.block_k)
  segs = []
  if spec.segments:
    segs = [jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, tq - spec.q_len)))[:, :, None],
            jnp.pad(k_seg.astype(jnp.int32), ((0, 0), (0, tk - spec.kv_len)))[:, None, :]]
  return tq, tk, segs, jnp.reshape(jnp.asarray(offset, jnp.int32), (1,))


def block_forward(q, k, v, q_seg, k_seg, offset, *, window: int = 0, softcap: float = 0.0,
                  block_q=None, block_k=None, backend: str = "auto"):
  """q: [batch, t, heads, d]; k, v: [batch, s, kv_heads, d]; segs [batch, t], [batch, s] or None.
  Returns o [batch, t, heads, d] in q's dtype and lse [batch, heads, t] float32 (module doc)."""
  spec = _spec(q, k, q_seg is not None, window, softcap, block_q, block_k, backend)
  tq, tk, segs, off = _padded(spec, q_seg, k_seg, offset)
  o, lse = flash_tpu.forward(spec, _head_major(q, tq), _head_major(k.astype(q.dtype), tk),
                             _head_major(v.astype(q.dtype), tk), off, *segs)
  lse = lse[:, :, :spec.q_len, 0]
  return jnp.swapaxes(o[:, :, :spec.q_len], 1, 2), jnp.where(lse >= EMPTY_LSE, NO_KEYS, lse)


def block_backward(q, k, v, o, lse, do, q_seg, k_seg, offset, *, window: int = 0,
                   softcap: float = 0.0, block_q=None, block_k=None, backend: str = "auto"):
  """This block pair's share of (dq, dk, dv), in q's and k's dtypes. o, do: [batch, t, heads, d]
  the row's final output and its cotangent; lse: [batch, heads, t] the row's final lse."""
  spec = _spec(q, k, q_seg is not None, window, softcap, block_q, block_k, backend)
  tq, tk, segs, off = _padded(spec, q_seg, k_seg, offset)
  lse = jnp.where(lse <= NO_KEYS / 2, EMPTY_LSE, lse)  # the kernels' convention: p = exp(s - lse) = 0
  lse = jnp.pad(lse, ((0, 0), (0, 0), (0, tq - spec.q_len)))[..., None]
  lse = jnp.broadcast_to(lse, lse.shape[:3] + (flash_tpu.LANES,))
  dt = q.dtype
  dq, dk, dv = flash_tpu.backward(
      spec, _head_major(q, tq), _head_major(k.astype(dt), tk), _head_major(v.astype(dt), tk),
      _head_major(o.astype(dt), tq), lse, _head_major(do.astype(dt), tq), off, *segs)
  return (jnp.swapaxes(dq[:, :, :spec.q_len], 1, 2), jnp.swapaxes(dk[:, :, :spec.kv_len], 1, 2),
          jnp.swapaxes(dv[:, :, :spec.kv_len], 1, 2))
