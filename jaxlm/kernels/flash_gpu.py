"""Flash-attention forward and backward kernels for Hopper GPUs, written in Pallas Mosaic GPU.

Why Mosaic GPU and not the Triton backend: Mosaic GPU is JAX's default Pallas GPU backend since
0.9 and the Triton backend is deprecated in 0.11; only Mosaic GPU exposes what flash attention needs
to run near an H100's limit (TMA bulk copies, wgmma tensor-core instructions fed from shared
memory, mbarriers, warp-group specialisation), and a kernel written today for a backend that is
going away would have to be rewritten. Known Triton-backend attention kernels also give NaN or wrong
output when the sequence is not a multiple of the block; here every tail is masked explicitly.

Structure (the same three kernels as flash_tpu.py, with the reduction as an in-kernel loop instead
of a grid axis):

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

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxlm.kernels.flash_spec import EMPTY_LSE, MASKED, Spec, kv_range, q_range

LOG2E = math.log2(math.e)
WG_ROWS = 64  # rows one warp group's wgmma owns (the M of wgmma.m64nNk16)
COMPUTE_WGS = 2  # consumer warp groups per CTA; a third one is the TMA producer
CTA_ROWS = COMPUTE_WGS * WG_ROWS  # query rows (forward, dq) or key rows (dK/dV) one CTA owns
SMEM_BYTES = 227 * 1024  # H100 shared memory a CTA can opt into


def unsupported_gpu() -> str | None:
  """Why this process's GPU cannot run these kernels, or None when it can (or there is no local GPU:
  lowering for CUDA from a CPU host, as the tests do, needs no device).

  The kernels use wgmma, which exists on Hopper (sm_90) only: Ampere lacks it and Blackwell
  replaces it with tcgen05."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return None
  capability = getattr(device, "compute_capability", None)  # "9.0" on an H100/H200; absent on ROCm
  if capability is None or not str(capability).startswith("9."):
    return (f"jaxlm's GPU flash-attention kernel needs a Hopper GPU (sm_90, H100/H200); this is "
            f"{device.device_kind} (compute capability {capability})")
  return None


def _params():
  return plgpu.CompilerParams(approx_math=True)


def _interpret(spec: Spec):
  if not spec.interpret:
    return None
  # JAX exports no name for the GPU interpreter's parameters yet; import it only when asked for, so
  # a JAX that moves it breaks the CPU tests of these kernels, never a GPU run.
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  return InterpretGPUParams(detect_races=True)


def _smem(shape, dtype):
  """A shared-memory tile in the swizzled layout wgmma reads: 128-byte rows, 8-row tiles."""
  row = 128 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, row)), plgpu.SwizzleTransform(128)))


def _value(x):
  """The array behind a ref (or x itself when it already is a value). Interpret mode only."""
  if isinstance(x, jax.Array) and not isinstance(getattr(x, "aval", None), jax.ref.AbstractRef):
    return x
  return x[...]


def _dot(spec: Spec, a, b, m: int, n: int, transpose_b: bool = False):
  """a @ b (or a @ b.T) as a fresh [m, n] float32 value. a: shared-memory ref or registers; b: ref.

  On the GPU this is one wgmma; Pallas' GPU interpreter has wgmma only for untransposed
  shared-memory operands, so there the same operands go through a plain float32-accumulating dot.
  """
  if spec.interpret:
    bv = _value(b)
    return lax.dot(_value(a), bv.T if transpose_b else bv, preferred_element_type=jnp.float32)

  def body(ref):
    plgpu.wgmma(ref, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b)
    return ref[...]
  return pl.run_scoped(body, plgpu.ACC((m, n), jnp.float32))


def _mma(spec: Spec, acc, a, b, transpose_b: bool = False):
  """acc + a @ b, accumulated in place in the wgmma accumulator on the GPU."""
  if spec.interpret:
    return acc + _dot(spec, a, b, *acc.shape, transpose_b=transpose_b)
  return pl.run_state(
      lambda r: plgpu.wgmma(r, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b))(plgpu.ACC.init(acc))


def _cast(spec: Spec, x, layout):
  """Pins x to a register layout (Pallas' GPU interpreter has no layouts: there it is the identity)."""
  return x if spec.interpret else plgpu.layout_cast(x, layout)


def _iota(spec: Spec, shape, dim):
  if spec.interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile: [m] of an [m, n] tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column: [n]


def _rows(x, shape):
  """[m] per-row vector -> [m, n]."""
  return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
  """[n] per-column vector -> [m, n]."""
  return lax.broadcast_in_dim(x, shape, [1])


def _mask(spec: Spec, q0, k0, shape, q_seg=None, k_seg=None, transposed=False):
  """[rows, cols] bool of visible pairs for query rows q0.. and key columns k0.. (swapped if transposed)."""
  q_dim, k_dim = (1, 0) if transposed else (0, 1)
  q_pos = q0 + _iota(spec, shape, q_dim)
  k_pos = k0 + _iota(spec, shape, k_dim)
  mask = k_pos < spec.kv_len  # padded query rows need no mask: their dO is 0 and o is sliced off
  if spec.causal:
    mask = mask & (k_pos <= q_pos)
  if spec.window:
    mask = mask & (q_pos - k_pos < spec.window)
    if not spec.causal:
      mask = mask & (k_pos - q_pos < spec.window)
  if q_seg is not None:
    qs = (_cols if transposed else _rows)(q_seg, shape)
    ks = (_rows if transposed else _cols)(k_seg, shape)
    mask = mask & (qs == ks)
  return mask


def _full_range(spec: Spec, q_first, rows: int, lo, hi):
  """[a, b): key blocks in [lo, hi] that every one of `rows` query rows from q_first fully sees.

  Blocks outside it get the masked loop body: the causal diagonal, window edges and the partial
  last key block. With segment ids every block is masked."""
  bk = spec.block_k
  if spec.segments:
    return lo, lo
  a, b = lo, hi + 1
  if spec.kv_len % bk:
    b = jnp.minimum(b, spec.kv_len // bk)  # the partial last key block
  if spec.causal:  # k_last <= q_first
    b = jnp.minimum(b, (q_first + 1) // bk)
  if spec.window:  # q_last - k_first < window
    a = jnp.maximum(a, pl.cdiv(q_first + rows - spec.window, bk))
    if not spec.causal:
      b = jnp.minimum(b, pl.cdiv(q_first + spec.window - bk + 1, bk))
  a = jnp.clip(a, lo, hi + 1)
  b = jnp.clip(b, a, hi + 1)
  return a, b


def _scores(spec: Spec, s):
  """Raw q.k [m, n] f32 -> log2-domain scores, plus tanh for the soft cap's gradient."""
  s = s * spec.scale
  if not spec.softcap:
    return s * LOG2E, None
  t = jnp.tanh(s / spec.softcap)
  return (spec.softcap * LOG2E) * t, t


def _full_range_t(spec: Spec, k_first, rows: int, lo, hi):
  """[a, b): query blocks in [lo, hi] whose every query fully sees `rows` keys from k_first.

  The dK/dV kernel's transpose of `_full_range`; padded keys and queries need no mask there
  (their gradients are sliced off, and padded queries carry dO = 0)."""
  bq = spec.block_q
  if spec.segments:
    return lo, lo
  a, b = lo, hi + 1
  if spec.causal:  # q_first >= k_last
    a = jnp.maximum(a, pl.cdiv(k_first + rows - 1, bq))
  if spec.window:  # q_last - k_first < window
    b = jnp.minimum(b, pl.cdiv(k_first + spec.window - bq + 1, bq))
    if not spec.causal:  # k_last - q_first < window
      a = jnp.maximum(a, pl.cdiv(k_first + rows - spec.window, bq))
  a = jnp.clip(a, lo, hi + 1)
  b = jnp.clip(b, a, hi + 1)
  return a, b


def _stages(resident: int, per_stage: int) -> int:
  """Ring depth: 2 (load the next block while computing on this one) if it fits, else 1."""
  return 2 if resident + 2 * per_stage <= SMEM_BYTES - 1024 else 1


def _produce(load, free, first, count, stages: int):
  """The producer warp group: issue load(step, slot) for steps 0..count-1 of a ring of slots.

  A slot is refilled only after every consumer has arrived on each of its `free` barriers."""
  plgpu.set_max_registers(40, action="decrease")  # hand registers to the consumers
  for i in range(stages):
    pl.when(i < count)(lambda i=i: load(first + i, i))

  @pl.loop(stages, jnp.maximum(count, stages))
  def _(step):
    slot = lax.rem(step, stages)
    for bar in free:
      plgpu.barrier_wait(bar.at[slot])
    load(first + step, slot)

  @pl.loop(jnp.maximum(count - stages, 0), count)
  def _(step):  # drain: observe the consumers' last releases, so no barrier phase goes unseen
    for bar in free:
      plgpu.barrier_wait(bar.at[lax.rem(step, stages)])


def _consume(step, ranges, carry):
  """Runs step(j, carry, masked) over [r0, r1) masked, [r1, r2) unmasked, [r2, r3) masked."""
  r0, r1, r2, r3 = ranges
  carry = lax.fori_loop(r0, r1, lambda j, c: step(j, c, True), carry)
  carry = lax.fori_loop(r1, r2, lambda j, c: step(j, c, False), carry)
  return lax.fori_loop(r2, r3, lambda j, c: step(j, c, True), carry)


def _kernel(body, spec: Spec, outs, args, grid, names):
  return plgpu.kernel(
      body, out_type=outs, grid=grid, grid_names=names,
      num_threads=COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=_params(), interpret=_interpret(spec))(*args)


def _split_refs(spec: Spec, refs):
  """(q_seg_ref, k_seg_ref) or (None, None), then the rest."""
  if spec.segments:
    return refs[0], refs[1], refs[2:]
  return None, None, refs


# ---------------------------------------------------------------------------------------------
# forward and dq: a CTA owns 128 query rows of one head; the producer streams K/V blocks


def _row_block_kernel(spec: Spec, *, grad: bool, stages: int):
  """Kernel body for the forward pass (grad=False) or dq (grad=True)."""
  bk, g = spec.block_k, spec.groups

  def kernel(*refs):
    q_seg_ref, k_seg_ref, refs = _split_refs(spec, refs)
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
      q_seg = _cast(spec, qs_smem[wg], ROW) if spec.segments else None
      if grad:
        lse = _cast(spec, lse_smem[wg], ROW)
        delta = _cast(spec, delta_smem[wg], ROW)
      shape = (WG_ROWS, bk)

      def scores(j, slot, masked):
        s, t = _scores(spec, _dot(spec, q_smem.at[wg], k_smem.at[slot], WG_ROWS, bk, transpose_b=True))
        mask = None
        if masked:
          k_seg = _cast(spec, ks_smem[slot], COL) if spec.segments else None
          mask = _mask(spec, q0, j * bk, shape, q_seg, k_seg)
          s = jnp.where(mask, s, MASKED)
        return s, t, mask

      def fwd_step(j, carry, masked):
        acc, m, l = carry
        slot = lax.rem(j - lo, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        s, _, mask = scores(j, slot, masked)
        plgpu.barrier_arrive(k_free.at[slot])
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp2(s - _rows(m_new, shape))
        if masked:
          p = jnp.where(mask, p, 0.0)  # rows masked so far have m_new = MASKED: exp2(0) = 1
        alpha = jnp.exp2(m - m_new)
        l = l * alpha + p.sum(axis=1)
        acc = acc * _rows(alpha, acc.shape)
        plgpu.barrier_wait(v_bar.at[slot])
        acc = _mma(spec, acc, p.astype(dtype), v_smem.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      def dq_step(j, dq, masked):
        slot = lax.rem(j - lo, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        s, t, mask = scores(j, slot, masked)
        p = jnp.exp2(s - _rows(lse, shape))
        if masked:
          p = jnp.where(mask, p, 0.0)
        plgpu.barrier_wait(v_bar.at[slot])
        dp = _dot(spec, do_smem.at[wg], v_smem.at[slot], WG_ROWS, bk, transpose_b=True)
        plgpu.barrier_arrive(v_free.at[slot])
        ds = p * (dp - _rows(delta, shape))
        if t is not None:
          ds = ds * (1.0 - t * t)  # d(c tanh(x / c)) / dx
        dq = _mma(spec, dq, ds.astype(dtype), k_smem.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

      a, z = _full_range(spec, q0, WG_ROWS, lo, hi)
      zeros = _cast(spec, jnp.zeros((WG_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
      if grad:
        dq = _consume(dq_step, (lo, a, z, hi + 1), zeros)
        q_smem[wg] = (dq * spec.scale).astype(dtype)
        out = dq_ref
      else:
        carry = (zeros, _cast(spec, jnp.full((WG_ROWS,), MASKED, jnp.float32), ROW),
                 _cast(spec, jnp.zeros((WG_ROWS,), jnp.float32), ROW))
        acc, m, l = _consume(fwd_step, (lo, a, z, hi + 1), carry)
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        q_smem[wg] = (acc * _rows(jnp.where(seen, 1.0 / safe_l, 0.0), acc.shape)).astype(dtype)
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
      _produce(load, (k_free, v_free), lo, hi + 1 - lo, stages)

  return kernel


def _row_block_call(spec: Spec, grad: bool, q, k, args, outs):
  b, tq, h, d = q.shape
  assert spec.block_q == CTA_ROWS, spec.block_q
  dtype, bk = q.dtype, spec.block_k
  n_in = (4 if grad else 1) + (1 if spec.segments else 0)  # copies under one input barrier
  k_in = 2 if spec.segments else 1
  item = jnp.dtype(dtype).itemsize
  stages = _stages((2 if grad else 1) * CTA_ROWS * d * item + 4 * CTA_ROWS * 4, 2 * bk * d * item + 4 * bk)
  smem = [_smem((COMPUTE_WGS, WG_ROWS, d), dtype),
          _smem((COMPUTE_WGS, WG_ROWS, d), dtype) if grad else None,
          _smem((stages, bk, d), dtype), _smem((stages, bk, d), dtype),
          plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32),
          plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32) if grad else None,
          plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.int32) if spec.segments else None,
          plgpu.SMEM((stages, bk), jnp.int32) if spec.segments else None]
  kernel = _row_block_kernel(spec, grad=grad, stages=stages)

  def entry(*refs):
    pl.run_scoped(
        lambda *scratch: kernel(*refs, scratch), smem,
        (plgpu.Barrier(num_arrivals=n_in, num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_arrivals=k_in, num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
        collective_axes="wg")

  return _kernel(entry, spec, outs, args, (tq // spec.block_q, h, b), ("q", "h", "b"))


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
  stages = _stages(2 * CTA_ROWS * d * item + 4 * CTA_ROWS, 2 * bq * d * item + 12 * bq)

  def kernel(*refs):
    q_seg_ref, k_seg_ref, refs = _split_refs(spec, refs)
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
      k_seg = _cast(spec, ks_smem[wg], ROW) if spec.segments else None
      shape = (WG_ROWS, bq)  # [keys, queries]

      def step(j, carry, masked, n0):
        dk, dv = carry
        slot = lax.rem(n0 + j - lo, stages)
        plgpu.barrier_wait(q_bar.at[slot])
        st, t = _scores(spec, _dot(spec, k_smem.at[wg], q_smem.at[slot], WG_ROWS, bq, transpose_b=True))
        lse = _cast(spec, lse_smem[slot], COL)
        mask = None
        if masked:
          q_seg = _cast(spec, qs_smem[slot], COL) if spec.segments else None
          mask = _mask(spec, j * bq, k0, shape, q_seg, k_seg, transposed=True)
          st = jnp.where(mask, st, MASKED)
        pt = jnp.exp2(st - _cols(lse, shape))  # P^T: [keys, queries]
        if masked:
          pt = jnp.where(mask, pt, 0.0)
        plgpu.barrier_wait(do_bar.at[slot])
        dv = _mma(spec, dv, pt.astype(dtype), do_smem.at[slot])
        dpt = _dot(spec, v_smem.at[wg], do_smem.at[slot], WG_ROWS, bq, transpose_b=True)
        dst = pt * (dpt - _cols(_cast(spec, delta_smem[slot], COL), shape))
        plgpu.barrier_arrive(do_free.at[slot])
        if t is not None:
          dst = dst * (1.0 - t * t)
        dk = _mma(spec, dk, dst.astype(dtype), q_smem.at[slot])
        plgpu.barrier_arrive(q_free.at[slot])
        return dk, dv

      a, z = _full_range_t(spec, k0, WG_ROWS, lo, hi)

      def head(gi, carry):
        n0 = gi * count
        return _consume(lambda j, c, masked: step(j, c, masked, n0), (lo, a, z, hi + 1), carry)

      zeros = _cast(spec, jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
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
      _produce(load, (q_free, do_free), 0, g * count, stages)

  smem = [_smem((COMPUTE_WGS, WG_ROWS, d), dtype), _smem((COMPUTE_WGS, WG_ROWS, d), dtype),
          _smem((stages, bq, d), dtype), _smem((stages, bq, d), dtype),
          plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
          plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.int32) if spec.segments else None,
          plgpu.SMEM((stages, bq), jnp.int32) if spec.segments else None]
  n_in = 3 if spec.segments else 2

  def entry(*refs):
    pl.run_scoped(
        lambda *scratch: kernel(*refs, scratch), smem,
        (plgpu.Barrier(num_arrivals=n_in, num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_arrivals=3 if spec.segments else 2, num_barriers=stages),
         plgpu.Barrier(num_arrivals=2, num_barriers=stages)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
        collective_axes="wg")

  segs = [q_seg, k_seg] if spec.segments else []
  outs = [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)]
  return _kernel(entry, spec, outs, segs + [q, k, v, do, lse, delta], (tk // spec.block_k, kvh, b),
                 ("k", "h", "b"))
