"""Pipeline parallelism: the GPipe and circular schedules compute exactly the sequential layer
stack, and the pipelined layouts train like one device, with the layer stack really split over the
stage axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_parallel import rel_err, run, tiny_config

from jaxlm.config import ConfigError, validate
from jaxlm.parallel.mesh import resolve_mesh
from jaxlm.parallel.pipeline import bubble_fraction, circular, gpipe, schedule_length


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
  # circular, m >= p: (p - 1) / (v m + p - 1)
  assert bubble_fraction(4, 4, 2) == pytest.approx(3 / 11)
  assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)
  assert bubble_fraction(2, 4, 4) == pytest.approx(1 / 17)
  # m < p: micro-batches wait for the ring, T = (v - 1) p + m + p - 1
  assert bubble_fraction(3, 2, 2) == pytest.approx(1 - 4 / 7)


@pytest.mark.fast
@pytest.mark.parametrize("stages,microbatches,repeats", [(4, 4, 2), (4, 8, 3), (3, 2, 2), (2, 5, 2), (4, 1, 3)])
def test_schedule_length_is_the_last_task_plus_one_and_respects_dependencies(stages, microbatches, repeats):
  """Replays the circular schedule's task table: stage s does task k = r max(m, p) + j at k + s."""
  p, m, v, period = stages, microbatches, repeats, max(microbatches, stages)
  when = {(r, j, s): r * period + j + s for r in range(v) for j in range(m) for s in range(p)}
  assert len({(t, s) for (_, _, s), t in when.items()}) == v * m * p  # a stage does one task at a time
  for (r, j, s), t in when.items():
    if s:  # the previous stage handed this micro-batch over in the iteration before
      assert when[r, j, s - 1] == t - 1
    elif r:  # the last stage finished the previous repeat, and has not yet overwritten its slot
      assert when[r - 1, j, p - 1] < t <= when[r, j, p - 1]
  assert schedule_length(p, m, v) == max(when.values()) + 1
  assert bubble_fraction(p, m, v) == pytest.approx(1 - v * m * p / (p * schedule_length(p, m, v)))


@pytest.mark.parametrize("stages,repeats,microbatches", [(2, 2, 4), (4, 3, 4), (3, 2, 2), (2, 3, 8)])
def test_circular_equals_the_sequential_stack_in_value_and_gradient(stages, repeats, microbatches):
  layers, rows = 12, 8
  w = jax.random.normal(jax.random.key(0), (layers, 6, 6)) * 0.5
  x = jax.random.normal(jax.random.key(1), (rows, 3, 6))
  extras = {"shift": jnp.arange(rows, dtype=jnp.float32) / rows}

  def piped(w, x):  # chunk c = r x stages + s holds layers c k .. (c + 1) k - 1
    return circular(_stage, w.reshape(repeats, stages, -1, 6, 6), x, extras, microbatches)

  def sequential(w, x):
    return _stage(w, x, extras)

  np.testing.assert_allclose(piped(w, x), sequential(w, x), rtol=1e-6, atol=1e-6)
  probe = jax.random.normal(jax.random.key(2), x.shape)
  loss = lambda f: lambda w, x: (f(w, x) * probe).sum()  # noqa: E731
  for got, want in zip(jax.grad(loss(piped), (0, 1))(w, x), jax.grad(loss(sequential), (0, 1))(w, x)):
    assert rel_err(got, want) <= 1e-6


@pytest.mark.fast
def test_circular_keeps_less_for_the_backward_pass_than_gpipe():
  """XLA's temp bytes of a gradient through each schedule (p = 4, m = 4): circular keeps one stage
  input per stage-iteration, GPipe every layer's insides including the bubble's."""
  layers, rows, embed, p, m = 8, 16, 64, 4, 4
  w, x = jnp.zeros((layers, embed, embed)), jnp.zeros((rows, 16, embed))
  extras = {"shift": jnp.zeros(rows)}

  def temp(f):
    grad = jax.jit(jax.grad(lambda w, x: f(w, x).sum()))
    return grad.lower(w, x).compile().memory_analysis().temp_size_in_bytes

  g = temp(lambda w, x: gpipe(_stage, w.reshape(p, -1, embed, embed), x, extras, m))
  c = temp(lambda w, x: circular(_stage, w.reshape(2, p, -1, embed, embed), x, extras, m))
  print(f"\ntemp bytes: gpipe {g}, circular v=2 {c} ({c / g:.2f}x)")
  assert c < 0.75 * g


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


CIRCULAR = {  # (mesh, micro-batches): m = p hands over directly; m > p waits in the loop buffer
    "circular_pp2_dp4": (dict(stage=2, data=4), 2),
    "circular_pp2_fsdp2_tp2": (dict(stage=2, data=1, fsdp=2, tensor=2), 4),
}


@pytest.fixture(scope="module")
def reference():
  return run(pipe_config(), devices=jax.devices()[:1])


def _circular_config(name):
  mesh, microbatches = CIRCULAR[name]
  c = pipe_config(**mesh)
  c.compute.update(pipeline_schedule="circular", pipeline_repeats=2, pipeline_microbatches=microbatches)
  return c


@pytest.mark.parametrize("name", list(PIPELINED) + list(CIRCULAR))
def test_pipelined_layout_matches_single_device(reference, name):
  got = run(_circular_config(name) if name in CIRCULAR else pipe_config(**PIPELINED[name]))
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
  c = pipe_config(stage=2, data=4)
  c.compute.update(pipeline_schedule="circular", pipeline_repeats=3)  # 4 layers, 2 x 3 chunks
  with pytest.raises(ConfigError, match=r"model.num_layers \(4\) is not divisible by the stage axis "
                     r"\(2\) x compute.pipeline_repeats \(3\)"):
    resolve_mesh(c, 8)
  c.compute.pipeline_schedule = "1f1b"
  with pytest.raises(ConfigError, match="compute.pipeline_schedule"):
    validate(c)
