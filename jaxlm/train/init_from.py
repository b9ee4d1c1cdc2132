"""Starting a run from trained weights (`checkpoint.init_from`): a jaxlm run or a Hugging Face model.

The weights are read straight into the run's mesh and shardings; the run starts at step 0 with fresh
optimizer state and its own schedule. The source must have the run's architecture (`model.*`,
vocabulary included); how it was computed (`compute.*`, e.g. stacked or unrolled layers) may differ.
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from jaxlm.config import ConfigError, flat_fields, moe_layers
from jaxlm.interop import hf
from jaxlm.models.layers import PRETRAINED, ScoreParam
from jaxlm.models.transformer import padded_vocab_size
from jaxlm.parallel.sharding import tree_shardings
from jaxlm.runs import load_params, read_config
from jaxlm.train.setup import Setup, abstract_model, new_model
from jaxlm.train.step import TrainState, init_state
from jaxlm.workdir import as_path, is_url


def _restack(blocks: dict, scanned: bool, num_layers: int) -> dict:
  """Layer parameters as the run lays them out: stacked [layers, ...] or one entry per layer."""
  is_stacked = not (isinstance(blocks, dict) and 0 in blocks)
  if is_stacked == scanned:
    return blocks
  if scanned:
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[blocks[i] for i in range(num_layers)])
  return {i: jax.tree.map(lambda x: x[i], blocks) for i in range(num_layers)}


def _is_run(path: str) -> bool:
  return (as_path(path, "checkpoint.init_from") / "checkpoints").is_dir()


def _source_model_config(path: str):
  """The architecture of a jaxlm run or a Hugging Face directory, read before any weight is."""
  if _is_run(path):
    return read_config(path).model
  if is_url(path):
    raise ConfigError(f"checkpoint.init_from={path!r} holds no jaxlm run (no checkpoints/ there); a "
                      "Hugging Face model directory must be a local path: copy it down first")
  config_json = os.path.join(path, "config.json")
  if os.path.exists(config_json):
    with open(config_json) as f:
      return hf.config_from_hf(json.load(f)).model
  raise ConfigError(f"checkpoint.init_from={path!r} is neither a jaxlm run directory (with "
                    "checkpoints/) nor a Hugging Face model directory (with config.json)")


def _source_params(path: str, mesh) -> dict:
  """The source's parameters (a pure dict), read onto `mesh`."""
  if _is_run(path):
    return nnx.to_pure_dict(load_params(path, mesh=mesh).params)
  model, _ = hf.load_model(path, mesh=mesh)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# Fields that do not change the function loaded weights compute: how fresh weights are drawn, and
# the vocabulary padding (compared as the padded size, which is what the parameters' shapes hold).
_NOT_ARCHITECTURE = ("init_std", "vocab_multiple")


def read_source(path: str, config, compute, mesh, shardings) -> nnx.State:
  """The parameters of `path` (a jaxlm run or a Hugging Face directory) as a run of `config` lays
  them out: architecture checked against config.model (ConfigError naming each field that
  differs), layers stacked or not as compute.scan_layers, cast to the run's compute.param_dtype,
  each array placed as `shardings` (a tree like the model's pretrained parameters) says. mesh: where
  the source is read (None: one device). LoRA adapters and score heads are never read: this is the
  language model they start from."""
  source = _source_model_config(path)
  ours, theirs = flat_fields(config.model), flat_fields(source)
  differ = sorted(n for n in ours if n not in _NOT_ARCHITECTURE and ours[n] != theirs.get(n))
  if padded_vocab_size(config.model) != padded_vocab_size(source):
    differ.append("vocab_multiple")
  if differ:
    raise ConfigError(
        f"checkpoint.init_from={path!r} has another architecture: "
        + ", ".join(f"model.{n} {theirs.get(n)!r} there, {ours[n]!r} here" for n in differ)
        + "; set these fields to the source's values (or init_from a matching model)")
  params = _source_params(path, mesh)
  params.pop("score", None)  # a reward model's or PPO policy's head: not part of the language model
  n_moe = sum(moe_layers(source))  # a MoE model's layers are two stacks (jaxlm/models/transformer.py)
  for name, n in (("blocks", source.num_layers - n_moe), ("moe_blocks", n_moe)):
    if name in params:
      params[name] = _restack(params[name], compute.scan_layers, n)
  state = nnx.state(abstract_model(config, compute), PRETRAINED)
  # Master weights in the run's compute.param_dtype, whatever the source stored.
  params = jax.tree.map(lambda p, s: p.astype(s.dtype), params, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  return jax.device_put(state, shardings)  # the run's own layout of each array


def start_from(setup: Setup, path: str) -> TrainState:
  """The run's initial state with the parameters of `path`; raises ConfigError on a mismatch.
  (Not for LoRA runs, whose state is fresh adapters: see jaxlm/posttrain/lora.py.)"""
  pretrained = nnx.state(abstract_model(setup.config, setup.compute), PRETRAINED)
  state = read_source(path, setup.config, setup.compute, setup.mesh,
                      tree_shardings(pretrained, setup.mesh, setup.rules))
  with_score = "score" in nnx.to_pure_dict(setup.state_shardings.params)

  def init(params) -> TrainState:
    if with_score:  # a fresh score head (jit drops the rest of the fresh model: it is unused)
      params = nnx.State.merge(params, nnx.state(new_model(setup.config, setup.compute), ScoreParam))
    return init_state(params, setup.tx, setup.config.train.seed)

  return jax.jit(init, out_shardings=setup.state_shardings)(state)
