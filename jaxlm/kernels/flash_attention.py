"""jaxlm's flash attention: public entry point, custom_vjp, padding and backend choice.

`flash_attention(q, k, v, ...)` takes the model's layout (q [batch, t, heads, head_dim], k/v
[batch, s, kv_heads, head_dim]) and matches `jaxlm.models.attention.dot_product_attention` with
slots 0..t-1 and 0..s-1. Memory is linear in sequence length: the forward pass saves only its
output and the row log-sum-exp, and the backward kernels recompute probabilities block by block.

Backends
  "tpu"            Pallas Mosaic TPU (`flash_tpu.py`).
  "interpret"      the TPU kernels run by Pallas' interpreter: CPU tests and CPU training.
  "gpu"            Pallas Mosaic GPU for Hopper (`flash_gpu.py`).
  "gpu_interpret"  the GPU kernels run by Pallas' GPU interpreter on CPU (threads, shared memory,
                   TMA and barriers simulated): tests of the GPU kernels without a GPU. Slow.
  "auto"           from `jax.default_backend()` alone: tpu on TPU, gpu on GPU, interpret on CPU.
                   Callers compiling for devices other than the default ones (abstract TPU
                   devices on a CPU host, a mesh of another platform) must name the backend,
                   e.g. `backend_for_platform(mesh.devices.flat[0].platform)`.

Sequence lengths need not be multiples of the blocks: q/k/v are zero-padded to block multiples
here, padded keys are masked in the kernel by the static real length, and padded query rows are
sliced off (their cotangent is zero, so they add nothing to dK/dV).

Rows whose every key is masked (possible only when query and key segment ids differ) output
zeros and get zero gradients. The XLA reference instead gives such a row uniform weights over all
keys; tests compare only rows with a visible key and assert no NaN anywhere.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlm.kernels import flash_gpu, flash_tpu
from jaxlm.kernels.flash_spec import Spec, visited_blocks

# Default (block_q, block_k) of the TPU kernels. TPU: 512x512 keeps the f32 score tile at 1 MiB and
# the MXU busy with head_dim 64..256 while fitting the 16 MiB default scoped VMEM of v5e with double
# buffering; interpret: small blocks so CPU tests run many blocks. The GPU kernels' blocks are
# fixed by their warp-group structure except the forward's block_k (flash_gpu.default_block_k).
DEFAULT_BLOCKS = {"tpu": (512, 512), "interpret": (128, 128)}
_ALIGN = {"tpu": 128, "interpret": 8}  # Mosaic TPU: whole (8, 128) tiles


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


BACKENDS = ("tpu", "interpret", "gpu", "gpu_interpret")


def backend_for_platform(platform: str) -> str:
  """The kernel backend for devices of `platform` ("tpu", "cpu" or "gpu", as `Device.platform`)."""
  backends = {"tpu": "tpu", "cpu": "interpret", "gpu": "gpu"}
  if platform not in backends:
    raise ValueError(f"no flash-attention kernel for platform {platform!r}; choose {' | '.join(backends)}")
  return backends[platform]


def resolve_backend(backend: str = "auto") -> str:
  if backend == "auto":
    backend = backend_for_platform(jax.default_backend())
  if backend not in BACKENDS:
    raise ValueError(f"unknown flash-attention backend {backend!r}; choose {' | '.join(BACKENDS)} | auto")
  return backend


def _block(requested: int | None, default: int, length: int, align: int) -> int:
  """Block size: the request (or default), never longer than the aligned sequence."""
  size = requested or default
  if size % align:
    raise ValueError(f"block size {size} must be a multiple of {align} on this backend")
  return min(size, round_up(length, align))


def tpu_blocks(backend: str, t: int, s: int, block_q: int | None, block_k: int | None):
  """(block_q, block_k) of the TPU kernels (tpu or interpret backend) for lengths t and s."""
  default_q, default_k = DEFAULT_BLOCKS[backend]
  align = _ALIGN[backend]
  return _block(block_q, default_q, t, align), _block(block_k, default_k, s, align)


def attention_work(q_len: int, kv_len: int, *, causal: bool = True, window: int = 0,
                   block_q: int | None = None, block_k: int | None = None, backend: str = "auto",
                   q_offset: int = 0) -> int:
  """(query block, key block) pairs that `flash_attention` with these arguments computes per
  (batch, head) in its forward and dq kernels (dK/dV visits the same pairs): how much attention
  work a call, e.g. one sequence shard's (q_len = the local rows, q_offset = its first row's
  position), does. Segment ids hide no whole block, so they do not change it. TPU and interpret
  backends (the ones that take q_offset)."""
  backend = resolve_backend(backend)
  if backend not in DEFAULT_BLOCKS:
    raise ValueError(f"attention_work counts the TPU kernels' blocks; backend {backend!r} has none")
  bq, bk = tpu_blocks(backend, q_len, kv_len, block_q, block_k)
  spec = Spec(causal=bool(causal), window=int(window), softcap=0.0, scale=1.0, q_len=q_len,
              kv_len=kv_len, block_q=bq, block_k=bk, groups=1, segments=False,
              interpret=backend == "interpret")
  return visited_blocks(spec, q_offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, k_seg, q_off, spec):
  return _forward(spec, q, k, v, q_seg, k_seg, q_off)[0]


def _forward(spec, q, k, v, q_seg, k_seg, q_off):
  if spec.gpu:  # q_off is 0 here: flash_attention rejects an offset on the GPU backends
    return flash_gpu.forward(spec, q, k, v, q_seg, k_seg)
  return flash_tpu.forward(spec, q, k, v, q_off, q_seg, k_seg)


def _flash_fwd(q, k, v, q_seg, k_seg, q_off, spec):
  o, lse = _forward(spec, q, k, v, q_seg, k_seg, q_off)
  return o, (q, k, v, q_seg, k_seg, q_off, o, lse)


def _flash_bwd(spec, res, do):
  q, k, v, q_seg, k_seg, q_off, o, lse = res
  if spec.gpu:
    dq, dk, dv = flash_gpu.backward(spec, q, k, v, o, lse, do, q_seg, k_seg)
  else:
    dq, dk, dv = flash_tpu.backward(spec, q, k, v, o, lse, do, q_off, q_seg, k_seg)
  return dq, dk, dv, None, None, None  # segment ids and the offset are integers: no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def _gpu_call(q, k, v, q_segments, k_segments, spec_args, block_k, interpret):
  """The GPU kernels' layout: token-major, lengths padded to whole CTAs; float32 runs as bf16."""
  b, t, h, d = q.shape
  s = k.shape[1]
  if d % 64 or d > 256:
    raise ValueError(f"the GPU flash kernel takes head_dim 64, 128, 192 or 256, not {d}")
  bq, bk = flash_gpu.CTA_ROWS, block_k or flash_gpu.default_block_k(d)
  if bk % 64 or bk > 256:
    raise ValueError(f"GPU flash block_k must be 64, 128, 192 or 256, not {bk}")
  tq, tk = round_up(t, bq), round_up(s, math.lcm(bk, bq))
  dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16  # wgmma operands
  spec = Spec(**spec_args, block_q=bq, block_k=bk, interpret=interpret, gpu=True)

  def pad(x, n):
    return jnp.pad(x.astype(dtype), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))

  q_seg = k_seg = None
  if q_segments is not None:
    q_seg = jnp.pad(q_segments.astype(jnp.int32), ((0, 0), (0, tq - t)))
    k_seg = jnp.pad(k_segments.astype(jnp.int32), ((0, 0), (0, tk - s)))
  o = _flash(pad(q, tq), pad(k, tk), pad(v, tk), q_seg, k_seg, jnp.zeros((1,), jnp.int32), spec)
  return o[:, :t].astype(q.dtype)


def flash_attention(q, k, v, q_segments=None, k_segments=None, *, causal: bool = True,
                    window: int = 0, softcap: float = 0.0, block_q: int | None = None,
                    block_k: int | None = None, backend: str = "auto", q_offset=None):
  """Flash attention. q: [batch, t, heads, head_dim]; k, v: [batch, s, kv_heads, head_dim].

  segments: [batch, t] and [batch, s] int (both or neither): a query sees only keys of its own
  segment. causal: key position <= query position. window > 0: additionally q - k < window
  (non-causal: |q - k| < window). softcap > 0: scores become softcap * tanh(scores / softcap).
  heads must be a multiple of kv_heads (GQA/MQA); K/V are never repeated. Returns
  [batch, t, heads, head_dim] in q's dtype. Differentiable in q, k, v (custom_vjp).

  q_offset: None (0) or an int / int32 scalar, possibly traced: query row i is at position
    q_offset + i while key j stays at j, and the causal/window masks and the block skipping use
    those positions. For sequence-sharded queries against all keys, e.g. inside shard_map:
    q_offset = jax.lax.axis_index("sequence") * local_len; each shard then computes only the key
    blocks its rows see (`attention_work` counts them). TPU and interpret backends only.
  backend: see the module docstring; "auto" follows `jax.default_backend()` only.
  block_q, block_k (None: the backend's default):
    tpu, interpret  query rows and keys per block of all three kernels (forward, dq, dK/dV);
                    multiples of 128 on TPU, of 8 in interpret mode.
    gpu             block_q must be None or 128: forward and dq CTAs own 128 query rows, and the
                    dK/dV kernel steps through queries 64 at a time. block_k is the keys per step of
                    the forward kernel only (64..256, default `flash_gpu.default_block_k`); the dq
                    kernel steps through keys 64 at a time and dK/dV CTAs own 128 keys regardless.
  """
  backend = resolve_backend(backend)
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  if h % kvh:
    raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kvh})")
  if (q_segments is None) != (k_segments is None):
    raise ValueError("give both q_segments and k_segments, or neither")
  spec_args = dict(causal=bool(causal), window=int(window), softcap=float(softcap),
                   scale=float(d) ** -0.5, q_len=t, kv_len=s, groups=h // kvh,
                   segments=q_segments is not None)
  if backend in ("gpu", "gpu_interpret"):
    if q_offset is not None:
      raise ValueError("flash attention's GPU kernels take no q_offset yet (their block ranges and "
                       "masks would need the offset as a shared-memory scalar); on GPU gather the "
                       "sequence and slice the output, or use model.attention='xla'")
    if backend == "gpu" and (why := flash_gpu.unsupported_gpu()):
      raise ValueError(f"{why}. Use model.attention='cudnn' or 'xla' there")
    if block_q not in (None, 0, flash_gpu.CTA_ROWS):
      raise ValueError(f"GPU flash block_q is fixed at {flash_gpu.CTA_ROWS} (2 warp groups x 64 rows); "
                       f"got {block_q}: leave model.flash_block_q at 0")
    return _gpu_call(q, k, v, q_segments, k_segments, spec_args, block_k, backend == "gpu_interpret")
  bq, bk = tpu_blocks(backend, t, s, block_q, block_k)
  tq, tk = round_up(t, bq), round_up(s, bk)
  spec = Spec(**spec_args, block_q=bq, block_k=bk, interpret=backend == "interpret")

  def head_major(x, length):  # [b, n, heads, d] -> [b, heads, padded n, d]
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

  q_seg = k_seg = None
  if q_segments is not None:
    q_seg = jnp.pad(q_segments.astype(jnp.int32), ((0, 0), (0, tq - t)))[:, :, None]  # [b, tq, 1]
    k_seg = jnp.pad(k_segments.astype(jnp.int32), ((0, 0), (0, tk - s)))[:, None, :]  # [b, 1, tk]
  q_off = jnp.reshape(jnp.asarray(0 if q_offset is None else q_offset, jnp.int32), (1,))
  o = _flash(head_major(q, tq), head_major(k.astype(q.dtype), tk), head_major(v.astype(q.dtype), tk),
             q_seg, k_seg, q_off, spec)
  return jnp.swapaxes(o[:, :, :t], 1, 2)
