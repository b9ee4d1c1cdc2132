"""What the training loop needs for the offline post-training objectives (dpo, ipo, kto, reward):
a fixed dataset of records rather than rollouts, trained by the same pure step as pretraining.

`prepare(config, setup, tokenizer)` returns an `Offline`: the objective, the frozen reference model
(dpo/ipo/kto with posttrain.reference=model: the starting weights, read once more into the policy's
shardings), the training iterator (reference log-probs attached when precomputed), the held-out
batches and a jitted evaluation of the objective over them (its metrics, e.g. the pairs' accuracy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.layers import PRETRAINED
from jaxlm.parallel.sharding import global_batch, tree_shardings
from jaxlm.posttrain import objectives, record_data
from jaxlm.train.init_from import read_source
from jaxlm.train.setup import abstract_model, forward_fn, new_model, with_rules
from jaxlm.train.step import Objective


@dataclasses.dataclass
class Offline:
  objective: Objective
  frozen: Any  # the steps' frozen argument: {"reference": params}, or {} (nothing frozen)
  frozen_shardings: Any
  train_iter: Any  # this process's rows of every training batch (grain, checkpointable)
  data_stats: dict  # {name: value} to log once
  eval_batches: list | None  # this process's rows of every held-out batch
  evaluate: Callable  # evaluate(params) -> {metric: mean over held-out examples} | None


def uses_reference(config) -> bool:
  return config.posttrain.objective in ("dpo", "ipo", "kto")


def reference_params(setup):
  """The starting model's parameters (checkpoint.init_from, or the train.seed initialization), in
  the policy's shardings: the frozen reference."""
  config = setup.config
  shapes = nnx.state(abstract_model(config, setup.compute), PRETRAINED)
  shardings = tree_shardings(shapes, setup.mesh, setup.rules)
  if config.checkpoint.init_from:
    return read_source(config.checkpoint.init_from, config, setup.compute, setup.mesh, shardings)
  return jax.jit(lambda: nnx.state(new_model(config, setup.compute), PRETRAINED),
                 out_shardings=shardings)()


def prepare(config, setup, tokenizer) -> Offline:
  objective = objectives.make_objective(config, setup.graphdef, forward_fn(setup))
  pidx, pcount = jax.process_index(), jax.process_count()
  train_examples, train_stats = record_data.read_split(config, tokenizer, "train")
  held_out = record_data.read_split(config, tokenizer, "eval")
  stats = train_stats.metrics("train")

  frozen, frozen_shardings = {}, {}
  if uses_reference(config):
    reference = reference_params(setup)
    if config.posttrain.reference == "model":
      frozen = {"reference": reference}
      frozen_shardings = {"reference": jax.tree.map(lambda x: x.sharding, reference)}
    else:  # precomputed: once per example, then the copy is dropped
      forward = forward_fn(setup)

      @jax.jit
      def per_token(params, batch):
        return with_rules(objectives.token_completion_logprobs, setup)(
            setup.graphdef, params, batch, forward)

      def reference_fn(batch):  # the whole global batch on every process (precomputing is once)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        return jax.device_get(per_token(reference, batch))

      rows = 2 * config.train.batch_size
      train_examples = record_data.with_reference(train_examples, reference_fn, rows)
      if held_out is not None:
        held_out = (record_data.with_reference(held_out[0], reference_fn, rows), held_out[1])
      del reference

  eval_rows = None
  if held_out is not None:
    eval_rows, left_out = record_data.eval_batches(config, held_out[0], pidx, pcount)
    stats.update(held_out[1].metrics("eval"))
    stats["eval_examples_left_out"] = float(left_out)

  @jax.jit
  def eval_sums(params, batch, frozen):
    loss, sums, count = objective.fn(params, frozen, batch)
    return {**sums, "count": count}

  eval_sums = with_rules(eval_sums, setup)

  def evaluate(params):
    if not eval_rows:
      return None
    total = {}
    for batch in eval_rows:
      out = jax.device_get(eval_sums(params, global_batch(batch, setup.batch_sharding), frozen))
      total = {k: total.get(k, 0.0) + float(v) for k, v in out.items()}
    count = max(total.pop("count"), 1.0)
    return {k: v / count for k, v in total.items()}

  train_iter = record_data.train_iterator(config, train_examples, pidx, pcount)
  return Offline(objective, frozen, frozen_shardings or None, train_iter, stats, eval_rows, evaluate)
