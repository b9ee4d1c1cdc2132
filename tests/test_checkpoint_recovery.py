"""Checkpoints that survive damage and failed saves (jaxlm/train/checkpoint.py, jaxlm/checkpoint_health.py).

* resume reads the newest readable step: a truncated array file, a missing tree metadata file or a
  save never committed is skipped with a printed line, and its folder renamed <step>.unreadable
  byte for byte; keep-N never deletes a readable step on its account; with none readable the
  error lists every step tried. An intact checkpoint of another config (its arrays' shapes, or a
  data iterator state that does not fit the pipeline) is not damage: an error, nothing renamed.
* a failed save (ENOSPC, EACCES; sync or async) is a CheckpointError naming the path and the free
  space (checkpoint.on_save_error=stop) or a counted warning (warn); the earlier steps stay readable.
* load_params (inference, read-only) reads the newest readable step and renames nothing.
"""

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faults.inject import failing_writes, remove_commit_marker, remove_metadata, truncate_newest_array
from jaxlm import checkpoint_health as health
from jaxlm.config import ConfigError, base_config, validate
from jaxlm.runs import CheckpointError, load_params
from jaxlm.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# orbax's reads and writes of a damaged or failing step leave coroutines that end unawaited.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]


def ckpt_cfg(keep=3, async_save=False, on_save_error="stop"):
  c = base_config().checkpoint
  c.update(keep=keep, async_save=async_save, on_save_error=on_save_error)
  return c


def tiny_state(step: int) -> dict:
  # w: [64, 64] random (incompressible): its array file is the step's largest
  w = jax.random.normal(jax.random.key(step), (64, 64))
  return {"w": w, "b": jnp.arange(3.0) + step, "step": jnp.array(step)}


TEMPLATE = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tiny_state(0))


def saved_run(workdir, steps=(1, 2), **cfg) -> str:
  saver = Checkpointer(str(workdir), ckpt_cfg(**cfg))
  for s in steps:
    saver.save(s, tiny_state(s))
  saver.close()
  return os.path.join(workdir, "checkpoints")


def contents(folder) -> dict:
  """relative path -> bytes of every file under folder."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def restored_step(workdir, **cfg) -> int:
  checkpointer = Checkpointer(str(workdir), ckpt_cfg(**cfg))
  try:
    return int(checkpointer.restore(TEMPLATE)["step"])
  finally:
    checkpointer.close()


@pytest.mark.fast
@pytest.mark.parametrize("damage", ["truncated_array", "missing_metadata", "missing_commit_marker"])
def test_a_damaged_newest_step_falls_back_and_is_set_aside_intact(tmp_path, capsys, damage):
  ckpt = saved_run(tmp_path)
  if damage == "truncated_array":
    truncate_newest_array(ckpt)
    damaged = os.path.join(ckpt, "2")
  elif damage == "missing_metadata":
    remove_metadata(ckpt, 2)
    damaged = os.path.join(ckpt, "2")
  else:
    damaged = str(remove_commit_marker(ckpt, 2))
  before = contents(damaged)

  assert restored_step(tmp_path) == 1
  err = capsys.readouterr().err
  assert "checkpoint step 2 skipped" in err and "kept as 2.unreadable" in err, err
  assert sorted(os.listdir(ckpt)) == ["1", "2.unreadable"]
  assert contents(os.path.join(ckpt, "2.unreadable")) == before  # renamed, not a byte changed

  # A later save of step 2 writes a fresh folder beside the one set aside, and is read back.
  saver = Checkpointer(str(tmp_path), ckpt_cfg())
  saver.save(2, tiny_state(2))
  saver.close()
  assert restored_step(tmp_path) == 2
  assert sorted(os.listdir(ckpt)) == ["1", "2", "2.unreadable"]


@pytest.mark.fast
def test_a_second_damaged_copy_of_a_step_gets_the_next_free_name(tmp_path):
  ckpt = saved_run(tmp_path)
  os.makedirs(os.path.join(ckpt, "2.unreadable"))
  remove_metadata(ckpt, 2)
  assert restored_step(tmp_path) == 1
  assert sorted(os.listdir(ckpt)) == ["1", "2.unreadable", "2.unreadable.1"]


@pytest.mark.fast
def test_keep_n_never_deletes_a_readable_step_for_a_damaged_one(tmp_path):
  ckpt = saved_run(tmp_path, steps=(2, 3), keep=2)
  truncate_newest_array(ckpt)
  checkpointer = Checkpointer(str(tmp_path), ckpt_cfg(keep=2))
  assert int(checkpointer.restore(TEMPLATE)["step"]) == 2
  checkpointer.save(4, tiny_state(4))  # keep=2 counts 2 and 4, not the step set aside
  checkpointer.close()
  assert sorted(os.listdir(ckpt)) == ["2", "3.unreadable", "4"]
  assert restored_step(tmp_path, keep=2) == 4


@pytest.mark.fast
def test_no_readable_step_is_an_error_listing_every_step_tried(tmp_path):
  ckpt = saved_run(tmp_path)
  truncate_newest_array(ckpt)
  remove_metadata(ckpt, 1)
  with pytest.raises(CheckpointError) as e:
    restored_step(tmp_path)
  text = str(e.value)
  assert "no readable checkpoint in" in text and "step 2 could not be read" in text
  assert "step 1 could not be read (its tree metadata" in text and "_METADATA is missing" in text
  assert sorted(os.listdir(ckpt)) == ["1.unreadable", "2.unreadable"]


@pytest.mark.fast
def test_another_config_is_the_old_error_and_renames_nothing(tmp_path):
  ckpt = saved_run(tmp_path)
  before = contents(ckpt)
  other = dict(TEMPLATE, w=jax.ShapeDtypeStruct((32, 64), jnp.float32))
  checkpointer = Checkpointer(str(tmp_path), ckpt_cfg())
  with pytest.raises(CheckpointError, match=r"2 could not be read.*w \(64, 64\) there, \(32, 64\) here"
                     r".*must match the run's config.json.*Nothing was renamed"):
    checkpointer.restore(other)
  checkpointer.close()
  assert contents(ckpt) == before


@pytest.mark.fast
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["ENOSPC", "EACCES"])
def test_a_failed_save_stops_naming_path_and_free_space(tmp_path, async_save, code):
  ckpt = saved_run(tmp_path, steps=(1,))
  saver = Checkpointer(str(tmp_path), ckpt_cfg(async_save=async_save))
  with pytest.raises(CheckpointError) as e, failing_writes(code, match=os.path.join("checkpoints", "2")):
    saver.save(2, tiny_state(2))
    saver.wait()  # an async save fails in the background: it surfaces here
  text = str(e.value)
  assert f"checkpoint {os.path.join(ckpt, '2')} could not be saved" in text, text
  assert os.strerror(code) in text
  assert "GiB free of" in text and "free space there:" in text
  assert restored_step(tmp_path) == 1  # the step before the failed save is still read back


@pytest.mark.fast
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_save_warns_counts_and_training_goes_on(tmp_path, capsys, async_save):
  ckpt = saved_run(tmp_path, steps=(1,))
  saver = Checkpointer(str(tmp_path), ckpt_cfg(keep=2, async_save=async_save, on_save_error="warn"))
  with failing_writes(errno.ENOSPC, match=os.path.join("checkpoints", "2")):
    saver.save(2, tiny_state(2))
    saver.wait()
  assert saver.save_errors == 1
  assert "warning: checkpoint" in capsys.readouterr().err
  saver.save(3, tiny_state(3))
  saver.close()
  assert saver.save_errors == 1
  assert saver.manager.all_steps() == [1, 3]  # keep=2: the failed step 2 did not count
  # A resume reads step 3 and sets aside step 2's partial folder (never read back as a checkpoint).
  assert restored_step(tmp_path) == 3
  assert sorted(os.listdir(ckpt)) == ["1", "2.unreadable", "3"]


@pytest.mark.fast
def test_free_space_is_unknown_where_it_cannot_be_read(tmp_path, monkeypatch):
  assert health.free_space("gs://bucket/run/checkpoints") == "unknown"
  assert "GiB free of" in health.free_space(tmp_path / "not" / "made" / "yet")

  def refuse(path):
    raise PermissionError(errno.EACCES, "denied", path)
  monkeypatch.setattr(shutil, "disk_usage", refuse)
  assert health.free_space(tmp_path) == "unknown"


@pytest.mark.fast
def test_on_save_error_is_validated():
  c = base_config()
  c.checkpoint.on_save_error = "retry"
  with pytest.raises(ConfigError, match=r"checkpoint.on_save_error.*'retry'.*\('stop', 'warn'\)"):
    validate(c)


@pytest.mark.fast
def test_load_params_reads_the_newest_readable_step_and_renames_nothing(tmp_path, capsys):
  run = shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "run_before_compute_split"),
                        tmp_path / "run")
  ckpt = run / "checkpoints"
  shutil.copytree(ckpt / "2", ckpt / "3")  # a second step, then damaged
  truncate_newest_array(ckpt, keep=0.05)  # the parameters lie in the file's first part
  assert load_params(str(run)).step == 2
  assert "checkpoint step 3 skipped" in capsys.readouterr().err
  assert sorted(os.listdir(ckpt)) == ["2", "3"]  # inference only reads
  with pytest.raises(CheckpointError, match=r"3 could not be read"):
    load_params(str(run), step=3)


# The loop with a real TrainState: the tiny preset of tests/test_train.py, one compile per test.

def loop_config(workdir, **checkpoint):
  from test_train import loop_config as base  # pylint: disable=g-import-not-at-top
  c = base(workdir)
  c.train.update(steps=2, warmup_steps=1)
  c.checkpoint.update(every=1, **checkpoint)
  return c


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
  from jaxlm.train.loop import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("two_steps") / "run"
  train(loop_config(workdir))
  return workdir


def test_resume_skips_a_truncated_step_and_mismatch_is_not_damage(two_step_run, tmp_path, capsys):
  from jaxlm.train.loop import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "copy"
  shutil.copytree(two_step_run, workdir)
  ckpt = workdir / "checkpoints"
  before = contents(ckpt)
  c = loop_config(workdir)
  c.model.d_model = 32  # the checkpoint holds d_model 64: a config change, not damage
  with pytest.raises(CheckpointError, match="could not be read.*must match.*config.json"):
    train(c)
  assert contents(ckpt) == before

  truncate_newest_array(ckpt)
  c = loop_config(workdir)
  c.train.steps = 3
  out = train(c)
  assert int(out["state"].step) == 3
  assert "checkpoint step 2 skipped" in capsys.readouterr().err
  assert sorted(os.listdir(ckpt)) == ["1", "2", "2.unreadable", "3"]


def test_the_loop_warns_on_a_failed_save_and_logs_the_count(tmp_path, capsys):
  from jaxlm.train.loop import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  with failing_writes(errno.ENOSPC, match=os.path.join("checkpoints", "1")):
    out = train(loop_config(workdir, on_save_error="warn"))
  assert int(out["state"].step) == 2
  assert "No space left on device" in capsys.readouterr().err
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["checkpoint/save_errors"] for r in rows if "checkpoint/save_errors" in r] == [1]
  assert np.isfinite(out["metrics"]["eval_bits_per_byte"])
  assert sorted(n for n in os.listdir(workdir / "checkpoints") if n[0].isdigit()) == [
      "1.orbax-checkpoint-tmp", "2"]


def data_run(workdir) -> str:
  """Steps 1 and 2, each with a grain iterator's state (at 1 and 2 elements read)."""
  import grain  # pylint: disable=g-import-not-at-top
  saver = Checkpointer(str(workdir), ckpt_cfg())
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  for s in (1, 2):
    next(it)
    saver.save(s, tiny_state(s), it)
  saver.close()
  return os.path.join(workdir, "checkpoints")


@pytest.mark.fast
def test_a_damaged_data_iterator_state_falls_back(tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  ckpt = data_run(tmp_path)
  (state_file,) = [n for n in os.listdir(os.path.join(ckpt, "2", "data")) if n.endswith(".json")]
  with open(os.path.join(ckpt, "2", "data", state_file), "w") as f:
    f.write('{"next_ind')  # cut off mid-write
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  checkpointer = Checkpointer(str(tmp_path), ckpt_cfg())
  assert int(checkpointer.restore(TEMPLATE, it)["step"]) == 1
  checkpointer.close()
  assert next(it) == 1  # the iterator is where step 1 left it
  assert sorted(os.listdir(ckpt)) == ["1", "2.unreadable"]


@pytest.mark.fast
def test_an_intact_data_state_of_another_pipeline_is_not_damage(tmp_path, monkeypatch):
  import grain  # pylint: disable=g-import-not-at-top
  ckpt = data_run(tmp_path)
  before = contents(ckpt)
  it = iter(grain.MapDataset.range(10).to_iter_dataset())

  def refuse(state):
    raise KeyError("exhausted")  # what grain raises for a pipeline of another shape
  monkeypatch.setattr(it, "set_state", refuse)
  checkpointer = Checkpointer(str(tmp_path), ckpt_cfg())
  with pytest.raises(CheckpointError, match=r"data iterator state is intact but does not fit.*"
                     r"config.json.*Nothing was renamed"):
    checkpointer.restore(TEMPLATE, it)
  checkpointer.close()
  assert contents(ckpt) == before
