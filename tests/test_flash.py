"""jaxlm's Pallas flash-attention kernels against the float32 XLA reference, in interpret mode on CPU.

Relative error is max |flash - reference| / max |reference| (output; for dq, dk, dv the max over
all three reference gradients, see `rel_err`).
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxlm.kernels.flash_attention import backend_for_platform, flash_attention, resolve_backend
from jaxlm.models.attention import dot_product_attention

TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def reference(q, k, v, q_seg, k_seg, causal, window, softcap):
  """The float32 XLA reference with slots 0..t-1 and 0..s-1."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  q_slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  k_slots = jnp.broadcast_to(jnp.arange(s), (b, s))
  f32 = lambda x: x.astype(jnp.float32)
  return dot_product_attention(f32(q), f32(k), f32(v), q_slots, k_slots, q_seg, k_seg,
                               window=window, softcap=softcap, causal=causal)


def visible_rows(b, t, s, q_seg, k_seg, causal, window):
  """[b, t] bool: the query row sees at least one key."""
  qp, kp = np.arange(t)[:, None], np.arange(s)[None, :]
  mask = np.ones((t, s), bool)
  if causal:
    mask &= kp <= qp
  if window:
    mask &= (qp - kp < window) if causal else (np.abs(qp - kp) < window)
  mask = np.broadcast_to(mask, (b, t, s))
  if q_seg is not None:
    mask = mask & (np.asarray(q_seg)[:, :, None] == np.asarray(k_seg)[:, None, :])
  return mask.any(-1)


def rel_err(a, r, scale=None):
  """max |a - r| / scale, scale = max |r| by default.

  Gradients are compared with scale = the largest reference entry of dq, dk and dv together: dq
  is exactly 0 in the reference when every query sees a single key (window 1), where the kernel's
  ds = p * (dp - delta) leaves f32 roundoff, and a ratio to ~0 would measure nothing.
  """
  a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
  if a.size == 0:
    return 0.0
  scale = np.max(np.abs(r)) if scale is None else scale
  return float(np.max(np.abs(a - r)) / max(scale, 1e-30))


def segments(rng, b, n, docs):
  """Packed-document ids: [b, n] non-decreasing ints in [0, docs)."""
  return np.sort(rng.integers(0, docs, (b, n)), axis=1).astype(np.int32)


def check_against_reference(b, t, s, heads, kv_heads, d, dtype, causal, window, softcap, seg_kind,
                            block_q, block_k, seed=0):
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, s, kv_heads, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, kv_heads, d), jnp.float32).astype(dtype)
  q_seg = k_seg = None
  if seg_kind == "same" and s == t:
    q_seg = k_seg = segments(rng, b, t, 3)
  elif seg_kind != "none":  # independent ids: some query rows see no key at all
    q_seg, k_seg = segments(rng, b, t, 4), segments(rng, b, s, 4)
  seen = visible_rows(b, t, s, q_seg, k_seg, causal, window)
  # rows that see nothing are defined differently (flash: zeros; reference: mean of v), so their
  # cotangent is zeroed for both and their outputs are checked separately
  do = jax.random.normal(keys[3], (b, t, heads, d), jnp.float32) * seen[:, :, None, None]
  seg = (None, None) if q_seg is None else (jnp.asarray(q_seg), jnp.asarray(k_seg))

  def flash(q, k, v):
    return flash_attention(q, k, v, *seg, causal=causal, window=window, softcap=softcap,
                           block_q=block_q, block_k=block_k, backend="interpret")

  out, vjp = jax.vjp(flash, q, k, v)
  grads = vjp(do.astype(dtype))
  ref, ref_vjp = jax.vjp(lambda *a: reference(*a, *seg, causal, window, softcap),
                         *(x.astype(jnp.float32) for x in (q, k, v)))
  ref_grads = ref_vjp(do)
  for x in (out,) + grads:
    assert np.all(np.isfinite(np.asarray(x, np.float32))), "NaN/inf in flash attention"
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  np.testing.assert_array_equal(np.asarray(out, np.float32)[~seen], 0.0)  # fully masked rows: zeros
  errors = [rel_err(np.asarray(out, np.float32)[seen], np.asarray(ref)[seen])]
  grad_scale = max(float(np.max(np.abs(np.asarray(r)))) for r in ref_grads)
  errors += [rel_err(g, r, grad_scale) for g, r in zip(grads, ref_grads)]
  return errors


@st.composite
def cases(draw):
  kv_heads = draw(st.sampled_from([1, 2]))
  block_q = draw(st.sampled_from([8, 16, 32]))
  block_k = draw(st.sampled_from([8, 16, 32]))
  causal = draw(st.booleans())
  t = draw(st.integers(1, 72))
  s = t if causal or draw(st.booleans()) else draw(st.integers(1, 72))  # cross lengths: non-causal
  return dict(
      b=draw(st.integers(1, 2)), t=t, s=s, heads=kv_heads * draw(st.sampled_from([1, 2, 3])),
      kv_heads=kv_heads, d=draw(st.sampled_from([64, 128, 256])),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])), causal=causal,
      window=draw(st.sampled_from([0, 0, 1, 5, 24])), softcap=draw(st.sampled_from([0.0, 0.0, 2.0])),
      seg_kind=draw(st.sampled_from(["none", "same", "independent"])), block_q=block_q, block_k=block_k)


WORST = {}  # dtype -> worst error seen by the sweep (printed with -s)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(cases())
def test_flash_matches_reference_sweep(case):
  errors = check_against_reference(**case)
  name = jnp.dtype(case["dtype"]).name
  WORST[name] = max(WORST.get(name, 0.0), max(errors))
  print(f"\nflash vs reference {name}: out/dq/dk/dv rel err {errors} (worst so far {WORST[name]:.2e}) {case}")
  assert max(errors) <= TOL[name], (case, errors)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_gqa_window_softcap_segments_tails(dtype):
  """One fixed case with everything on: several blocks, non-multiple lengths, GQA 3:1."""
  errors = check_against_reference(2, 45, 45, 6, 2, 64, dtype, True, 13, 3.0, "same", 16, 8)
  assert max(errors) <= TOL[jnp.dtype(dtype).name], errors


def test_fully_masked_rows_are_zero_and_finite():
  q = jnp.ones((1, 20, 2, 64))
  k = v = jnp.ones((1, 20, 1, 64))
  q_seg = jnp.full((1, 20), 1, jnp.int32)
  k_seg = jnp.full((1, 20), 2, jnp.int32)  # no query shares a segment with any key
  out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, q_seg, k_seg, causal=False,
                                                     block_q=8, block_k=8, backend="interpret"),
                     q, k, v)
  grads = vjp(jnp.ones_like(out))
  for x in (out,) + grads:
    np.testing.assert_array_equal(np.asarray(x), 0.0)


def test_bad_arguments_are_clear_errors():
  q = jnp.ones((1, 8, 3, 64))
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    flash_attention(q, q[:, :, :2], q[:, :, :2], backend="interpret")
  with pytest.raises(ValueError, match="both q_segments and k_segments"):
    flash_attention(q, q, q, jnp.ones((1, 8), jnp.int32), backend="interpret")
  with pytest.raises(ValueError, match="unknown flash-attention backend"):
    flash_attention(q, q, q, backend="triton")
  with pytest.raises(ValueError, match="head_dim 64, 128, 192 or 256"):
    flash_attention(q[..., :48], q[..., :48], q[..., :48], backend="gpu")
  with pytest.raises(ValueError, match="block_q is fixed at 128"):
    flash_attention(q, q, q, block_q=64, backend="gpu")
  with pytest.raises(ValueError, match="block_k must be 64, 128, 192 or 256"):
    flash_attention(q, q, q, block_k=96, backend="gpu")


def test_backend_comes_from_the_caller_or_the_default_backend_only():
  assert [backend_for_platform(p) for p in ("tpu", "cpu", "gpu")] == ["tpu", "interpret", "gpu"]
  assert resolve_backend("auto") == backend_for_platform(jax.default_backend())
  with pytest.raises(ValueError, match="no flash-attention kernel for platform 'metal'"):
    backend_for_platform("metal")


def test_kernels_import_nothing_from_the_model_parallel_or_train_layers():
  code = ("import sys, jaxlm.kernels; "
          "print(sorted(m for m in sys.modules if m.startswith(('jaxlm.models', 'jaxlm.parallel', 'jaxlm.train'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]", out
