"""Checkpoints with orbax: train state (params, optimizer state, step, RNG) plus the data iterator.

They live in checkpoints/<step>/{state,data} of the run directory (see jaxlm/runs.py, which also
reads a run's parameters back for inference), as orbax CheckpointManager items (async, keep-N).

Faults (jaxlm/checkpoint_health.py says how orbax marks a finished save):
  * resume reads the newest readable step: a damaged one (or a save cut short) is skipped with a
    printed line and renamed `<step>.unreadable`, never deleted; orbax no longer lists it, so
    keep-N neither counts nor deletes it. An intact step of another config (other array shapes
    in its tree metadata, or a data iterator state, valid JSON, that the pipeline refuses) is not
    damage: that stays an error naming config.json, and nothing is renamed.
  * a failed save (disk full, permission denied; an async one's failure shows at the next save,
    wait or close) is a CheckpointError naming the path and the free space, raised or, with
    checkpoint.on_save_error=warn, printed and counted in `save_errors`.
"""

from __future__ import annotations

import sys

import jax
import orbax.checkpoint as ocp

from jaxlm import checkpoint_health as health
from jaxlm.data.stream import DataRestore, DataSave
from jaxlm.runs import CheckpointError, checkpoint_dir


def _print(text: str):
  print(f"jaxlm: {text}", file=sys.stderr, flush=True)


def _barrier(name: str):
  """Every process waits here, so the first process's renames are seen by all before they list."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class Checkpointer:

  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = checkpoint_dir(workdir)
    self.on_save_error = ckpt_cfg.on_save_error
    self.save_errors = 0  # failed saves so far (on_save_error=warn); the loop logs it
    self._in_flight = None  # the step of the last save, until it is known to have finished
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, enable_async_checkpointing=ckpt_cfg.async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # Saving

  def save(self, step: int, state, data_iterator=None):
    self._finish_in_flight()  # an async save that failed in the background surfaces here
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = DataSave(data_iterator)  # any process count can continue it
    try:
      self.manager.save(step, args=ocp.args.Composite(**items))
      self._in_flight = step
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._settle()  # parts of this save may already run in the background (an async one's arrays)
      self._save_failed(step, e)

  def _finish_in_flight(self):
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._settle()
      self._save_failed(step, e)

  def _settle(self):
    """After a failed save: every error of that save is its own, none leaks into the next one.
    orbax reports the first error (a failed file, its background step-metadata write, its
    checkpointer's thread) while the other background parts may still be writing, and raises
    their errors at the next save. Closing waits for all of them; a new manager then lists what
    is on disk, so keep-N counts only finished steps."""
    for _ in range(2):  # the first close may stop at that second error
      try:
        self.manager.close()
        break
      except Exception:  # pylint: disable=broad-exception-caught
        continue
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def _save_failed(self, step, e: Exception):
    path = self.directory if step is None else health.step_path(self.directory, step)
    error = CheckpointError(
        f"checkpoint {path} could not be saved ({health.describe(e)}); free space there: "
        f"{health.free_space(self.directory)}. Earlier checkpoints are untouched and a resume never "
        "reads this step's partial folder; free space or fix the folder's permissions, then resume "
        "(checkpoint.on_save_error=warn trains on past failed saves)")
    if self.on_save_error == "stop":
      try:
        self.manager.close()  # let orbax's background threads end before the error surfaces
      except Exception:  # pylint: disable=broad-exception-caught
        pass
      raise error from e
    self.save_errors += 1
    _print(f"warning: {error} [save error {self.save_errors}; training goes on]")

  def wait(self):
    self._finish_in_flight()

  def close(self):
    self._finish_in_flight()
    self.manager.close()

  # Restoring

  def restore(self, state_template, data_iterator=None, step: int | None = None):
    """Restores the state (shaped like `state_template`) and, in place, the data iterator.

    step None: the newest readable step; damaged ones are skipped and set aside (module docstring).
    An explicit step is read or fails, and nothing is renamed.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)

    def attempt(s: int):
      step_dir = health.step_path(self.directory, s)
      try:
        health.check_tree(step_dir / "state", abstract)
      except health.Mismatch as e:
        raise self._mismatch_error(s, e) from e
      state = self.manager.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
      if data_iterator is not None:
        health.check_json_item(step_dir / "data")  # intact files, so a failure below is the config's
        try:
          self.manager.restore(s, args=ocp.args.Composite(data=DataRestore(data_iterator)))
        except CheckpointError:  # the stream refuses another process count: its own message
          raise
        except Exception as e:  # pylint: disable=broad-exception-caught
          raise health.Mismatch(
              f"checkpoint {step_dir}: its data iterator state is intact but does not fit this "
              f"run's data pipeline ({health.describe(e)}); the data.* fields must match the run's "
              "config.json again, or start over with a fresh train.workdir. (Nothing was renamed.)"
          ) from e
      return state

    if step is not None:
      try:
        return attempt(step)
      except CheckpointError:
        raise
      except Exception as e:  # orbax raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {health.step_path(self.directory, step)} could not be read "
            f"({health.describe(e)}); pick another of the saved steps "
            f"{sorted(self.manager.all_steps())}") from e
    skipped = self._set_aside_unfinished()
    found, state, damaged = health.newest_readable(self.manager.all_steps(), attempt, self._skip)
    skipped += damaged
    if found is None and not skipped:
      raise CheckpointError(
          f"no checkpoint in {self.directory}; start without resuming (checkpoint.resume=auto or "
          "never) or point train.workdir at a run that saved one")
    if found is None:
      raise CheckpointError(
          f"no readable checkpoint in {self.directory}: "
          + "; ".join(f"step {s} could not be read ({why})" for s, why in skipped)
          + f". Each was renamed to <step>{health.UNREADABLE} (kept, not deleted); start over with "
          "checkpoint.resume=never or a fresh train.workdir, or copy a good checkpoint back")
    return state

  def _mismatch_error(self, step: int, e: health.Mismatch) -> health.Mismatch:
    """An intact checkpoint of another config: the error names config.json; nothing is renamed."""
    return health.Mismatch(
        f"checkpoint {health.step_path(self.directory, step)} could not be read: it holds other "
        f"arrays than this config builds ({e}). If the model or optimizer config changed since it "
        "was written, it must match the run's config.json again; or start over with a fresh "
        "train.workdir. (Nothing was renamed: its files are intact.)")

  def _set_aside_unfinished(self) -> list[tuple[int, str]]:
    """Renames the folders of saves cut short, so a later save of their step cannot delete them."""
    skipped = []
    unfinished = health.unfinished_saves(self.directory, set(self.manager.all_steps()))
    for step, paths in sorted(unfinished.items()):
      for path in paths:
        why = f"an unfinished save ({path.name}, never committed)"
        if jax.process_index() == 0:
          _print(f"checkpoint step {step} skipped: {why}; kept as {health.set_aside(path).name}")
        skipped.append((step, why))
    if unfinished:
      _barrier("jaxlm_checkpoint_unfinished_set_aside")
    return skipped

  def _skip(self, step: int, why: str):
    path = health.step_path(self.directory, step)
    if jax.process_index() == 0:
      _print(f"checkpoint step {step} skipped: {why}; kept as {health.set_aside(path).name}, "
             "falling back to an earlier step")
    _barrier(f"jaxlm_checkpoint_set_aside_{step}")
    self.manager.reload()  # orbax's list (and keep-N's count) without the step set aside
