"""Pipeline parallelism: the GPipe schedule computes exactly the sequential layer stack, and the
pipelined layouts train like one device, with the layer stack really split over the stage axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_parallel import rel_err, run, tiny_config

from jaxlm.config import ConfigError
from jaxlm.parallel.mesh import resolve_mesh
from jaxlm.parallel.pipeline import bubble_fraction, gpipe


def _stage(params, x, extras):  # one stage = its layers in order; extras shift each row
  def layer(x, w):
    return jnp.tanh(x @ w + extras["shift"][:, None, None]), None
  return jax.lax.scan(layer, x, params)[0]


@pytest.mark.parametrize("stages,microbatches", [(1, 1), (2, 4), (4, 4), (4, 8), (3, 2)])
def test_gpipe_equals_the_sequential_stack_in_value_and_gradient(stages, microbatches):
  layers, rows = 12, 8
  w = jax.random.normal(jax.random.key(0), (layers, 6, 6)) * 0.5
  x = jax.random.normal(jax.random.key(1), (rows, 3, 6))
  extras = {"shift": jnp.arange(rows, dtype=jnp.float32) / rows}

  def piped(w, x):
    return gpipe(_stage, w.reshape(stages, -1, 6, 6), x, extras, microbatches)

  def sequential(w, x):
    return _stage(w, x, extras)

  np.testing.assert_allclose(piped(w, x), sequential(w, x), rtol=1e-6, atol=1e-6)
  probe = jax.random.normal(jax.random.key(2), x.shape)
  loss = lambda f: lambda w, x: (f(w, x) * probe).sum()  # noqa: E731
  for got, want in zip(jax.grad(loss(piped), (0, 1))(w, x), jax.grad(loss(sequential), (0, 1))(w, x)):
    assert rel_err(got, want) <= 1e-6  # micro-batches sum the weight gradient in another order


@pytest.mark.fast
def test_bubble_fraction_on_paper():
  assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
  assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
  assert bubble_fraction(1, 8) == 0


PIPELINED = {
    "pp2_dp4": dict(stage=2, data=4),
    "pp4_fsdp2": dict(stage=4, data=1, fsdp=2),
    "pp2_fsdp2_tp2": dict(stage=2, data=1, fsdp=2, tensor=2),
}


def pipe_config(**mesh):
  c = tiny_config(**mesh)
  c.model.num_layers = 4
  c.compute.pipeline_microbatches = 2  # 8 rows: 2 micro-batches of 4, split over data x fsdp
  # Adam divides each gradient by its own magnitude, so a near-zero gradient's rounding (the
  # stages' batched matmuls round differently from one device's) becomes a ~1e-5 parameter
  # difference with eps 1e-8 (measured: 1.6e-5 at pp2_dp4); eps 1e-6 bounds that amplification
  # (2.4e-6) while the losses agree to 1e-6 either way. The schedule itself is exact (test above).
  c.train.eps = 1e-6
  return c


@pytest.fixture(scope="module")
def reference():
  return run(pipe_config(), devices=jax.devices()[:1])


@pytest.mark.parametrize("name", list(PIPELINED))
def test_pipelined_layout_matches_single_device(reference, name):
  got = run(pipe_config(**PIPELINED[name]))
  np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-5)
  errors = {jax.tree_util.keystr(path): rel_err(jax.device_get(a), jax.device_get(b))
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["state"].params),
                                    jax.tree.leaves(reference["state"].params))}
  worst = max(errors, key=errors.get)
  print(f"\n{name}: max param rel error {errors[worst]:.1e} ({worst})")
  assert errors[worst] <= 1e-5, (worst, errors[worst])
  # The layer stack is split over the stage axis: each device holds layers / stages of every block.
  mesh = dict(got["setup"].mesh.shape)
  q = got["state"].params["blocks"]["attn"]["q"].value  # [layers, embed, heads, head_dim]
  assert q.addressable_shards[0].data.shape == (4 // mesh["stage"], 32 // mesh["fsdp"], 8 // mesh["tensor"], 4)
  assert len({s.device for s in q.addressable_shards}) == 8


@pytest.mark.fast
def test_pipeline_config_errors():
  c = pipe_config(stage=2, data=4)
  c.compute.scan_layers = False
  with pytest.raises(ConfigError, match=r"stage axis is 2 but compute.scan_layers is False"):
    resolve_mesh(c, 8)
  c = pipe_config(stage=2, data=4)
  c.compute.pipeline_microbatches = 4  # 8 rows / 4 = 2 rows per micro-batch, not a multiple of data=4
  with pytest.raises(ConfigError, match=r"compute.pipeline_microbatches \(4\).*multiple of 16"):
    resolve_mesh(c, 8)
