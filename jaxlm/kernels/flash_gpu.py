"""Flash-attention forward and backward kernels for Hopper GPUs, written in Pallas Mosaic GPU.

Why Mosaic GPU and not the Triton backend: Mosaic GPU is JAX's default Pallas GPU backend since
0.9 and the Triton backend is deprecated in 0.11; only Mosaic GPU exposes what flash attention needs
to run near an H100's limit (TMA bulk copies, wgmma tensor-core instructions fed from shared
memory, mbarriers, warp-group specialisation), and a kernel written today for a backend that is
going away would have to be rewritten. Known Triton-backend attention kernels also give NaN or wrong
output when the sequence is not a multiple of the block; here every tail is masked explicitly.

Structure (the same three kernels as flash_tpu.py, with the reduction as an in-kernel loop instead
of a grid axis; their building blocks are in flash_gpu_parts.py):

  forward  grid (q_blocks, heads, batch); 2 compute warp groups own 64 query rows each of a
           128-row block, and a third, producer warp group streams K/V blocks into a ring of
           shared-memory slots with TMA. Online softmax in the log2 domain; writes o and the
           row log-sum-exp (in log2 units) that the backward pass recomputes probabilities from.
  dq       grid (q_blocks, heads, batch); the same pipeline over key blocks: dq = sum dS K.
  dk, dv   grid (k_blocks, kv_heads, batch); the producer streams (q, dO, lse, delta) blocks of
           every query head in the GQA group, so dK/dV of a shared KV head are summed in
           registers and K/V are never repeated per query head.

Layout: q/k/v/o stay token-major, [batch, length, heads, head_dim], exactly as the model holds
them: TMA copies a strided [block, head_dim] tile per (batch, position block, head), so the
wrapper transposes nothing. Row statistics are [batch, heads, length] float32.

Masks come from positions (iota) and are built only for key blocks that need one: blocks that
every row of a warp group fully sees run an unmasked loop body. Key blocks the causal/window mask
hides entirely are never loaded. Fully masked rows output zeros with zero gradients (lse = +1e30).

Matmul operands are bf16/f16 (wgmma); float32 inputs are run with bf16 operands and float32
accumulation and softmax, which is also what XLA's default precision does for float32 matmuls
on these GPUs (TF32).

Without a GPU: the kernels run on CPU under Pallas' GPU interpreter (`interpret=True` in the Spec;
backend "gpu_interpret"), which simulates the warp groups, shared memory, TMA and mbarriers and
detects races. It has no register layouts and no transposed or register-operand wgmma, so there,
and only there, `_dot`/`_mma` use a float32-accumulating lax.dot of the same operands and
`_cast`/`_iota` skip the layout. On any host the kernels also lower for CUDA down to Mosaic GPU's
NVVM module, which is where layout, shared-memory and wgmma-shape errors show (tests/test_flash_gpu.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxlm.kernels import flash_gpu_parts as parts
from jaxlm.kernels.flash_gpu_parts import (  # noqa: F401  (CTA_ROWS, unsupported_gpu: public here)
    COL, COMPUTE_WGS, CTA_ROWS, ROW, WG_ROWS, unsupported_gpu)
from jaxlm.kernels.flash_spec import Spec, kv_range, q_range
from jaxlm.kernels.masking import EMPTY_LSE, MASKED

BWD_BLOCK = 64  # dq kernel: keys per step; dK/dV kernel: queries per step (wgmma N)


def default_block_k(head_dim: int) -> int:
  """Keys per forward step: 128 gives wgmma.m64n128 score tiles (64 f32 registers per thread); 64
  for head_dim > 128, where the [64, head_dim] f32 accumulator alone takes up to 128."""
  return 64 if head_dim > 128 else 128

# ---------------------------------------------------------------------------------------------
# forward and dq: a CTA owns 128 query rows of one head; the producer streams K/V blocks


def _row_block_kernel(spec: Spec, *, grad: bool, stages: int):
  """Kernel body for the forward pass (grad=False) or dq (grad=True)."""
  bk, g = spec.block_k, spec.groups

  def kernel(*refs):
    q_seg_ref, k_seg_ref, refs = parts.split_refs(spec, refs)
    if grad:
      q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, scratch = refs
    else:
      q_ref, k_ref, v_ref, o_ref, lse_ref, scratch = refs
    smem, (in_bar, k_bar, v_bar), (k_free, v_free) = scratch
    q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, qs_smem, ks_smem = smem
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    qi, h, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    lo, hi = kv_range(spec, qi)
    kh = h // g

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q0 = qi * spec.block_q + wg * WG_ROWS
      rows = pl.ds(q0, WG_ROWS)
      bar = in_bar.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, h], q_smem.at[wg], bar)
      if grad:
        plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, h], do_smem.at[wg], bar)
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, rows], lse_smem.at[wg], bar)
        plgpu.copy_gmem_to_smem(delta_ref.at[bi, h, rows], delta_smem.at[wg], bar)
      if spec.segments:
        plgpu.copy_gmem_to_smem(q_seg_ref.at[bi, rows], qs_smem.at[wg], bar)
      plgpu.barrier_wait(bar)
      q_seg = parts.cast(spec, qs_smem[wg], ROW) if spec.segments else None
      if grad:
        lse = parts.cast(spec, lse_smem[wg], ROW)
        delta = parts.cast(spec, delta_smem[wg], ROW)
      shape = (WG_ROWS, bk)

      def scores(j, slot, masked):
        qk = parts.dot(spec, q_smem.at[wg], k_smem.at[slot], WG_ROWS, bk, transpose_b=True)
        s, t = parts.scores(spec, qk)
        mask = None
        if masked:
          k_seg = parts.cast(spec, ks_smem[slot], COL) if spec.segments else None
          mask = parts.mask(spec, q0, j * bk, shape, q_seg, k_seg)
        if mask is not None:
          s = jnp.where(mask, s, MASKED)
        return s, t, mask

      def fwd_step(j, carry, masked):
        acc, m, l = carry
        slot = lax.rem(j - lo, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        s, _, mask = scores(j, slot, masked)
        plgpu.barrier_arrive(k_free.at[slot])
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp2(s - parts.per_row(m_new, shape))
        if mask is not None:
          p = jnp.where(mask, p, 0.0)  # rows masked so far have m_new = MASKED: exp2(0) = 1
        alpha = jnp.exp2(m - m_new)
        l = l * alpha + p.sum(axis=1)
        acc = acc * parts.per_row(alpha, acc.shape)
        plgpu.barrier_wait(v_bar.at[slot])
        acc = parts.mma(spec, acc, p.astype(dtype), v_smem.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      def dq_step(j, dq, masked):
        slot = lax.rem(j - lo, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        s, t, mask = scores(j, slot, masked)
        p = jnp.exp2(s - parts.per_row(lse, shape))
        if mask is not None:
          p = jnp.where(mask, p, 0.0)
        plgpu.barrier_wait(v_bar.at[slot])
        dp = parts.dot(spec, do_smem.at[wg], v_smem.at[slot], WG_ROWS, bk, transpose_b=True)
        plgpu.barrier_arrive(v_free.at[slot])
        ds = p * (dp - parts.per_row(delta, shape))
        if t is not None:
          ds = ds * (1.0 - t * t)  # d(c tanh(x / c)) / dx
        dq = parts.mma(spec, dq, ds.astype(dtype), k_smem.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

      a, z = parts.full_range(spec, q0, WG_ROWS, lo, hi)
      zeros = parts.cast(spec, jnp.zeros((WG_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
      if grad:
        dq = parts.consume(dq_step, (lo, a, z, hi + 1), zeros)
        q_smem[wg] = (dq * spec.scale).astype(dtype)
        out = dq_ref
      else:
        carry = (zeros, parts.cast(spec, jnp.full((WG_ROWS,), MASKED, jnp.float32), ROW),
                 parts.cast(spec, jnp.zeros((WG_ROWS,), jnp.float32), ROW))
        acc, m, l = parts.consume(fwd_step, (lo, a, z, hi + 1), carry)
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        q_smem[wg] = (acc * parts.per_row(jnp.where(seen, 1.0 / safe_l, 0.0), acc.shape)).astype(dtype)
        lse_smem[wg] = jnp.where(seen, m + jnp.log2(safe_l), EMPTY_LSE)
        out = o_ref
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[wg], out.at[bi, rows, h])
      if not grad:
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, h, rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      def load(j, slot):
        j = jnp.minimum(j, k_ref.shape[1] // bk - 1)  # static bound check of never-run prologue loads
        cols = pl.ds(j * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, cols, kh], k_smem.at[slot], k_bar.at[slot])
        if spec.segments:  # the keys' segment ids travel with K, under K's barrier
          plgpu.copy_gmem_to_smem(k_seg_ref.at[bi, cols], ks_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, cols, kh], v_smem.at[slot], v_bar.at[slot])
      parts.produce(load, (k_free, v_free), lo, hi + 1 - lo, stages)

  return kernel


def _row_block_call(spec: Spec, grad: bool, q, k, args, outs):
  b, tq, h, d = q.shape
  assert spec.block_q == CTA_ROWS, spec.block_q
  dtype, bk = q.dtype, spec.block_k
  n_in = (4 if grad else 1) + (1 if spec.segments else 0)  # copies under one input barrier
  k_in = 2 if spec.segments else 1
  item = jnp.dtype(dtype).itemsize
  stages = parts.ring_stages((2 if grad else 1) * CTA_ROWS * d * item + 4 * CTA_ROWS * 4,
                             2 * bk * d * item + 4 * bk)
  smem = [parts.smem_tile((COMPUTE_WGS, WG_ROWS, d), dtype),
          parts.smem_tile((COMPUTE_WGS, WG_ROWS, d), dtype) if grad else None,
          parts.smem_tile((stages, bk, d), dtype), parts.smem_tile((stages, bk, d), dtype),
          plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32),
          plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32) if grad else None,
          plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.int32) if spec.segments else None,
          plgpu.SMEM((stages, bk), jnp.int32) if spec.segments else None]
  return parts.launch(_row_block_kernel(spec, grad=grad, stages=stages), spec, smem, (n_in, k_in, 1),
                 stages, outs, args, (tq // spec.block_q, h, b), ("q", "h", "b"))


def forward(spec: Spec, q, k, v, q_seg=None, k_seg=None):
  """q: [b, tq, h, d]; k, v: [b, tk, kvh, d] (lengths padded to blocks); segs: [b, tq], [b, tk] int32.

  spec.block_q must be 128 (2 warp groups x 64 rows). Returns o [b, tq, h, d] in q's dtype and
  lse [b, h, tq] float32 in log2 units.
  """
  b, tq, h, _ = q.shape
  segs = [q_seg, k_seg] if spec.segments else []
  outs = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)]
  return _row_block_call(spec, False, q, k, segs + [q, k, v], outs)


def dq(spec: Spec, q, k, v, do, lse, delta, q_seg=None, k_seg=None):
  """dq of the padded forward; delta = rowsum(dO * O) [b, h, tq] float32."""
  segs = [q_seg, k_seg] if spec.segments else []
  return _row_block_call(spec, True, q, k, segs + [q, k, v, do, lse, delta],
                         jax.ShapeDtypeStruct(q.shape, q.dtype))


# ---------------------------------------------------------------------------------------------
# dk, dv: a CTA owns 128 key rows of one KV head; the producer streams the query-side blocks of
# every query head in its GQA group


def dkv(spec: Spec, q, k, v, do, lse, delta, q_seg=None, k_seg=None):
  """(dk, dv) of the padded forward. Here spec.block_k = 128 key rows per CTA (2 warp groups),
  spec.block_q = the query block each pipeline step streams."""
  b, tq, h, d = q.shape
  tk, kvh = k.shape[1], k.shape[2]
  bq, g, dtype = spec.block_q, spec.groups, q.dtype
  assert spec.block_k == CTA_ROWS, spec.block_k
  item = jnp.dtype(dtype).itemsize
  stages = parts.ring_stages(2 * CTA_ROWS * d * item + 4 * CTA_ROWS, 2 * bq * d * item + 12 * bq)

  def kernel(*refs):
    q_seg_ref, k_seg_ref, refs = parts.split_refs(spec, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, scratch = refs
    smem, (in_bar, q_bar, do_bar), (q_free, do_free) = scratch
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ks_smem, qs_smem = smem
    ki, kh, bi = lax.axis_index("k"), lax.axis_index("h"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    lo, hi = q_range(spec, ki)
    count = hi + 1 - lo  # query blocks per query head

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      k0 = ki * spec.block_k + wg * WG_ROWS
      rows = pl.ds(k0, WG_ROWS)
      bar = in_bar.at[wg]
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, kh], k_smem.at[wg], bar)
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, kh], v_smem.at[wg], bar)
      if spec.segments:
        plgpu.copy_gmem_to_smem(k_seg_ref.at[bi, rows], ks_smem.at[wg], bar)
      plgpu.barrier_wait(bar)
      k_seg = parts.cast(spec, ks_smem[wg], ROW) if spec.segments else None
      shape = (WG_ROWS, bq)  # [keys, queries]

      def step(j, carry, masked, n0):
        dk, dv = carry
        slot = lax.rem(n0 + j - lo, stages)
        plgpu.barrier_wait(q_bar.at[slot])
        kq = parts.dot(spec, k_smem.at[wg], q_smem.at[slot], WG_ROWS, bq, transpose_b=True)
        st, t = parts.scores(spec, kq)
        lse = parts.cast(spec, lse_smem[slot], COL)
        mask = None
        if masked:
          q_seg = parts.cast(spec, qs_smem[slot], COL) if spec.segments else None
          mask = parts.mask(spec, j * bq, k0, shape, q_seg, k_seg, transposed=True)
        if mask is not None:
          st = jnp.where(mask, st, MASKED)
        pt = jnp.exp2(st - parts.per_col(lse, shape))  # P^T: [keys, queries]
        if mask is not None:
          pt = jnp.where(mask, pt, 0.0)
        plgpu.barrier_wait(do_bar.at[slot])
        dv = parts.mma(spec, dv, pt.astype(dtype), do_smem.at[slot])
        dpt = parts.dot(spec, v_smem.at[wg], do_smem.at[slot], WG_ROWS, bq, transpose_b=True)
        dst = pt * (dpt - parts.per_col(parts.cast(spec, delta_smem[slot], COL), shape))
        plgpu.barrier_arrive(do_free.at[slot])
        if t is not None:
          dst = dst * (1.0 - t * t)
        dk = parts.mma(spec, dk, dst.astype(dtype), q_smem.at[slot])
        plgpu.barrier_arrive(q_free.at[slot])
        return dk, dv

      a, z = parts.full_range_t(spec, k0, WG_ROWS, lo, hi)

      def head(gi, carry):
        n0 = gi * count
        return parts.consume(lambda j, c, masked: step(j, c, masked, n0), (lo, a, z, hi + 1), carry)

      zeros = parts.cast(spec, jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
      dk, dv = lax.fori_loop(0, g, head, (zeros, zeros))
      k_smem[wg] = (dk * spec.scale).astype(dtype)
      v_smem[wg] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[bi, rows, kh])
      plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[bi, rows, kh])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      def load(n, slot):
        h = kh * g + n // count
        cols = pl.ds(jnp.minimum(lo + lax.rem(n, count), tq // bq - 1) * bq, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, cols, h], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, cols], lse_smem.at[slot], q_bar.at[slot])
        if spec.segments:
          plgpu.copy_gmem_to_smem(q_seg_ref.at[bi, cols], qs_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[bi, cols, h], do_smem.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[bi, h, cols], delta_smem.at[slot], do_bar.at[slot])
      parts.produce(load, (q_free, do_free), 0, g * count, stages)

  smem = [parts.smem_tile((COMPUTE_WGS, WG_ROWS, d), dtype),
          parts.smem_tile((COMPUTE_WGS, WG_ROWS, d), dtype),
          parts.smem_tile((stages, bq, d), dtype), parts.smem_tile((stages, bq, d), dtype),
          plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
          plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.int32) if spec.segments else None,
          plgpu.SMEM((stages, bq), jnp.int32) if spec.segments else None]
  seg = 1 if spec.segments else 0
  segs = [q_seg, k_seg] if spec.segments else []
  outs = [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)]
  # in_bar: k, v (+ key segment ids); a_bar: q, lse (+ query segment ids); b_bar: dO, delta
  return parts.launch(kernel, spec, smem, (2 + seg, 2 + seg, 2), stages, outs,
                 segs + [q, k, v, do, lse, delta], (tk // spec.block_k, kvh, b), ("k", "h", "b"))


def backward(spec: Spec, q, k, v, o, lse, do, q_seg=None, k_seg=None):
  """(dq, dk, dv) of the padded forward; shapes as in `forward`."""
  # delta = rowsum(dO * O): [b, t, h] -> [b, h, t], the row-statistics layout of lse
  delta = jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), 1, 2)
  dq_ = dq(dataclasses.replace(spec, block_k=BWD_BLOCK), q, k, v, do, lse, delta, q_seg, k_seg)
  if spec.interpret:  # the GPU interpreter's simulated shared memory is global: one kernel at a time
    q, dq_ = jax.lax.optimization_barrier((q, dq_))
  dkv_spec = dataclasses.replace(spec, block_q=BWD_BLOCK, block_k=CTA_ROWS)
  dk, dv = dkv(dkv_spec, q, k, v, do, lse, delta, q_seg, k_seg)
  return dq_, dk, dv
