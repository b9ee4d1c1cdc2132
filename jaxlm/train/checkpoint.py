"""Checkpoints with orbax: train state (params, optimizer state, step, RNG) plus the data iterator.

They live in checkpoints/<step>/{state,data} of the run directory (see jaxlm/runs.py, which also
reads a run's parameters back for inference), as orbax CheckpointManager items (async, keep-N).
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm.runs import CheckpointError, checkpoint_dir


class Checkpointer:

  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.keep, enable_async_checkpointing=ckpt_cfg.async_save, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None):
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, state_template, data_iterator=None, step: int | None = None):
    """Restores the state (shaped like `state_template`) and, in place, the data iterator."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(
          f"no checkpoint in {self.directory}; start without resuming (checkpoint.resume=auto or "
          "never) or point train.workdir at a run that saved one")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for truncated or foreign files
      raise CheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))} could not be read ({type(e).__name__}: "
          f"{str(e)[:300]}). If the model or optimizer config changed since it was written, it must match "
          f"the run's config.json again; if the files are damaged, delete that step's folder to fall "
          "back to an earlier one; or start over with a fresh train.workdir") from e
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
