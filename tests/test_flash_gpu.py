"""The Mosaic GPU (Hopper) flash-attention kernels, without a GPU.

Two checks that need no GPU:
  * semantics: the kernels run under Pallas' GPU interpreter ("gpu_interpret"), which simulates
    the warp groups as threads, shared memory, TMA copies and mbarriers (it fails on a barrier
    phase nobody observed) with its happens-before race detector on, and must match the float32
    reference in value and dq/dk/dv with no race reported. (The simulated threads block inside
    XLA's CPU thread pool; the 8 host devices conftest.py sets give it enough threads.)
  * compilation: the forward and both backward kernels lower for CUDA through Mosaic GPU down to
    its LLVM/NVVM module with the wgmma instructions, at sequence 8192, as they would on an H100.
What neither proves is speed or ptxas; benchmarks/attention.py measures those on a GPU. On a
machine with a Hopper GPU the same value/gradient cases also run on the real kernels ("gpu").
"""

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.kernels import flash_gpu
from jaxlm.kernels.flash_attention import flash_attention
from jaxlm.models import compute

# the interpreter everywhere; the hardware too where this process has a Hopper GPU
BACKENDS = ["gpu_interpret"] + (["gpu"] if jax.default_backend() == "gpu" and not flash_gpu.unsupported_gpu() else [])


def reference(q, k, v, q_seg, k_seg, causal, window, softcap):
  """Float32 attention with every mask written out; rows that see no key are zero."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  t, s = q.shape[1], k.shape[1]
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, 2), jnp.repeat(v, groups, 2)
  scores = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  qp, kp = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
  mask = jnp.ones((t, s), bool)
  if causal:
    mask &= kp <= qp
  if window:
    mask &= qp - kp < window
    if not causal:
      mask &= kp - qp < window
  mask = mask[None, None]
  if q_seg is not None:
    mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
  p = jnp.where(mask, jax.nn.softmax(jnp.where(mask, scores, -1e30), -1), 0.0)
  return jnp.einsum("bhts,bshd->bthd", p, v)


# (batch, t, s, heads, kv_heads, head_dim, causal, window, softcap, segments, block_k, dtype)
# Each case turns on several features at once: the interpreter simulates every thread, so cases
# are few. Between them: GQA and MQA, causal and not, with and without a window, softcap, segments
# (with t != s, rows that see no key), batch 2, tails (t not a multiple of the 128-row block: one
# block and a partial one, or a single partial block),
# head dims 64, 128 and 256, bfloat16 and float32 inputs.
CASES = {
    "tails_noncausal_window_softcap": (1, 136, 136, 1, 1, 64, False, 50, 5.0, False, 64, jnp.bfloat16),
    "segments_mqa_batch2_causal_window": (2, 100, 100, 2, 1, 64, True, 70, 0.0, True, None, jnp.bfloat16),
    "head_dim_128_gqa_t_ne_s_segments": (1, 96, 128, 4, 2, 128, False, 0, 0.0, True, 64, jnp.bfloat16),
    "head_dim_256_float32": (1, 64, 64, 1, 1, 256, True, 0, 0.0, False, None, jnp.float32),
}


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.timeout(600, method="thread")  # a kernel bug can deadlock the simulated threads
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernels_match_the_reference_in_the_gpu_interpreter(name, backend, capfd):
  b, t, s, h, kvh, d, causal, window, softcap, segments, block_k, dtype = CASES[name]
  keys = jax.random.split(jax.random.key(3), 5)
  q = jax.random.normal(keys[0], (b, t, h, d)).astype(dtype)
  k = jax.random.normal(keys[1], (b, s, kvh, d)).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, kvh, d)).astype(dtype)
  do = jax.random.normal(keys[3], (b, t, h, d))
  q_seg = k_seg = None
  if segments:  # 3 packed documents per row; with t != s some queries see no key at all
    q_seg = jnp.sort(jax.random.randint(keys[4], (b, t), 0, 3), axis=1)
    k_seg = q_seg if s == t else jnp.sort(jax.random.randint(keys[4], (b, s), 1, 3), axis=1)

  def loss(fn):  # (loss, attention output), gradients: one forward pass gives both
    def f(q, k, v):
      out = fn(q, k, v)
      return jnp.sum(out.astype(jnp.float32) * do), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  flash = lambda q, k, v: flash_attention(q, k, v, q_seg, k_seg, causal=causal, window=window,
                                          softcap=softcap, block_k=block_k, backend=backend)
  ref = lambda q, k, v: reference(q, k, v, q_seg, k_seg, causal, window, softcap)
  (_, out), grads = loss(flash)(q, k, v)
  (_, ref_out), ref_grads = loss(ref)(q, k, v)
  errors = {"o": _rel(out, ref_out)}
  errors.update({n: _rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
  assert "RACE DETECTED" not in capfd.readouterr().out  # printed by the interpreter's detector
  print(f"\n{name} ({backend}): max relative error " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
  assert out.dtype == dtype
  for x in (out, *grads):
    assert not np.isnan(np.asarray(x, np.float32)).any()
  # bf16 operands (float32 inputs run as bf16 on the GPU path), float32 accumulation
  assert max(errors.values()) <= 2e-2, errors
  assert max(errors.values()) > 0  # the bf16 path really ran: float32 would agree to ~1e-6


def _lowered_text(t, h, kvh, d, **kw):
  b = 1
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, kvh, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  segments = kw.pop("segments", False)

  def loss(q, k, v, seg):
    s = seg if segments else None
    return jnp.sum(flash_attention(q, k, v, s, s, backend="gpu", **kw).astype(jnp.float32))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return grad.trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("d,kw", [
    (128, dict(causal=True)),
    (64, dict(causal=False, segments=True, window=1024, softcap=30.0)),
    (256, dict(causal=True, window=2048)),
])
def test_gpu_kernels_lower_for_hopper_at_8192(d, kw):
  text = _lowered_text(8192, 16, 8, d, **kw)
  kernels = re.findall(r"stablehlo\.custom_call @mosaic_gpu\w*", text)
  assert len(kernels) == 3, kernels  # forward, dq, dk/dv
  assert text.count("wgmma.mma_async") >= 3  # tensor-core matmuls in every kernel's module


def test_model_flash_lowers_the_gpu_kernels_on_gpu(monkeypatch):
  """On a GPU platform the model's attention='flash' (in the layer scan, under remat) lowers the
  Mosaic GPU kernels, each once for the scanned layer stack: forward, its remat recomputation in
  the backward scan, dq and dK/dV."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxlm.config import base_config  # pylint: disable=g-import-not-at-top
  from jaxlm.models import build_model  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.model.update(vocab_size=256, d_model=128, num_layers=2, num_heads=2, num_kv_heads=1,
                 mlp_dim=256, max_seq_len=300)
  c.compute.update(scan_layers=True, remat_policy="full", attention="flash", compute_dtype="bfloat16")
  graphdef, params = nnx.split(build_model(c, platform="gpu"), nnx.Param)  # backend "gpu"
  tokens = jnp.zeros((2, 300), jnp.int32)  # 300: padded to whole 128-row blocks inside

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(tokens).astype(jnp.float32))

  text = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"stablehlo\.custom_call @mosaic_gpu\w*", text)) == 4


def test_non_hopper_gpus_get_a_clear_error_and_auto_falls_back_to_xla(monkeypatch):
  q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
  a100 = SimpleNamespace(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100-SXM4-80GB")
  monkeypatch.setattr(jax, "devices", lambda *args: [a100])
  assert "Hopper" in flash_gpu.unsupported_gpu()
  with pytest.raises(ValueError, match="needs a Hopper GPU.*A100.*'cudnn' or 'xla'"):
    flash_attention(q, q, q, backend="gpu")
  # Should a measurement make jaxlm's kernel the GPU's "auto", non-Hopper GPUs still run xla.
  monkeypatch.setitem(compute.AUTO_ATTENTION, "gpu", "flash")
  assert compute.resolve_attention("auto", "gpu") == ("xla", "")
  h100 = SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H100 80GB HBM3")
  monkeypatch.setattr(jax, "devices", lambda *args: [h100])
  assert flash_gpu.unsupported_gpu() is None
  assert compute.resolve_attention("auto", "gpu") == ("flash", "gpu")
