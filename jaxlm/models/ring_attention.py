"""Ring attention: context parallelism in which keys and values travel, never gathered whole.

compute.context_parallel="ring" with the `length` axis split over n devices (mesh.sequence). Rows
arrive in the balanced order of jaxlm/parallel/sequence.py: the row is cut into 2n chunks and
device j holds chunks a = j and b = 2n - 1 - j, its queries and its own key/value block alike.
The key/value blocks (with their segment ids) go round the ring by `ppermute`, one hop per step,
so at step s device j holds the block of device i = (j - s) mod n, chunks c = i and d = 2n - 1 - i.
Which chunk pairs does causality leave visible?

  step 0 (own block)   a-a and b-b (the diagonal, causal), b-a (whole)
  step s > 0           b-c always (whole); a-d never; and exactly one of
                       a-c (whole, when i < j) or b-d (whole, when i > j)

so every device computes two chunk pairs at every step after the first, and no device waits on
another: the causal work is balanced at each step, not just in total. Each pair is one block
computation (queries at position offset + r, keys at m, offset = query chunk start - key chunk
start) returning its output and row log-sum-exp; partial outputs merge by the lse rule
o = sum_i o_i exp(lse_i - lse), lse = logaddexp_i(lse_i). Which of a-c or b-d runs is decided per
device by `lax.cond`, so the hidden pair costs nothing.

Overlap: in every step the ppermute that brings the next block depends only on the current block,
not on the step's computation, so XLA issues it asynchronously and the transfer runs while the
block is computed (the last step sends nothing).

Backward: a custom_vjp. The forward saves only its inputs, its output and the row lse (all
[local length]); the backward runs the ring again: blocks travel with their dK/dV accumulators,
each device adds its queries' share of the held block's dK/dV (computed from the row's final o and
lse, so probabilities are the final ones) and keeps dQ locally; after n hops every dK/dV is home.
Memory per device is linear in t / n in both passes: a few [t / n] blocks in flight, never the row.
(Differentiating the forward scan instead would save every received block, t per device.)

Block computation (`Ring.block`):
  xla    einsum scores of one chunk pair, [chunk, chunk] per head in float32: any platform.
  flash  jaxlm's TPU flash kernels (jaxlm/kernels/flash_block.py): Mosaic on TPU, interpret
         mode on CPU; memory linear in the chunk as well.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxlm.kernels import flash_block
from jaxlm.kernels.flash_block import NO_KEYS
from jaxlm.kernels.masking import EMPTY_LSE, MASKED
from jaxlm.parallel import rules


@dataclasses.dataclass(frozen=True)
class Ring:
  """Everything static about one ring attention call (hashable: a custom_vjp nondiff argument)."""
  axes: tuple  # the mesh axes `length` is split over, major first
  shards: int  # their total size, n
  window: int = 0  # sliding window (0: none)
  softcap: float = 0.0
  block: str = "xla"  # how one chunk pair is computed: xla | flash
  backend: str = "interpret"  # flash: tpu | interpret
  block_q: int = 0  # flash kernel blocks (0: the backend's default)
  block_k: int = 0


# ---------------------------------------------------------------------------------------------
# one chunk pair: q [b, t, heads, d] against k, v [b, s, kv_heads, d]; query row r at offset + r


def _xla_mask(ring: Ring, t: int, s: int, q_seg, k_seg, offset):
  """[b | 1, 1, 1, t, s] bool of visible pairs."""
  rel = offset + jnp.arange(t, dtype=jnp.int32)[:, None] - jnp.arange(s, dtype=jnp.int32)[None, :]
  mask = rel >= 0
  if ring.window:
    mask &= rel < ring.window
  mask = mask[None]
  if q_seg is not None:
    mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
  return mask[:, None, None]


def _xla_scores(ring: Ring, q5, k):
  """Scaled (soft-capped) float32 scores [b, kv_heads, groups, t, s], and tanh of the capping."""
  s = jnp.einsum("btkgd,bskd->bkgts", q5, k, preferred_element_type=jnp.float32)
  s = s * (q5.shape[-1] ** -0.5)
  if not ring.softcap:
    return s, None
  t = jnp.tanh(s / ring.softcap)
  return ring.softcap * t, t


def _grouped(x, kvh):  # [b, t, heads, d] -> [b, t, kv_heads, groups, d]
  b, t, h, d = x.shape
  return x.reshape(b, t, kvh, h // kvh, d)


def _xla_forward(ring: Ring, q, k, v, q_seg, k_seg, offset):
  b, t, h, _ = q.shape
  kvh = k.shape[2]
  s, _ = _xla_scores(ring, _grouped(q, kvh), k)
  mask = _xla_mask(ring, t, k.shape[1], q_seg, k_seg, offset)
  s = jnp.where(mask, s, MASKED)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1)  # [b, kv_heads, groups, t]
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = o / jnp.moveaxis(jnp.where(l > 0, l, 1.0), -1, 1)[..., None]
  lse = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), NO_KEYS)
  return o.reshape(b, t, h, v.shape[-1]), lse.reshape(b, h, t)


def _xla_backward(ring: Ring, q, k, v, o, lse, do, q_seg, k_seg, offset):
  b, t, h, d = q.shape
  kvh = k.shape[2]
  q5, do5, o5 = _grouped(q, kvh), _grouped(do, kvh), _grouped(o, kvh)
  s, tanh = _xla_scores(ring, q5, k)
  mask = _xla_mask(ring, t, k.shape[1], q_seg, k_seg, offset)
  lse = lse.reshape(b, kvh, h // kvh, t)
  lse = jnp.where(lse <= NO_KEYS / 2, EMPTY_LSE, lse)
  p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
  delta = jnp.moveaxis(jnp.sum(do5.astype(jnp.float32) * o5.astype(jnp.float32), -1), 1, -1)
  dp = jnp.einsum("btkgd,bskd->bkgts", do5, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta[..., None])
  if tanh is not None:
    ds = ds * (1.0 - tanh * tanh)  # d(c tanh(x / c)) / dx
  scale = d ** -0.5
  dq = jnp.einsum("bkgts,bskd->btkgd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bkgts,btkgd->bskd", ds.astype(q.dtype), q5, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(do.dtype), do5, preferred_element_type=jnp.float32)
  return dq.reshape(b, t, h, d) * scale, dk * scale, dv


def _kernel_args(ring: Ring):
  return dict(window=ring.window, softcap=ring.softcap, block_q=ring.block_q or None,
              block_k=ring.block_k or None, backend=ring.backend)


def pair_forward(ring: Ring, q, k, v, q_seg, k_seg, offset):
  """(o float32 [b, t, heads, d], lse [b, heads, t]) of queries q against one key/value chunk."""
  if ring.block == "flash":
    o, lse = flash_block.block_forward(q, k, v, q_seg, k_seg, offset, **_kernel_args(ring))
    return o.astype(jnp.float32), lse
  return _xla_forward(ring, q, k, v, q_seg, k_seg, offset)


def pair_backward(ring: Ring, q, k, v, o, lse, do, q_seg, k_seg, offset):
  """This pair's float32 share of (dq, dk, dv), given the row's final o, lse and d(o)."""
  if ring.block == "flash":
    grads = flash_block.block_backward(q, k, v, o, lse, do, q_seg, k_seg, offset, **_kernel_args(ring))
    return tuple(g.astype(jnp.float32) for g in grads)
  return _xla_backward(ring, q, k, v, o, lse, do, q_seg, k_seg, offset)


def merge(acc, new):
  """Two partial (o [b, t, heads, d], lse [b, heads, t]) of the same queries -> their union's."""
  (o1, l1), (o2, l2) = acc, new
  lse = jnp.logaddexp(l1, l2)

  def weight(l):  # [b, heads, t] -> [b, t, heads, 1]
    return jnp.swapaxes(jnp.exp(l - lse), 1, 2)[..., None]

  return o1 * weight(l1) + o2 * weight(l2), lse


# ---------------------------------------------------------------------------------------------
# the ring, per device (inside shard_map): q [b, 2C, heads, d], k, v [b, 2C, kv_heads, d], seg [b, 2C]


def _position(ring: Ring):
  index = jnp.zeros((), jnp.int32)
  for axis in ring.axes:
    index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
  return index


def _send(ring: Ring, tree):
  """Every array of tree to the next device on the ring (device j receives from j - 1)."""
  n = ring.shards
  perm = [(j, (j + 1) % n) for j in range(n)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axes, perm), tree)


def _chunks(x):  # [b, 2C, ...] -> (first chunk, second chunk); None stays None
  if x is None:
    return None, None
  c = x.shape[1] // 2
  return x[:, :c], x[:, c:]


def _forward(ring: Ring, q, k, v, seg):
  n, c = ring.shards, q.shape[1] // 2
  j = _position(ring)
  a, b = j, 2 * n - 1 - j  # this device's chunks: query and own key/value chunk indices
  qa, qb = _chunks(q)
  sa, sb = _chunks(seg)

  def pair(qi, blk, kvi, offset):
    (qx, sx) = (qa, sa) if qi == 0 else (qb, sb)
    ks, vs, kseg = blk
    return pair_forward(ring, qx, _chunks(ks)[kvi], _chunks(vs)[kvi], sx, _chunks(kseg)[kvi], offset)

  own = (k, v, seg)
  acc_a = pair(0, own, 0, 0)
  acc_b = merge(pair(1, own, 0, (b - a) * c), pair(1, own, 1, 0))

  def step(s, blk, accs):
    acc_a, acc_b = accs
    i = jnp.mod(j - s, n)  # whose block this is
    acc_b = merge(acc_b, pair(1, blk, 0, (b - i) * c))
    return jax.lax.cond(
        i < j,
        lambda: (merge(acc_a, pair(0, blk, 0, (j - i) * c)), acc_b),
        lambda: (acc_a, merge(acc_b, pair(1, blk, 1, (i - j) * c))))

  accs = (acc_a, acc_b)
  if n > 1:
    blk = _send(ring, own)

    def body(carry, s):
      blk, accs = carry
      nxt = _send(ring, blk)  # independent of this step's computation: overlaps it
      return (nxt, step(s, blk, accs)), None

    if n > 2:
      (blk, accs), _ = jax.lax.scan(body, (blk, accs), jnp.arange(1, n - 1, dtype=jnp.int32))
    accs = step(n - 1, blk, accs)
  (oa, la), (ob, lb) = accs
  return jnp.concatenate([oa, ob], axis=1).astype(q.dtype), jnp.concatenate([la, lb], axis=2)


def _backward(ring: Ring, q, k, v, seg, o, lse, do):
  n, c = ring.shards, q.shape[1] // 2
  j = _position(ring)
  a, b = j, 2 * n - 1 - j
  qs, ss, os_, dos = _chunks(q), _chunks(seg), _chunks(o), _chunks(do)
  ls = (lse[:, :, :c], lse[:, :, c:])

  def pair(qi, blk, kvi, offset):
    """(dq of query chunk qi, dk and dv of the held block's chunk kvi)."""
    ks, vs, kseg = blk
    return pair_backward(ring, qs[qi], _chunks(ks)[kvi], _chunks(vs)[kvi], os_[qi], ls[qi], dos[qi],
                         ss[qi], _chunks(kseg)[kvi], offset)

  def add(acc, qi, kvi, grads):
    """acc = (dq [2 chunks], dk [2 chunks], dv [2 chunks]) plus one pair's grads."""
    dq, dk, dv = (list(x) for x in acc)
    dq[qi] = dq[qi] + grads[0]
    dk[kvi] = dk[kvi] + grads[1]
    dv[kvi] = dv[kvi] + grads[2]
    return tuple(dq), tuple(dk), tuple(dv)

  zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in _chunks(q))
  zkv = tuple(jnp.zeros(x.shape, jnp.float32) for x in _chunks(k))
  zvv = tuple(jnp.zeros(x.shape, jnp.float32) for x in _chunks(v))
  own = (k, v, seg)
  acc = (zeros, zkv, zvv)
  acc = add(acc, 0, 0, pair(0, own, 0, 0))
  acc = add(acc, 1, 0, pair(1, own, 0, (b - a) * c))
  acc = add(acc, 1, 1, pair(1, own, 1, 0))
  dq, dkv = acc[0], acc[1:]

  def step(s, blk, dq):
    """dq updated, and this device's share of the held block's (dk, dv)."""
    i = jnp.mod(j - s, n)
    acc = add((dq, zkv, zvv), 1, 0, pair(1, blk, 0, (b - i) * c))
    acc = jax.lax.cond(i < j, lambda: add(acc, 0, 0, pair(0, blk, 0, (j - i) * c)),
                       lambda: add(acc, 1, 1, pair(1, blk, 1, (i - j) * c)))
    return acc[0], acc[1:]

  def plus(x, y):
    return jax.tree.map(jnp.add, x, y)

  if n > 1:
    blk, dkv = _send(ring, own), _send(ring, dkv)  # dkv: the accumulator of the block held next

    def body(carry, s):
      blk, dkv, dq = carry
      nxt = _send(ring, blk)
      dq, share = step(s, blk, dq)
      return (nxt, _send(ring, plus(dkv, share)), dq), None

    if n > 2:
      (blk, dkv, dq), _ = jax.lax.scan(body, (blk, dkv, dq), jnp.arange(1, n - 1, dtype=jnp.int32))
    dq, share = step(n - 1, blk, dq)
    dkv = _send(ring, plus(dkv, share))  # after n hops each block's dk/dv is back with its owner
  dk, dv = dkv
  return (jnp.concatenate(dq, 1).astype(q.dtype), jnp.concatenate(dk, 1).astype(k.dtype),
          jnp.concatenate(dv, 1).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_local(ring: Ring, q, k, v, seg):
  """Per device: q [b, 2C, heads, d], k, v [b, 2C, kv_heads, d], seg [b, 2C] int32 or None, in the
  balanced order (module doc) -> [b, 2C, heads, d]."""
  return _forward(ring, q, k, v, seg)[0]


def _ring_fwd(ring, q, k, v, seg):
  o, lse = _forward(ring, q, k, v, seg)
  return o, (q, k, v, seg, o, lse)


def _ring_bwd(ring, res, do):
  q, k, v, seg, o, lse = res
  return (*_backward(ring, q, k, v, seg, o, lse, do), None)  # segment ids: no cotangent


ring_local.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(ring: Ring, q, k, v, segments, heads, kv_heads):
  """Whole arrays under the active rules: q [batch, t, heads, d], k, v [batch, t, kv_heads, d],
  segments [batch, t] int32 or None, all split along `length` in the balanced order. heads,
  kv_heads: the logical names the heads dims are split by inside shard_map (or None)."""
  seg = None if segments is None else ("batch", "length")
  fn = rules.shard_map(functools.partial(ring_local, ring),
                       (("batch", "length", heads, None), ("batch", "length", kv_heads, None),
                        ("batch", "length", kv_heads, None), seg),
                       ("batch", "length", heads, None))
  return fn(q, k, v, segments)
