"""compute.offload_optimizer: Adam's moments in host memory, updated layer by layer, same training."""

import jax
import numpy as np
import pytest

from jaxlm import presets
from jaxlm.config import ConfigError, validate
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.setup import init_sharded_state, jit_train_step, make_setup


def tiny(offload: bool, **train):
  c = presets.load("tiny").get_config()
  c.model.update(vocab_size=64, d_model=32, mlp_dim=64, num_layers=2, num_heads=2, num_kv_heads=2)
  c.data.seq_len = 16
  c.train.update(batch_size=8, warmup_steps=1, **train)
  c.mesh.update(data=2, fsdp=2, tensor=2)  # the 8 simulated devices; the moments sharded too
  c.compute.offload_optimizer = offload
  return c


def batches(c, n):
  rng = np.random.default_rng(0)
  for _ in range(n):
    x = rng.integers(0, c.model.vocab_size, (c.train.batch_size, c.data.seq_len + 1)).astype(np.int32)
    shape = (c.train.batch_size, c.data.seq_len)
    yield dict(inputs=x[:, :-1], targets=x[:, 1:], segment_ids=np.ones(shape, np.int32),
               positions=np.broadcast_to(np.arange(c.data.seq_len, dtype=np.int32), shape),
               weights=np.ones(shape, np.float32))


def train(c, steps=3, setup=None, step=None):
  """steps of training from a fresh state -> (setup, state, losses, step); pass setup and step of
  an earlier run of the same config to reuse its compiled step."""
  setup = setup or make_setup(c)
  state, step = init_sharded_state(setup), step or jit_train_step(setup)
  losses = []
  for b in batches(c, steps):
    state, metrics = step(state, b)
    losses.append(float(metrics["loss"]))
  return setup, state, losses, step


@pytest.fixture(scope="module")
def plain():
  return train(tiny(False))


@pytest.fixture(scope="module")
def offloaded():
  return train(tiny(True))  # compiled once for every test of tiny(True)


def test_offloaded_optimizer_trains_to_the_same_losses(plain, offloaded):
  _, plain_state, plain_losses, _ = plain
  setup, state, losses, _ = offloaded
  # The moments live in host memory between steps; the scalar step counts stay on the device.
  kinds = {x.ndim > 0: x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
  assert kinds == {True: "pinned_host", False: "device"}
  assert all(x.sharding.memory_kind == "device" for x in jax.tree.leaves(state.params))
  # The same arithmetic, leaf for leaf; only XLA's fusion order may differ in the last bits.
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_offload_with_accumulation_and_unscanned_layers_matches():
  # grad accumulation feeds the same update; without scan_layers every leaf is outside the stack
  # (one pair of runs with both: unscanned layers draw their initial weights differently from
  # scanned ones, so both runs of the pair are unscanned).
  c0, c1 = tiny(False, grad_accum_steps=2), tiny(True, grad_accum_steps=2)
  c0.compute.scan_layers = c1.compute.scan_layers = False
  np.testing.assert_allclose(train(c1, 2)[2], train(c0, 2)[2], rtol=1e-5)


def test_host_resident_state_saves_and_restores(tmp_path, offloaded):
  c = tiny(True)
  c.checkpoint.async_save = False
  setup, state, _, step = offloaded
  ckpt = Checkpointer(str(tmp_path), c.checkpoint)
  ckpt.save(3, state)
  ckpt.wait()
  restored = ckpt.restore(init_sharded_state(setup))
  ckpt.close()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.sharding.memory_kind == b.sharding.memory_kind
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # and training continues from the restored host-resident state
  restored, metrics = step(restored, next(batches(c, 1)))
  assert int(restored.step) == 4 and np.isfinite(float(metrics["loss"]))


@pytest.mark.fast
def test_offload_config_is_checked():
  c = tiny(True)
  c.mesh.update(stage=2, data=1)
  with pytest.raises(ConfigError, match="compute.offload_optimizer=True .* mesh.stage=1"):
    validate(c)


def test_a_nonfinite_step_leaves_the_host_state_as_it_was(offloaded):
  c = tiny(True)
  setup, _, _, step = offloaded
  state = init_sharded_state(setup)
  before = [np.asarray(x) for x in jax.tree.leaves(state)]
  b = next(batches(c, 1))
  b["weights"] = np.full_like(b["weights"], np.nan)  # a non-finite loss
  state, metrics = step(state, b)
  assert float(metrics["skipped"]) == 1.0 and int(state.step) == 1
  for a, x in zip(jax.tree.leaves((state.params, state.opt_state)),
                  before[1:1 + len(jax.tree.leaves((state.params, state.opt_state)))]):
    np.testing.assert_array_equal(np.asarray(a), x)
