"""KV-cached attention (read-only cache, one write a step) and decoding with bf16 matmul operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import base_config
from jaxlm.inference.precision import with_matmul_dtype
from jaxlm.models import Compute, Transformer
from jaxlm.models.attention import cached_attention, dot_product_attention, write_cache


def tiny_model(compute=Compute(), layers=2):
  m = base_config().model
  m.update(vocab_size=64, d_model=32, num_layers=layers, num_heads=4, num_kv_heads=2, mlp_dim=64,
           max_seq_len=32)
  return Transformer(m, nnx.Rngs(0), compute)


@pytest.mark.fast
@pytest.mark.parametrize("window", [0, 3])
def test_cached_attention_equals_the_reference_over_cache_and_new_keys(window):
  b, t, size, h, kvh, d = 3, 2, 8, 4, 2, 8
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k_new, v_new = jax.random.normal(keys[1], (b, t, kvh, d)), jax.random.normal(keys[2], (b, t, kvh, d))
  # slots at or past a row's start hold stale entries (a rejected draft's): they must not be seen
  k_cache, v_cache = jax.random.normal(keys[3], (b, size, kvh, d)), jax.random.normal(keys[4], (b, size, kvh, d))
  start = jnp.array([0, 3, 6])
  slots = start[:, None] + jnp.arange(t)
  got = cached_attention(q, k_new, v_new, k_cache.transpose(0, 2, 3, 1), v_cache.transpose(0, 2, 1, 3),
                         slots, start, window=window)
  # the reference over [cache, new keys]; a stale cache slot gets a slot past every query (hidden)
  cache_slots = jnp.where(jnp.arange(size)[None] < start[:, None], jnp.arange(size)[None], 10**6)
  want = dot_product_attention(q, jnp.concatenate([k_cache, k_new], 1),
                               jnp.concatenate([v_cache, v_new], 1), slots,
                               jnp.concatenate([cache_slots, slots], 1), window=window)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.fast
def test_write_cache_puts_each_row_at_its_own_slots_and_drops_overflow():
  cache = nnx.eval_shape(tiny_model).init_cache(2, 4)  # needs the config only
  layers, _, kvh, hd, size = cache["k"].shape
  new = {n: jnp.ones((layers, 2, 2, kvh, hd)) * jnp.array([1.0, 2.0])[None, :, None, None, None]
         for n in ("k", "v")}
  out = write_cache(cache, new, jnp.array([1, 3]))  # row 1's second entry (slot 4) is past S = 4
  k, v = np.asarray(out["k"]), np.asarray(out["v"])
  assert (v[:, 0, :, 1:3] == 1).all() and (v[:, 0, :, [0, 3]] == 0).all()
  assert (v[:, 1, :, 3] == 2).all() and (v[:, 1, :, :3] == 0).all()
  assert (k[:, 0, :, :, 1:3] == 1).all() and (k[:, 1, :, :, 3] == 2).all() and (k[:, 1, :, :, :3] == 0).all()


def test_with_matmul_dtype_equals_a_model_built_with_it():
  graphdef, params = nnx.split(tiny_model())
  low_def, low_params = with_matmul_dtype(graphdef, params, "bfloat16")
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(low_params)}
  assert dtypes["['blocks']['mlp']['up'].value"] == jnp.bfloat16  # fed to matmuls only: stored low
  assert dtypes["['embed'].value"] == jnp.float32  # looked up as activations: unchanged
  assert dtypes["['final_norm']['scale'].value"] == jnp.float32
  tokens = jnp.arange(12)[None] % 64
  built = tiny_model(Compute(matmul_dtype="bfloat16"))(tokens)
  got = nnx.merge(low_def, low_params)(tokens)
  np.testing.assert_array_equal(got, built)
  assert float(jnp.abs(got - nnx.merge(graphdef, params)(tokens)).max()) > 0  # it did change
  back_def, back_params = with_matmul_dtype(low_def, low_params, "float32")
  assert nnx.merge(back_def, back_params).compute.matmul == jnp.float32
  with pytest.raises(ValueError, match="float32"):
    with_matmul_dtype(graphdef, params, "float16")
