"""jaxlm's Pallas flash-attention kernels against the float32 XLA reference, in interpret mode on CPU.

Relative error is max |flash - reference| / max |reference| (output; for dq, dk, dv the max over
all three reference gradients, see `rel_err`).
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxlm.kernels.flash_attention import (attention_work, backend_for_platform, flash_attention,
                                            resolve_backend)
from jaxlm.kernels.splash import splash_attention
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


@functools.partial(jax.jit, static_argnums=0)
def value_and_grads(f, q, k, v, do):
  """f(q, k, v) and its vjp of do as one compiled program: run eagerly, each op around the kernels
  would compile on its own (most of a case's time)."""
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(do)


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

  out, grads = value_and_grads(flash, q, k, v, do.astype(dtype))
  ref, ref_grads = value_and_grads(lambda *a: reference(*a, *seg, causal, window, softcap),
                                   *(x.astype(jnp.float32) for x in (q, k, v)), do)
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


@settings(max_examples=12, deadline=None, derandomize=True)
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
  out, grads = value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, q_seg, k_seg, causal=False, block_q=8, block_k=8,
                                      backend="interpret"), q, k, v, jnp.ones(q.shape))
  for x in (out,) + grads:
    np.testing.assert_array_equal(np.asarray(x), 0.0)


@pytest.mark.fast
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
  with pytest.raises(ValueError, match="GPU kernels take no q_offset"):
    flash_attention(q, q, q, q_offset=8, backend="gpu_interpret")


@pytest.mark.fast
def test_backend_comes_from_the_caller_or_the_default_backend_only():
  assert [backend_for_platform(p) for p in ("tpu", "cpu", "gpu")] == ["tpu", "interpret", "gpu"]
  assert resolve_backend("auto") == backend_for_platform(jax.default_backend())
  with pytest.raises(ValueError, match="no flash-attention kernel for platform 'metal'"):
    backend_for_platform("metal")


@pytest.mark.fast
def test_kernels_import_nothing_from_the_model_parallel_or_train_layers():
  code = ("import sys, jaxlm.kernels, jaxlm.kernels.splash; "
          "print(sorted(m for m in sys.modules if m.startswith(('jaxlm.models', 'jaxlm.parallel', 'jaxlm.train'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]", out


# ---------------------------------------------------------------------------------------------
# q_offset: queries that are one slice of a longer row (a sequence shard) against all keys


def _offset_case(causal, window, with_segments, seed=0):
  """q/k/v over a whole row of 72 positions (block 8, so shards end mid-block) and a cotangent."""
  b, t, heads, kv_heads, d = 2, 72, 4, 2, 64
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k = jax.random.normal(keys[1], (b, t, kv_heads, d))
  v = jax.random.normal(keys[2], (b, t, kv_heads, d))
  do = jax.random.normal(keys[3], (b, t, heads, d))
  seg = jnp.asarray(segments(np.random.default_rng(seed), b, t, 3)) if with_segments else None
  return q, k, v, do, seg


@pytest.mark.parametrize("quarter", [1, 3])
@pytest.mark.parametrize("causal,window,with_segments", [
    (True, 0, False), (True, 11, False), (False, 11, False), (True, 0, True)])
def test_q_offset_slice_matches_the_full_row(quarter, causal, window, with_segments):
  """One quarter of the query rows with q_offset at its first position gives that quarter of the
  full attention, and the gradients of a loss on that quarter alone: dq of those rows, and dk, dv
  over the whole row."""
  q, k, v, do, seg = _offset_case(causal, window, with_segments)
  n = q.shape[1] // 4
  rows = slice(quarter * n, (quarter + 1) * n)
  do_part = jnp.zeros_like(do).at[:, rows].set(do[:, rows])

  ref, (ref_dq, ref_dk, ref_dv) = value_and_grads(
      lambda q, k, v: reference(q, k, v, seg, seg, causal, window, 0.0), q, k, v, do_part)

  def part(q_rows, k, v):
    q_seg = None if seg is None else seg[:, rows]
    return flash_attention(q_rows, k, v, q_seg, seg, causal=causal, window=window, block_q=8,
                           block_k=8, backend="interpret", q_offset=quarter * n)

  out, (dq, dk, dv) = value_and_grads(part, q[:, rows], k, v, do[:, rows])
  grad_scale = max(float(jnp.max(jnp.abs(r))) for r in (ref_dq, ref_dk, ref_dv))
  errors = [rel_err(out, ref[:, rows]), rel_err(dq, ref_dq[:, rows], grad_scale),
            rel_err(dk, ref_dk, grad_scale), rel_err(dv, ref_dv, grad_scale)]
  assert max(errors) <= TOL["float32"], errors
  assert float(jnp.max(jnp.abs(ref_dk))) > 0  # the slice's loss reaches K at all


def test_q_offset_skips_the_key_blocks_its_rows_cannot_see():
  """Rows 40..55 with causal window 11 see keys 30..55 only: K/V blocks wholly outside (positions
  0..23 and 56..71 in blocks of 8) are made NaN, which any visit would spread into the output or
  dq (NaN * 0 is NaN). Without the offset in the block ranges, the low blocks would be visited."""
  q, k, v, do, _ = _offset_case(True, 11, False)
  first, n = 40, 16
  hidden = np.r_[0:24, 56:72]
  poisoned = [x.at[:, hidden].set(jnp.nan) for x in (k, v)]

  def part(q_rows, k, v):
    return flash_attention(q_rows, k, v, causal=True, window=11, block_q=8, block_k=8,
                           backend="interpret", q_offset=first)

  clean, clean_grads = value_and_grads(part, q[:, first:first + n], k, v, do[:, first:first + n])
  out, (dq, dk, dv) = value_and_grads(part, q[:, first:first + n], *poisoned, do[:, first:first + n])
  seen = np.setdiff1d(np.arange(72), hidden)
  for x in (out, dq, dk[:, seen], dv[:, seen]):
    assert np.all(np.isfinite(np.asarray(x)))
  np.testing.assert_array_equal(out, clean)
  np.testing.assert_array_equal(dq, clean_grads[0])


def test_traced_q_offset_under_jit_and_in_a_sequence_sharded_shard_map():
  q, k, v, _, seg = _offset_case(True, 11, True)
  kw = dict(causal=True, window=11, block_q=8, block_k=8, backend="interpret")
  full = flash_attention(q, k, v, seg, seg, **kw)

  jitted = jax.jit(lambda q, k, v, qs, off: flash_attention(q, k, v, qs, seg, q_offset=off, **kw))
  np.testing.assert_allclose(jitted(q[:, 54:], k, v, seg[:, 54:], jnp.int32(54)), full[:, 54:],
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(jitted(q[:, 18:36], k, v, seg[:, 18:36], 18), full[:, 18:36],
                             rtol=0, atol=1e-6)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("sequence",))
  P = jax.sharding.PartitionSpec

  def local(q, k, v, q_seg, k_seg):
    offset = jax.lax.axis_index("sequence") * q.shape[1]
    return flash_attention(q, k, v, q_seg, k_seg, q_offset=offset, **kw)

  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "sequence"), P(), P(),
                                                              P(None, "sequence"), P()),
                                  out_specs=P(None, "sequence"), check_vma=False))
  np.testing.assert_allclose(sharded(q, k, v, seg, seg), full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal,window,q_len,kv_len,block_q,block_k,offset", [
    (True, 0, 32, 128, 8, 16, 96), (True, 24, 20, 128, 8, 8, 40), (False, 24, 20, 100, 16, 8, 50),
    (False, 0, 20, 100, 16, 8, 30), (True, 5, 16, 64, 8, 8, 100)])
@pytest.mark.fast
def test_attention_work_counts_exactly_the_blocks_with_a_visible_pair(causal, window, q_len, kv_len,
                                                                     block_q, block_k, offset):
  """Brute force over positions: a (query block, key block) pair is visited iff some query row of
  the (padded) block sees some real key of the other."""
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  qp = offset + np.arange(nq * block_q)[:, None]
  kp = np.arange(kv_len)[None, :]
  mask = np.ones(qp.shape[:1] + kp.shape[1:], bool)
  if causal:
    mask &= kp <= qp
  if window:
    mask &= (qp - kp < window) & (causal | (kp - qp < window))
  padded = np.zeros((nq * block_q, nk * block_k), bool)
  padded[:, :kv_len] = mask
  expected = int(padded.reshape(nq, block_q, nk, block_k).any(axis=(1, 3)).sum())
  work = attention_work(q_len, kv_len, causal=causal, window=window, block_q=block_q,
                        block_k=block_k, backend="interpret", q_offset=offset)
  assert work == expected


@pytest.mark.fast
def test_attention_work_of_four_causal_shards_adds_up_to_the_whole_row():
  kw = dict(causal=True, block_q=64, block_k=64, backend="interpret")
  t = 1024
  shards = [attention_work(t // 4, t, q_offset=i * t // 4, **kw) for i in range(4)]
  assert sum(shards) == attention_work(t, t, **kw)
  assert shards == sorted(shards) and shards[-1] > 3 * shards[0]  # later rows see more keys
  windowed = [attention_work(t // 4, t, window=128, q_offset=i * t // 4, **kw) for i in range(4)]
  assert sum(windowed) == attention_work(t, t, window=128, **kw)


# ---------------------------------------------------------------------------------------------
# splash: JAX's TPU splash-attention kernel behind jaxlm's layout, in interpret mode


@pytest.mark.parametrize("causal,window,softcap,with_segments,heads,kv_heads", [
    (True, 0, 0.0, False, 4, 2), (True, 100, 3.0, True, 4, 1), (False, 70, 0.0, False, 2, 2)])
def test_splash_matches_reference(causal, window, softcap, with_segments, heads, kv_heads):
  b, t, d = 2, 256, 64
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k = jax.random.normal(keys[1], (b, t, kv_heads, d))
  v = jax.random.normal(keys[2], (b, t, kv_heads, d))
  do = jax.random.normal(keys[3], (b, t, heads, d))
  seg = jnp.asarray(segments(np.random.default_rng(1), b, t, 3)) if with_segments else None

  def splash(q, k, v):
    return splash_attention(q, k, v, seg, causal=causal, window=window, softcap=softcap,
                            block_q=128, block_kv=128, interpret=True)

  out, grads = value_and_grads(splash, q, k, v, do)
  ref, ref_grads = value_and_grads(
      lambda q, k, v: reference(q, k, v, seg, seg, causal, window, softcap), q, k, v, do)
  grad_scale = max(float(jnp.max(jnp.abs(r))) for r in ref_grads)
  errors = [rel_err(out, ref)] + [rel_err(g, r, grad_scale) for g, r in zip(grads, ref_grads)]
  assert out.shape == q.shape and max(errors) <= TOL["float32"], errors


def test_splash_backward_compiled_ahead_of_time_takes_just_its_arguments():
  q = jnp.ones((1, 256, 2, 64))
  loss = lambda q, k, v: jnp.sum(splash_attention(q, k, v, interpret=True))
  for fn in (loss, jax.grad(loss, argnums=(0, 1, 2))):  # the forward's trace first, as a model step
    compiled = jax.jit(fn).lower(q, q, q).compile()
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(compiled(q, q, q)))


@pytest.mark.fast
def test_splash_rejects_blocks_that_do_not_tile_the_sequence():
  q = jnp.ones((1, 200, 2, 64))
  with pytest.raises(ValueError, match="multiple of 128 that divides the sequence length 200"):
    splash_attention(q, q, q, interpret=True)
