"""Checkpoints with orbax: train state (params, optimizer state, step, RNG) plus the data iterator.

Layout of a workdir:
  config.json        the full config the run was started with
  tokenizer.model    a copy of the SentencePiece model, so the run is self-contained
  checkpoints/<step>/{state,data}   orbax CheckpointManager items (async, keep-N)
"""

from __future__ import annotations

import json
import os
import shutil

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from jaxlm.config import from_saved


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable; the message says what to do."""


class Checkpointer:

  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
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


def write_run_files(workdir: str, config, tokenizer_path: str):
  """Saves what a later process needs to rebuild the model: the config and the tokenizer."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  target = os.path.join(workdir, "tokenizer.model")
  if os.path.abspath(tokenizer_path) != os.path.abspath(target):
    shutil.copyfile(tokenizer_path, target)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: is {workdir} the train.workdir of a jaxlm run?")
  with open(path) as f:
    return from_saved(json.load(f))


def load_for_inference(workdir: str):
  """Returns (model at the latest checkpoint, tokenizer, config) for a finished or running run."""
  from jaxlm.data.tokenizer import load_tokenizer
  from jaxlm.models import build_model
  from jaxlm.train.optimizer import make_optimizer
  from jaxlm.train.step import init_state

  config = read_config(workdir)
  tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer.model"))
  abstract_model = nnx.eval_shape(lambda: build_model(config))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  template = jax.eval_shape(
      lambda p: init_state(p, make_optimizer(config.train), 0), abstract_params)
  checkpointer = Checkpointer(workdir, config.checkpoint)
  state = checkpointer.restore(template)
  checkpointer.close()
  return nnx.merge(graphdef, state.params), tokenizer, config
