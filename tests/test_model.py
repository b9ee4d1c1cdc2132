"""The model's invariants: relative positions, masking, GQA, the dtype policy, parameter naming."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import base_config
from jaxlm.kernels.masking import MASKED
from jaxlm.models import Transformer
from jaxlm.models import rope
from jaxlm.models.attention import causal_blocked_attention, dot_product_attention
from jaxlm.models.compute import Compute
from jaxlm.models.layers import dense

COMPUTE_FIELDS = {f.name for f in dataclasses.fields(Compute)}


def tiny(**overrides):
  """A small architecture; an unknown field is an error (the config is locked)."""
  m = base_config().model
  m.lock()
  m.update(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
           max_seq_len=32)
  m.update(overrides)
  return m


def build(seed=0, **overrides):
  """A tiny Transformer: `Compute` fields go to its Compute, the rest to the architecture."""
  compute = {k: overrides.pop(k) for k in list(overrides) if k in COMPUTE_FIELDS}
  return Transformer(tiny(**overrides), nnx.Rngs(seed), Compute(**compute))


@pytest.mark.fast
@pytest.mark.parametrize("scaling", ["none", "linear", "llama3", "yarn"])
def test_rope_scores_depend_only_on_relative_offset(scaling):
  cfg = tiny(rope_scaling=scaling, rope_scaling_factor=4.0, rope_original_max_len=16)
  inv, scale = rope.inverse_frequencies(cfg, 16)
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def score(pq, pk):
    rq = rope.apply_rope(q, jnp.array([[pq]]), inv, scale)
    rk = rope.apply_rope(k, jnp.array([[pk]]), inv, scale)
    return float(jnp.sum(rq * rk))

  for offset in (0, 3, 11):
    scores = [score(start + offset, start) for start in (0, 5, 40, 1000)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-5)
  assert abs(score(7, 0) - score(0, 0)) > 1e-3  # and position does matter


@pytest.mark.fast
def test_rope_scalings_change_low_frequencies_only_where_documented():
  base_inv, _ = rope.inverse_frequencies(tiny(), 64)
  lin, _ = rope.inverse_frequencies(tiny(rope_scaling="linear", rope_scaling_factor=8.0), 64)
  np.testing.assert_allclose(lin, base_inv / 8, rtol=1e-6)
  l3, _ = rope.inverse_frequencies(
      tiny(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=8192,
           rope_theta=500000.0), 64)
  b3, _ = rope.inverse_frequencies(tiny(rope_theta=500000.0), 64)
  assert l3[0] == pytest.approx(b3[0])  # highest frequency kept
  assert l3[-1] == pytest.approx(b3[-1] / 8)  # lowest frequency fully scaled
  _, yarn_scale = rope.inverse_frequencies(tiny(rope_scaling="yarn", rope_scaling_factor=4.0), 64)
  assert yarn_scale == pytest.approx(0.1 * np.log(4.0) + 1)


@pytest.fixture(scope="module")
def model():
  return build()


@pytest.mark.fast
def test_causal_mask_future_tokens_do_not_change_past_logits(model):
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 97)
  a, b = model(tokens), model(changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert not np.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@pytest.mark.fast
def test_segment_mask_isolates_packed_documents(model):
  tokens = jax.random.randint(jax.random.key(3), (1, 16), 0, 97)
  segments = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  changed = tokens.at[0, 2].set((tokens[0, 2] + 5) % 97)  # a token inside document 1
  a = model(tokens, positions, segments)
  b = model(changed, positions, segments)
  np.testing.assert_allclose(a[:, 6:], b[:, 6:], atol=1e-6)  # document 2 unaffected
  assert not np.allclose(a[:, 2:6], b[:, 2:6], atol=1e-3)
  # document 2 alone, from position 0, gives the same logits as inside the packed row
  alone = model(tokens[:, 6:], positions[:, 6:], segments[:, 6:])
  np.testing.assert_allclose(a[:, 6:], alone, atol=1e-5)


@pytest.mark.fast
def test_sliding_window_limits_what_a_query_sees():
  m = build(sliding_window=4, num_layers=1)
  tokens = jax.random.randint(jax.random.key(4), (1, 16), 0, 97)
  changed = tokens.at[0, 3].set((tokens[0, 3] + 1) % 97)
  a, b = m(tokens), m(changed)
  np.testing.assert_allclose(a[:, 7:], b[:, 7:], atol=1e-6)  # one layer: keys 4 back only
  assert not np.allclose(a[:, 3:7], b[:, 3:7], atol=1e-4)


@pytest.mark.fast
@pytest.mark.parametrize("scan", [True, False])
def test_gqa_equals_mha_with_repeated_kv_heads(scan):
  gqa = build(num_kv_heads=2, scan_layers=scan)
  mha = build(1, num_kv_heads=4, scan_layers=scan)
  g_state, m_state = nnx.state(gqa, nnx.Param), nnx.state(mha, nnx.Param)
  m_pure, g_pure = nnx.to_pure_dict(m_state), nnx.to_pure_dict(g_state)
  kv_axis = -2  # [.., embed, kv_heads, head_dim]

  def copy(dst, src):
    for key, value in src.items():
      if isinstance(value, dict):
        copy(dst[key], value)
      elif key in ("k", "v"):
        dst[key] = jnp.repeat(value, 2, axis=kv_axis)  # MHA head i uses GQA head i // 2
      else:
        dst[key] = value
  if scan:
    copy(m_pure, g_pure)
  else:
    for i in range(2):
      copy(m_pure["blocks"][i], g_pure["blocks"][i])
    for key in ("embed", "final_norm"):
      m_pure[key] = g_pure[key]
  nnx.replace_by_pure_dict(m_state, m_pure)
  nnx.update(mha, m_state)
  tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 97)
  np.testing.assert_allclose(gqa(tokens), mha(tokens), atol=1e-5)


@pytest.mark.fast
def test_scan_and_unrolled_layers_agree():
  scanned = build(scan_layers=True)
  unrolled = build(scan_layers=False)
  state = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  target = nnx.state(unrolled, nnx.Param)
  pure = nnx.to_pure_dict(target)
  for i in range(2):
    pure["blocks"][i] = jax.tree.map(lambda x: x[i], state["blocks"])
  pure["embed"], pure["final_norm"] = state["embed"], state["final_norm"]
  nnx.replace_by_pure_dict(target, pure)
  nnx.update(unrolled, target)
  tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, 97)
  np.testing.assert_allclose(scanned(tokens), unrolled(tokens), atol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(mlp_kind="geglu", norm_kind="layernorm", position_kind="learned", tie_embeddings=False),
    dict(mlp_kind="gelu", qk_norm=True, attention_bias=True, mlp_bias=True,
         attn_logit_softcap=20.0, final_logit_softcap=10.0, remat_policy="dots"),
    dict(compute_dtype="bfloat16", remat_policy="full"),
    dict(matmul_dtype="bfloat16", attention_blocks=3, scan_layers=False),
])
def test_variants_run_and_keep_float32_params(overrides):
  m = build(**overrides)
  logits = m(jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, 97) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  if overrides.get("final_logit_softcap"):
    assert float(jnp.abs(logits).max()) <= 10.0


@pytest.mark.fast
def test_every_parameter_has_logical_axes_for_each_dimension(model):
  state = nnx.state(model, nnx.Param)
  names = {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", None}
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var[...].ndim, path
    assert set(axes) <= names, path


@pytest.mark.parametrize("blocks,window,seq", [(4, 0, 16), (3, 0, 13), (5, 4, 13), (2, 0, 1)])
def test_blocked_attention_equals_the_reference(blocks, window, seq):
  ks = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(ks[0], (2, seq, 4, 8))
  k, v = (jax.random.normal(kk, (2, seq, 2, 8)) for kk in ks[1:])
  segments = jnp.asarray(np.repeat([[1, 2], [1, 1]], [seq - seq // 3, seq // 3], axis=1))
  slots = jnp.broadcast_to(jnp.arange(seq), (2, seq))

  def ref(q, k, v):
    return dot_product_attention(q, k, v, slots, slots, segments, segments, window=window, softcap=5.0)

  def blocked(q, k, v):
    return causal_blocked_attention(q, k, v, segments, blocks, window=window, softcap=5.0)

  # jitted: run eagerly, every op of the block loops compiles on its own (a minute a case)
  np.testing.assert_allclose(jax.jit(blocked)(q, k, v), jax.jit(ref)(q, k, v), atol=1e-6)
  loss = lambda f: lambda *a: (f(*a) * jnp.cos(jnp.arange(8.0))).sum()
  grad = lambda f: jax.jit(jax.grad(loss(f), (0, 1, 2)))
  for got, want in zip(grad(blocked)(q, k, v), grad(ref)(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("transpose_w,x_dtype", [(False, jnp.float32), (True, jnp.float32), (False, jnp.bfloat16)])
def test_bf16_matmul_matches_float32_in_value_and_gradient(transpose_w, x_dtype):
  x = jax.random.normal(jax.random.key(8), (3, 32, 64)).astype(x_dtype)
  w = jax.random.normal(jax.random.key(9), (48, 64) if transpose_w else (64, 48))

  probe = jax.random.normal(jax.random.key(10), (3, 32, 48))

  def loss(x, w, compute):
    out = dense(x, w, compute, out_dtype=jnp.float32, transpose_w=transpose_w)
    return (out * probe).sum(), out

  bf16 = Compute(matmul_dtype="bfloat16", copy_transposes=True)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)(x, w, bf16)
  (_, ref_out), ref_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x.astype(jnp.float32), w, Compute())
  assert out.dtype == jnp.float32 and grads[0].dtype == x_dtype and grads[1].dtype == jnp.float32
  scale = lambda a: float(jnp.abs(a).max())
  assert scale(out - ref_out) <= 2e-2 * scale(ref_out)
  for got, want in zip(grads, ref_grads):
    assert 0 < scale(got.astype(jnp.float32) - want) <= 3e-2 * scale(want)  # bf16 operands: close, not equal


@pytest.mark.fast
def test_padded_vocabulary_rows_are_never_predicted():
  plain = build()
  padded = build(vocab_multiple=64)  # 97 ids -> 128 embedding rows
  assert padded.embed[...].shape == (128, 32)
  pure = nnx.to_pure_dict(nnx.state(padded, nnx.Param))
  pure["embed"] = jnp.zeros((128, 32)).at[:97].set(plain.embed[...])
  state = nnx.state(padded, nnx.Param)
  nnx.replace_by_pure_dict(state, {**nnx.to_pure_dict(nnx.state(plain, nnx.Param)), "embed": pure["embed"]})
  nnx.update(padded, state)
  tokens = jax.random.randint(jax.random.key(11), (2, 12), 0, 97)
  a, b = plain(tokens), padded(tokens)
  assert b.shape == (2, 12, 128) and bool((b[..., 97:] == MASKED).all())
  np.testing.assert_allclose(b[..., :97], a, atol=1e-6)  # the real ids' logits are unchanged
  np.testing.assert_allclose(jax.nn.logsumexp(b, -1), jax.nn.logsumexp(a, -1), atol=1e-5)
