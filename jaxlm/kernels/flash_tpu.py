"""Flash-attention forward and backward kernels written for Pallas Mosaic TPU (also run in interpret mode).

Layout inside the kernels is head-major, [batch, heads, length, head_dim], so every block is a
(rows, head_dim) tile whose last two dimensions are what Mosaic tiles into vregs. All three
kernels share the same shape of grid: the last grid axis is the reduction ("arbitrary") axis and
its running state lives in VMEM scratch, initialised under `pl.when(first step)` and written out
under `pl.when(last step)`.

  forward  grid (batch, heads, q_blocks, k_blocks):  online softmax; writes o and the row
           log-sum-exp (lse) that the backward pass recomputes probabilities from.
  dq       grid (batch, heads, q_blocks, k_blocks):  dq = sum_k dS K.
  dk, dv   grid (batch, kv_heads, k_blocks, group * q_blocks): the reduction runs over the query
           blocks of every query head in the GQA group, so dK/dV of a shared KV head are summed in
           VMEM and K/V are never repeated per query head.

Masking is computed from block indices (key j is at position j, query row i at q_offset + i, where
q_offset is a scalar-prefetch operand, so it may be traced: a sequence shard's first row), so no
mask tensor is ever read from memory. Key blocks the causal/window mask hides entirely are skipped
twice: their compute is under `pl.when(visible)`, and their index_map is clamped to the nearest
visible block, so the pipeline sees an unchanged block index and starts no DMA for them.

Row statistics (lse, and delta = rowsum(dO * O)) are stored broadcast over 128 lanes,
[batch, heads, length, 128], the layout Mosaic tiles without relayout; this costs
128 floats per row, still linear in sequence length.

Fully masked rows (every key hidden, e.g. a query whose segment id appears in no key) are defined
to output zeros with zero gradients: their running sum l stays 0, the output is acc * 0, and their
lse is set to +1e30 so the backward pass recomputes probabilities of exactly 0 (never NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlm.kernels import masking
from jaxlm.kernels.flash_spec import Spec, clamp_block, kv_range, q_range
from jaxlm.kernels.masking import EMPTY_LSE, MASKED

LANES = 128  # row statistics are stored broadcast over one vreg's lanes

_NT = (((1,), (1,)), ((), ()))  # a @ b.T: contract the last dims
_TN = (((0,), (0,)), ((), ()))  # a.T @ b: contract the first dims


def _mask(spec: Spec, q_off, qi, ki, q_seg, k_seg):
  """[block_q, block_k] bool of visible (query, key) pairs, or None when nothing is hidden."""
  shape = (spec.block_q, spec.block_k)
  q_pos = q_off + qi * spec.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = ki * spec.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
  return masking.visible(spec, q_pos, k_pos, q_seg, k_seg)  # segs: [block_q, 1], [1, block_k]


def _scores(spec: Spec, q, k):
  """Scores [block_q, block_k] in float32, plus tanh for the capping's grad (see masking.scores)."""
  return masking.scores(spec, lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32))


def _split(spec: Spec, refs):
  """The query offset, (q_seg, k_seg) or (None, None), then the remaining refs."""
  q_off = refs[0][0]  # the scalar-prefetch operand, in SMEM
  if spec.segments:
    return q_off, refs[1], refs[2], refs[3:]
  return q_off, None, None, refs[1:]


def _seg_values(q_seg_ref, k_seg_ref):
  if q_seg_ref is None:
    return None, None
  return q_seg_ref[...], k_seg_ref[...]  # [block_q, 1], [1, block_k]


# ---------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(*refs, spec: Spec):
  q_off, q_seg_ref, k_seg_ref, refs = _split(spec, refs)
  q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
  qi, ki = pl.program_id(2), pl.program_id(3)
  lo, hi = kv_range(spec, qi, q_off)

  @pl.when(ki == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((ki >= lo) & (ki <= hi))
  def _step():
    s, _ = _scores(spec, q_ref[...], k_ref[...])
    mask = _mask(spec, q_off, qi, ki, *_seg_values(q_seg_ref, k_seg_ref))
    if mask is not None:
      s = jnp.where(mask, s, MASKED)
    m_prev = m_scr[...]  # [block_q, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)  # a row masked so far has m_new = MASKED and would give exp(0)
    alpha = jnp.exp(m_prev - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_scr[...] = alpha * acc_scr[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_scr[...] = m_new

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_scr[...] * jnp.where(seen, 1.0 / safe_l, 0.0)).astype(o_ref.dtype)
    lse = jnp.where(seen, m_scr[...] + jnp.log(safe_l), EMPTY_LSE)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _params(interpret: bool):
  return None if interpret else pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _seg_specs(spec: Spec, q_block, k_block):
  """BlockSpecs for q_seg [batch, tq, 1] and k_seg [batch, 1, tk] given (grid -> block index) maps."""
  return [pl.BlockSpec((None, spec.block_q, 1), q_block),
          pl.BlockSpec((None, 1, spec.block_k), k_block)]


def forward(spec: Spec, q, k, v, q_off, q_seg=None, k_seg=None):
  """q: [b, h, tq, d]; k, v: [b, kvh, tk, d] (padded); q_off: int32 [1], the position of query row 0;
  segs: [b, tq, 1], [b, 1, tk] int32.

  Returns o [b, h, tq, d] in q's dtype and lse [b, h, tq, LANES] float32.
  """
  b, h, tq, d = q.shape
  g, bq, bk = spec.groups, spec.block_q, spec.block_k
  nk = k.shape[2] // bk
  grid = (b, h, tq // bq, nk)

  def kv_block(bi, hi, qi, ki, off_ref):
    lo, top = kv_range(spec, qi, off_ref[0])
    return bi, hi // g, clamp_block(ki, lo, top, nk), 0

  def q_block(bi, hi, qi, ki, off_ref):
    return bi, hi, qi, 0

  in_specs = [pl.BlockSpec((None, None, bq, d), q_block),
              pl.BlockSpec((None, None, bk, d), kv_block),
              pl.BlockSpec((None, None, bk, d), kv_block)]
  args = [q, k, v]
  if spec.segments:
    in_specs = _seg_specs(spec, lambda bi, hi, qi, ki, off: (bi, qi, 0),
                          lambda *idx: (idx[0], 0, kv_block(*idx)[2])) + in_specs
    args = [q_seg, k_seg] + args
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=grid,
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, d), q_block),
                 pl.BlockSpec((None, None, bq, LANES), q_block)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  return pl.pallas_call(
      lambda *r: _fwd_kernel(*r, spec=spec),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tq, LANES), jnp.float32)],
      compiler_params=_params(spec.interpret),
      interpret=spec.interpret,
      name="flash_fwd",
  )(q_off, *args)


# ---------------------------------------------------------------------------------------------
# backward: probabilities are recomputed from lse; ds = p * (dp - delta)


def _grad_scores(spec: Spec, q_off, qi, ki, q, k, v, do, lse, delta, q_seg, k_seg):
  """p [bq, bk] (input dtype ready) and ds [bq, bk] float32 (w.r.t. the unscaled q.k)."""
  s, t = _scores(spec, q, k)
  mask = _mask(spec, q_off, qi, ki, q_seg, k_seg)
  if mask is not None:
    s = jnp.where(mask, s, MASKED)
  p = jnp.exp(s - lse)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  if t is not None:
    ds = ds * (1.0 - t * t)  # d(c tanh(x / c)) / dx
  return p, ds


def _dq_kernel(*refs, spec: Spec):
  q_off, q_seg_ref, k_seg_ref, refs = _split(spec, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
  qi, ki = pl.program_id(2), pl.program_id(3)
  lo, hi = kv_range(spec, qi, q_off)

  @pl.when(ki == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when((ki >= lo) & (ki <= hi))
  def _step():
    k = k_ref[...]
    _, ds = _grad_scores(spec, q_off, qi, ki, q_ref[...], k, v_ref[...], do_ref[...],
                         lse_ref[...][:, :1], delta_ref[...][:, :1], *_seg_values(q_seg_ref, k_seg_ref))
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, spec: Spec, nq: int):
  q_off, q_seg_ref, k_seg_ref, refs = _split(spec, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
  ki, j = pl.program_id(2), pl.program_id(3)
  qi = j % nq
  lo, hi = q_range(spec, ki, q_off)

  @pl.when(j == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when((qi >= lo) & (qi <= hi))
  def _step():
    q, do = q_ref[...], do_ref[...]
    p, ds = _grad_scores(spec, q_off, qi, ki, q, k_ref[...], v_ref[...], do,
                         lse_ref[...][:, :1], delta_ref[...][:, :1], *_seg_values(q_seg_ref, k_seg_ref))
    dv_scr[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
    dk_scr[...] += lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward_in_specs(spec: Spec, d: int, q_map, kv_map):
  """BlockSpecs of both backward kernels' inputs q, k, v, do, lse, delta: query-side blocks by
  q_map, key-side by kv_map (the two kernels walk their grids differently)."""
  def query_side(cols):
    return pl.BlockSpec((None, None, spec.block_q, cols), q_map)

  def key_side():
    return pl.BlockSpec((None, None, spec.block_k, d), kv_map)

  return [query_side(d), key_side(), key_side(), query_side(d), query_side(LANES), query_side(LANES)]


def backward(spec: Spec, q, k, v, o, lse, do, q_off, q_seg=None, k_seg=None):
  """Gradients (dq, dk, dv) of the padded, head-major forward; shapes as in `forward`."""
  b, h, tq, d = q.shape
  kvh, tk = k.shape[1], k.shape[2]
  g, bq, bk = spec.groups, spec.block_q, spec.block_k
  nq, nk = tq // bq, tk // bk
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  delta = jnp.broadcast_to(delta, (b, h, tq, LANES))  # [b, h, tq, LANES]
  seg_args = [q_seg, k_seg] if spec.segments else []

  # dq: grid (b, h, nq, nk), the reduction over key blocks
  def kv_block(bi, hi, qi, ki, off_ref):
    lo, top = kv_range(spec, qi, off_ref[0])
    return bi, hi // g, clamp_block(ki, lo, top, nk), 0

  def q_block(bi, hi, qi, ki, off_ref):
    return bi, hi, qi, 0

  in_specs = _backward_in_specs(spec, d, q_block, kv_block)
  if spec.segments:
    in_specs = _seg_specs(spec, lambda bi, hi, qi, ki, off: (bi, qi, 0),
                          lambda *idx: (idx[0], 0, kv_block(*idx)[2])) + in_specs
  dq = pl.pallas_call(
      lambda *r: _dq_kernel(*r, spec=spec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, d), q_block),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(spec.interpret),
      interpret=spec.interpret,
      name="flash_dq",
  )(q_off, *seg_args, q, k, v, do, lse, delta)

  # dk, dv: grid (b, kvh, nk, g * nq); step j visits query head kh * g + j // nq, block j % nq
  def qside(bi, kh, ki, j, off_ref):
    lo, top = q_range(spec, ki, off_ref[0])
    return bi, kh * g + j // nq, clamp_block(j % nq, lo, top, nq), 0

  def kside(bi, kh, ki, j, off_ref):
    return bi, kh, ki, 0

  in_specs = _backward_in_specs(spec, d, qside, kside)
  if spec.segments:
    in_specs = _seg_specs(spec, lambda *idx: (idx[0], qside(*idx)[2], 0),
                          lambda bi, kh, ki, j, off: (bi, 0, ki)) + in_specs
  dk, dv = pl.pallas_call(
      lambda *r: _dkv_kernel(*r, spec=spec, nq=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, kvh, nk, g * nq), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bk, d), kside), pl.BlockSpec((None, None, bk, d), kside)],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(spec.interpret),
      interpret=spec.interpret,
      name="flash_dkv",
  )(q_off, *seg_args, q, k, v, do, lse, delta)
  return dq, dk, dv
