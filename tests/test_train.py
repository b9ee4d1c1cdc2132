"""Training math and the loop: overfitting, accumulation, schedules, exact resume, checkpoint errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import presets
from jaxlm.config import ConfigError, base_config
from jaxlm.models import build_model
from jaxlm.train import optimizer
from jaxlm.runs import CheckpointError
from jaxlm.train.loop import train
from jaxlm.train.step import init_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config():
  c = base_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 max_seq_len=16)
  c.tokenizer.vocab_size = 64
  c.data.seq_len = 16
  c.train.update(batch_size=4, steps=40, warmup_steps=2, learning_rate=1e-2, weight_decay=0.0)
  return c


def fixed_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  b, t = c.train.batch_size, c.data.seq_len
  tokens = rng.integers(0, c.model.vocab_size, (b, t + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
          "weights": np.ones((b, t), np.int32)}


def run_steps(c, batch, steps, tx=None):
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  tx = tx or optimizer.make_optimizer(c.train)
  state = init_state(params, tx, 0)
  step = jax.jit(make_train_step(graphdef, tx, c.train))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_loss_falls_when_overfitting_one_batch():
  c = small_config()
  _, losses = run_steps(c, fixed_batch(c), 40)
  assert losses[0] > 3.5  # ~ln(64) at init
  assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_accumulation_matches_one_big_batch():
  c = small_config()
  batch = fixed_batch(c)
  batch["weights"][0, :5] = 0  # uneven token counts per micro-batch: the mean must still be exact
  sgd = optax.sgd(0.5)  # plain SGD: Adam's g / sqrt(v) would magnify float noise in tiny gradients
  one, l1 = run_steps(c, batch, 2, sgd)
  c.train.grad_accum_steps = 2
  two, l2 = run_steps(c, batch, 2, sgd)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_schedules_warm_up_then_follow_their_shape(kind):
  t = base_config().train
  t.update(schedule=kind, steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1,
           wsd_decay_fraction=0.2)
  lr = optimizer.schedule(t)
  assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0)
  end = {"cosine": 0.1, "linear": 0.1, "wsd": 0.1, "constant": 1.0}[kind]
  assert float(lr(100)) == pytest.approx(end, abs=1e-6)
  if kind == "wsd":
    assert float(lr(79)) == pytest.approx(1.0)  # stable until the last 20%


@pytest.mark.fast
def test_weight_decay_skips_norms_biases_and_embeddings():
  c = small_config()
  c.model.update(attention_bias=True, tie_embeddings=False)
  params = nnx.state(build_model(c), nnx.Param)
  mask = nnx.to_pure_dict(optimizer.decay_mask(params, decay_embeddings=False))
  assert mask["blocks"]["attn"]["q"] and mask["blocks"]["mlp"]["down"] and mask["unembed"]
  assert not mask["embed"] and not mask["final_norm"]["scale"]
  assert not mask["blocks"]["attn_norm"]["scale"] and not mask["blocks"]["attn"]["q_bias"]


def loop_config(workdir):
  c = presets.load("tiny").get_config()
  c.train.update(steps=6, log_every=1, workdir=str(workdir), progress_bar=False, eval_batches=2)
  c.tokenizer.cache_dir = str(workdir.parent / "tokenizers")
  c.checkpoint.async_save = True
  return c


def logged_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path):
  straight = train(loop_config(tmp_path / "straight"))
  train(loop_config(tmp_path / "resumed"), stop_at_step=3)
  assert max(logged_losses(tmp_path / "resumed")) == 3
  resumed = train(loop_config(tmp_path / "resumed"))
  a, b = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "resumed")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  assert [a[s] for s in a] == [b[s] for s in a]  # bit-identical, not just close
  for x, y in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert np.isfinite(resumed["metrics"]["eval_bits_per_byte"])


def test_resume_always_without_a_checkpoint_is_a_clear_error(tmp_path):
  c = loop_config(tmp_path / "empty")
  c.checkpoint.resume = "always"
  with pytest.raises(CheckpointError, match="no checkpoint in .*checkpoints"):
    train(c)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finished") / "run"
  c = loop_config(workdir)
  c.train.update(steps=2, warmup_steps=1)
  train(c)
  return workdir


def test_resume_with_another_model_shape_names_the_problem(finished_run, tmp_path):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run, workdir)
  c = loop_config(workdir)
  c.train.update(steps=3, warmup_steps=1)
  c.model.d_model = 32  # the checkpoint holds d_model 64
  with pytest.raises(CheckpointError, match="could not be read.*must match.*config.json"):
    train(c)


def test_corrupt_checkpoint_is_a_clear_error(finished_run, tmp_path):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run, workdir)
  for root, _, files in os.walk(workdir / "checkpoints" / "2" / "state"):
    for name in files:
      if "commit_success" not in name:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  c = loop_config(workdir)
  c.train.update(steps=3, warmup_steps=1)
  with pytest.raises(CheckpointError, match=r"checkpoint .*2 could not be read"):
    train(c)


def test_init_from_a_run_starts_at_step_0_with_its_weights(finished_run, tmp_path):
  from jaxlm.runs import load_params
  c = loop_config(tmp_path / "b")
  c.checkpoint.init_from = str(finished_run)
  c.compute.scan_layers = False  # the source's layers are stacked: laid out again, same values
  state = train(c, stop_at_step=0)["state"]
  assert int(state.step) == 0
  source = nnx.to_pure_dict(load_params(str(finished_run)).params)
  mine = nnx.to_pure_dict(state.params)
  for i in range(c.model.num_layers):
    for a, b in zip(jax.tree.leaves(mine["blocks"][i]),
                    jax.tree.leaves(jax.tree.map(lambda x: x[i], source["blocks"]))):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(mine["embed"], source["embed"])
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state[1][0].mu))

  c = loop_config(tmp_path / "c")
  c.checkpoint.init_from = str(finished_run)
  c.model.d_model = 96
  with pytest.raises(ConfigError, match=r"another architecture: model.d_model 64 there, 96 here"):
    train(c)


def test_init_from_a_hugging_face_model_needs_its_architecture(tmp_path):
  c = loop_config(tmp_path / "d")
  c.checkpoint.init_from = os.path.join(ROOT, "tests", "fixtures", "hf", "llama3")
  with pytest.raises(ConfigError, match=r"another architecture: .*model.vocab_size 256 there, 512 here"):
    train(c)


@pytest.mark.fast
def test_a_custom_objective_trains_only_its_params_and_accumulates_exactly():
  """An Objective with frozen inputs: weighted squared distance of w to a frozen target, summed per
  example and divided by the example count of the whole batch; 1 vs 4 micro-batches agree."""
  from jaxlm.train.step import Objective

  def fn(params, frozen, batch):
    per_row = jnp.sum((params["w"] - frozen["target"]) ** 2 * batch["x"], axis=-1)  # [rows]
    return jnp.sum(per_row), {"distance": jnp.sum(per_row)}, jnp.asarray(batch["x"].shape[0], jnp.float32)

  c = small_config()
  c.train.update(learning_rate=0.1, warmup_steps=0, clip_norm=0.0)
  tx = optax.sgd(0.1)
  params, frozen = {"w": jnp.zeros((3,))}, {"target": jnp.asarray([1.0, -2.0, 0.5])}
  batch = {"x": jnp.asarray(np.random.default_rng(0).uniform(size=(8, 3)), jnp.float32)}
  updates = []
  for accum in (1, 4):
    c.train.grad_accum_steps = accum
    step = jax.jit(make_train_step(None, tx, c.train, objective=Objective(fn, "rows")))
    state, metrics = step(init_state(params, tx, 0), batch, frozen)
    updates.append(np.asarray(state.params["w"]))
    assert set(metrics) == {"distance", "grad_norm", "learning_rate", "rows", "skipped"}
    assert metrics["rows"] == 8 and metrics["skipped"] == 0
  # d/dw of mean_rows sum_j (w - t)^2 x = 2 (w - t) mean(x): one SGD step from w = 0
  want = -0.1 * 2 * (0 - frozen["target"]) * batch["x"].mean(0)
  np.testing.assert_allclose(updates[0], want, rtol=1e-6)
  np.testing.assert_allclose(updates[1], updates[0], rtol=1e-6)
