"""Building blocks of the Mosaic GPU flash-attention kernels (flash_gpu.py).

Tiles and matmuls (wgmma, with their interpret-mode stand-ins), masks from positions, the ranges of
key/query blocks a warp group sees whole, and the producer/consumer ring that every kernel runs:
one producer warp group streams blocks into shared-memory slots with TMA while COMPUTE_WGS
consumer warp groups compute on them.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxlm.kernels import masking
from jaxlm.kernels.flash_spec import Spec

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


def params():
  return plgpu.CompilerParams(approx_math=True)


def interpret(spec: Spec):
  if not spec.interpret:
    return None
  # JAX exports no name for the GPU interpreter's parameters yet; import it only when asked for, so
  # a JAX that moves it breaks the CPU tests of these kernels, never a GPU run.
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  return InterpretGPUParams(detect_races=True)


def smem_tile(shape, dtype):
  """A shared-memory tile in the swizzled layout wgmma reads: 128-byte rows, 8-row tiles."""
  row = 128 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, row)), plgpu.SwizzleTransform(128)))


def value(x):
  """The array behind a ref (or x itself when it already is a value). Interpret mode only."""
  if isinstance(x, jax.Array) and not isinstance(getattr(x, "aval", None), jax.ref.AbstractRef):
    return x
  return x[...]


def dot(spec: Spec, a, b, m: int, n: int, transpose_b: bool = False):
  """a @ b (or a @ b.T) as a fresh [m, n] float32 value. a: shared-memory ref or registers; b: ref.

  On the GPU this is one wgmma; Pallas' GPU interpreter has wgmma only for untransposed
  shared-memory operands, so there the same operands go through a plain float32-accumulating dot.
  """
  if spec.interpret:
    bv = value(b)
    return lax.dot(value(a), bv.T if transpose_b else bv, preferred_element_type=jnp.float32)

  def body(ref):
    plgpu.wgmma(ref, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b)
    return ref[...]
  return pl.run_scoped(body, plgpu.ACC((m, n), jnp.float32))


def mma(spec: Spec, acc, a, b, transpose_b: bool = False):
  """acc + a @ b, accumulated in place in the wgmma accumulator on the GPU."""
  if spec.interpret:
    return acc + dot(spec, a, b, *acc.shape, transpose_b=transpose_b)
  return pl.run_state(
      lambda r: plgpu.wgmma(r, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b))(plgpu.ACC.init(acc))


def cast(spec: Spec, x, layout):
  """Pins x to a register layout (Pallas' GPU interpreter has no layouts: there it is the identity)."""
  return x if spec.interpret else plgpu.layout_cast(x, layout)


def iota(spec: Spec, shape, dim):
  if spec.interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile: [m] of an [m, n] tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column: [n]


def per_row(x, shape):
  """[m] per-row vector -> [m, n]."""
  return lax.broadcast_in_dim(x, shape, [0])


def per_col(x, shape):
  """[n] per-column vector -> [m, n]."""
  return lax.broadcast_in_dim(x, shape, [1])


def mask(spec: Spec, q0, k0, shape, q_seg=None, k_seg=None, transposed=False):
  """[rows, cols] bool of visible pairs for query rows q0.. and key columns k0.. (swapped if transposed).

  Padded query rows are not masked: their dO is 0 and their output is sliced off."""
  q_dim, k_dim = (1, 0) if transposed else (0, 1)
  if q_seg is not None:
    q_seg = (per_col if transposed else per_row)(q_seg, shape)
    k_seg = (per_row if transposed else per_col)(k_seg, shape)
  return masking.visible(spec, q0 + iota(spec, shape, q_dim), k0 + iota(spec, shape, k_dim), q_seg, k_seg)


def full_range(spec: Spec, q_first, rows: int, lo, hi):
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


def scores(spec: Spec, s):
  """Raw q.k [m, n] f32 -> log2-domain scores, plus tanh for the soft cap's gradient."""
  return masking.scores(spec, s, log2=True)


def full_range_t(spec: Spec, k_first, rows: int, lo, hi):
  """[a, b): query blocks in [lo, hi] whose every query fully sees `rows` keys from k_first.

  The dK/dV kernel's transpose of `full_range`; padded keys and queries need no mask there
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


def ring_stages(resident: int, per_stage: int) -> int:
  """Ring depth: 2 (load the next block while computing on this one) if it fits, else 1."""
  return 2 if resident + 2 * per_stage <= SMEM_BYTES - 1024 else 1


def produce(load, free, first, count, stages: int):
  """The producer warp group: start load(step, slot) for steps 0..count-1 of a ring of slots.

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


def consume(step, ranges, carry):
  """Runs step(j, carry, masked) over [r0, r1) masked, [r1, r2) unmasked, [r2, r3) masked."""
  r0, r1, r2, r3 = ranges
  carry = lax.fori_loop(r0, r1, lambda j, c: step(j, c, True), carry)
  carry = lax.fori_loop(r1, r2, lambda j, c: step(j, c, False), carry)
  return lax.fori_loop(r2, r3, lambda j, c: step(j, c, True), carry)


def launch(kernel, spec: Spec, smem, arrivals, stages: int, outs, args, grid, names):
  """Runs kernel(*refs, (smem, (in_bar, a_bar, b_bar), (a_free, b_free))) on `grid` CTAs of
  COMPUTE_WGS consumer warp groups plus the producer.

  in_bar: one per consumer, for its resident tiles; a_bar, b_bar: per ring slot, for the two
  streamed halves of a step; a_free, b_free: per slot, every consumer arrives when done with it.
  arrivals: how many copies land on in_bar, a_bar and b_bar."""
  n_in, n_a, n_b = arrivals

  def entry(*refs):
    pl.run_scoped(
        lambda *scratch: kernel(*refs, scratch), smem,
        (plgpu.Barrier(num_arrivals=n_in, num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_arrivals=n_a, num_barriers=stages),
         plgpu.Barrier(num_arrivals=n_b, num_barriers=stages)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
        collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=outs, grid=grid, grid_names=names,
      num_threads=COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=params(), interpret=interpret(spec))(*args)


def split_refs(spec: Spec, refs):
  """(q_seg_ref, k_seg_ref) or (None, None), then the rest."""
  if spec.segments:
    return refs[0], refs[1], refs[2:]
  return None, None, refs
