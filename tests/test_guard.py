"""The non-finite guard: a step with a NaN loss or an infinite update changes nothing, and the loop's
watch stops a run after train.max_bad_steps such steps in a row."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm.models import build_model
from jaxlm.train import optimizer
from jaxlm.train.guard import NonFiniteError, StepWatch
from jaxlm.train.step import init_state, make_train_step
from test_train import fixed_batch, small_config


def float_batch(c, nan_at=None):
  """fixed_batch with float weights; nan_at: a (row, position) whose weight is NaN, as a numeric
  blow-up in the loss would make it."""
  batch = fixed_batch(c)
  batch["weights"] = batch["weights"].astype(np.float32)
  if nan_at is not None:
    batch["weights"][nan_at] = np.nan
  return batch


def states_equal(a, b) -> bool:
  return all(np.array_equal(x, y, equal_nan=True) for x, y in
             zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))))


@pytest.fixture(scope="module")
def setup():
  c = small_config()
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  return c, graphdef, params


def test_a_nan_loss_leaves_params_and_optimizer_state_unchanged(setup):
  c, graphdef, params = setup
  tx = optimizer.make_optimizer(c.train)
  step = jax.jit(make_train_step(graphdef, tx, c.train))
  state, metrics = step(init_state(params, tx, 0), float_batch(c))  # one good step first
  assert float(metrics["skipped"]) == 0
  after, metrics = step(state, float_batch(c, nan_at=(1, 3)))
  assert float(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert states_equal(after, state)
  assert int(after.step) == int(state.step) + 1  # the batch is consumed: the stream moves on
  # and the next good step is the one the bad step would never have disturbed
  good, _ = step(after, float_batch(c))
  want, _ = step(state, float_batch(c))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(good.params), jax.tree.leaves(want.params)))


def test_an_infinite_learning_rate_is_caught_by_the_update_check(setup):
  """Loss and gradients are finite; only the update is not. Without the guard the weights are lost."""
  c, graphdef, params = setup
  tx = optax.adam(lambda count: jnp.where(count == 1, jnp.inf, 1e-3))
  outcomes = {}
  for guard in (True, False):
    c.train.skip_nonfinite = guard
    step = jax.jit(make_train_step(graphdef, tx, c.train))
    state, _ = step(init_state(params, tx, 0), fixed_batch(c))
    after, metrics = step(state, fixed_batch(c))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    outcomes[guard] = (state, after, metrics)
  c.train.skip_nonfinite = True
  state, after, metrics = outcomes[True]
  assert float(metrics["skipped"]) == 1 and states_equal(after, state)
  _, unguarded, metrics = outcomes[False]
  assert "skipped" not in metrics
  assert not all(np.isfinite(x).all() for x in jax.tree.leaves(unguarded.params))


class _Log:
  def __init__(self):
    self.lines = []

  def print(self, text):
    self.lines.append(text)


def _metrics(loss, skipped):
  return {"loss": jnp.float32(loss), "skipped": jnp.float32(skipped)}


@pytest.mark.fast
def test_the_watch_names_skipped_steps_and_stops_after_max_bad_steps_in_a_row():
  c = small_config()
  c.train.max_bad_steps = 3
  log = _Log()
  watch = StepWatch(c.train, rows_per_step=4, log=log)
  flags = [0, 1, 1, 0, 1, 1]  # streaks of 2: tolerated
  for step, flag in enumerate(flags, 1):
    watch.after(step, _metrics(np.nan if flag else 2.0, flag))
  watch.flush()
  assert watch.skipped == 4 and watch.streak == 2
  assert log.lines[0].startswith("step 2: not applied") and "rows 4 to 7" in log.lines[0]
  watch.after(7, _metrics(np.nan, 1))
  with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 7\).*train.max_bad_steps=3"):
    watch.flush()


@pytest.mark.fast
def test_loss_spikes_are_logged_against_the_running_median():
  c = small_config()
  c.train.loss_spike_factor = 2.0
  log = _Log()
  watch = StepWatch(c.train, rows_per_step=4, log=log)
  for step in range(1, 13):
    watch.after(step, _metrics(9.0 if step == 12 else 3.0, 0))
  watch.flush()
  assert watch.spikes == 1 and log.lines == [
      "step 12: loss spike: 9.0000 is over 2 x the median of the last 11 steps (3.0000)"]
