"""The pure train and eval steps: (state, batch) -> (state, metrics), jitted by the loop.

A batch is a dict of int32 arrays [rows, seq_len]: inputs, targets, segment_ids, positions, weights
(see jaxlm/data/pipeline.py). With train.grad_accum_steps = k the rows are split into k
micro-batches run by a lax.scan; gradients and losses are summed and divided once by the total
token count, so the update equals the one-big-batch update exactly. What is minimized is an
`Objective` (default: next-token cross-entropy); post-training objectives (jaxlm/posttrain/)
plug in the same way, with their own batches and the frozen parameters they need.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.models import moe
from jaxlm.train.chunked_loss import chunked_cross_entropy
from jaxlm.train.loss import MOE_COUNTS, cross_entropy, moe_terms
from jaxlm.train.offload import offloaded_update
from jaxlm.train.optimizer import schedule


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer updates done
  params: nnx.State  # the model's nnx.Param state
  opt_state: optax.OptState
  # uint32[2] key, advanced every step. No op in the step draws from it yet (no dropout); the
  # end-of-training sample does, and it is saved and restored so a stochastic op added later
  # resumes exactly.
  rng: jax.Array


def init_state(params, tx, seed: int) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))


def model_forward(model, batch, head=True):
  """The plain forward pass: (logits [rows, length, vocab], the batch); head=False: the final
  hidden state [rows, length, embed] instead of the logits. See setup.forward_fn for the mesh-aware
  ones (pipeline stages, balanced sequence order)."""
  return model(batch["inputs"], batch["positions"], batch["segment_ids"], head=head), batch


def loss_sums(graphdef, params, batch, z_loss: float, forward=model_forward, frozen=None,
              chunk: int = 0):
  """(nll sum, z-loss sum, token count) of one batch; see loss.cross_entropy. frozen: parameters
  the graphdef also needs that are not trained (None: params are the whole model). chunk > 0
  (train.loss_chunk): the head and the loss run over pieces of `chunk` tokens of the sequence
  (jaxlm/train/chunked_loss.py), never holding the whole batch's logits; forward must take head=."""
  states = (params,) if frozen is None else (params, frozen)
  model = nnx.merge(graphdef, *states)
  if chunk:
    x, batch = forward(model, batch, head=False)
    return chunked_cross_entropy(model.head, x, batch["targets"], batch["weights"], z_loss, chunk)
  logits, batch = forward(model, batch)
  return cross_entropy(logits, batch["targets"], batch["weights"], z_loss)


class Objective(NamedTuple):
  """What a train step minimizes. fn(params, frozen, batch) -> (loss sum, {metric: sum}, count):
  sums over the batch's examples (tokens, pairs, sequences), divided once by the count of the whole
  global batch after gradient accumulation, so micro-batching and packing never change the update.
  frozen is whatever the objective needs but does not train (a reference model, LoRA's base
  weights), or None. count_name names the count in the metrics ("tokens", "pairs", ...)."""
  fn: Callable
  count_name: str = "tokens"


def lm_objective(graphdef, z_loss: float, forward=model_forward, moe_balance: float = 0.0,
                 moe_z: float = 0.0, chunk: int = 0) -> Objective:
  """Next-token cross-entropy over the batch's weighted targets (pretraining, and SFT whose weights
  mark the assistant's tokens), plus z_loss x log(Z)^2; a MoE model adds its router terms
  (loss.moe_terms, weights moe_balance and moe_z) and reports its expert load. chunk:
  train.loss_chunk (see loss_sums)."""
  def fn(params, frozen, batch):
    with moe.collect_stats() as stats:
      nll, z, count = loss_sums(graphdef, params, batch, z_loss, forward, frozen, chunk)
    if not stats:
      return nll + z, {"loss": nll}, count
    router_loss, sums = moe_terms(stats, count, moe_balance, moe_z)
    return nll + z + router_loss, {"loss": nll, **sums}, count
  return Objective(fn)


def make_train_step(graphdef, tx: optax.GradientTransformation, train_cfg, forward=model_forward,
                    objective: Objective | None = None, offload=None):
  """Returns train_step(state, batch, frozen=None) -> (state, metrics); pure, for jax.jit with
  donated state. objective: default the language-model one (`lm_objective`). offload: (the
  optimizer's parts, params-shaped stacked-layer mask) when the optimizer state lives in host
  memory (compute.offload_optimizer; jaxlm/train/offload.py), else None.

  With train.skip_nonfinite, a step whose loss (any metric), gradient norm or update is not finite
  leaves params and optimizer state as they were (step and RNG still advance: the batch is
  consumed) and reports metrics["skipped"] = 1; the loop counts and logs such steps.

  MoE models: the expert load (loss.MOE_COUNTS) becomes scalar metrics (moe.load_metrics) plus the
  raw tokens per expert (moe.EXPERT_LOAD, [moe layers, experts]), and a
  sigmoid router's bias moves by train.moe_bias_rate toward balance (moe.update_router_bias) in
  the same step, after the optimizer, under the same non-finite guard."""
  accum, lr_at = train_cfg.grad_accum_steps, schedule(train_cfg)
  guard = train_cfg.skip_nonfinite
  if objective is None:
    objective = lm_objective(graphdef, train_cfg.z_loss, forward, train_cfg.moe_balance_loss,
                             train_cfg.moe_z_loss, train_cfg.loss_chunk)

  def total(params, frozen, batch):
    loss, sums, count = objective.fn(params, frozen, batch)
    return loss, (sums, count)

  grad_fn = jax.value_and_grad(total, has_aux=True)

  def train_step(state: TrainState, batch, frozen=None):
    if accum == 1:
      (_, (sums, count)), grads = grad_fn(state.params, frozen, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
      # the objective's metric sums, as shapes, to start the running totals at zero
      (_, (sums0, _)), _ = jax.eval_shape(grad_fn, state.params, frozen,
                                          jax.tree.map(lambda x: x[0], micro))

      def add(carry, mb):
        (_, (sums, count)), grads = grad_fn(state.params, frozen, mb)
        return jax.tree.map(jnp.add, carry, (grads, sums, count)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0), jnp.zeros(()))
      (grads, sums, count), _ = jax.lax.scan(add, zeros, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    counts = {name: sums[name] for name in MOE_COUNTS if name in sums}  # a MoE model's expert load
    metrics = {name: value / denom for name, value in sums.items() if name not in counts}
    grad_norm = optax.global_norm(grads)
    if offload is not None:
      # The moments go back to host memory layer by layer, so whether to keep them is decided
      # before the update, from what makes an update non-finite: gradient, metrics, learning rate.
      ok = None
      if guard:
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(lr_at(state.step))
        for value in metrics.values():
          ok &= jnp.all(jnp.isfinite(value))
      updates, opt_state = offloaded_update(offload[0], grads, state.opt_state, state.params,
                                            offload[1], ok)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if counts:  # a MoE model: load metrics; a sigmoid router's bias (its only leaves) moves, under the guard
      metrics.update(moe.load_metrics(counts["moe_load"], counts["moe_dropped"]))
      metrics[moe.EXPERT_LOAD] = counts["moe_load"]  # the loop sums it over each log window
      if train_cfg.moe_bias_rate:
        params = moe.update_router_bias(params, counts["moe_load"], train_cfg.moe_bias_rate)
    if guard and offload is not None:
      finite = ok & jnp.isfinite(optax.global_norm(updates))
      params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), params, state.params)
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    elif guard:
      # Decided on device, so no step waits for the host. The update is checked too: a finite
      # gradient times a non-finite learning rate would poison the weights just the same.
      finite = jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
      for value in metrics.values():
        finite &= jnp.all(jnp.isfinite(value))
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    metrics.update({
        "grad_norm": grad_norm,
        "learning_rate": lr_at(state.step),
        objective.count_name: count,
    })
    new_state = TrainState(state.step + 1, params, opt_state, jax.random.fold_in(state.rng, state.step))
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, token_bytes, forward=model_forward, chunk: int = 0):
  """Returns eval_step(params, batch, frozen=None) -> sums of nll (nats), tokens and UTF-8 bytes of
  the targets; frozen: parameters the graphdef also needs (LoRA's base weights), as in train_step;
  chunk: train.loss_chunk (see loss_sums).

  Bits per byte = nll_sum / ln 2 / bytes is comparable across tokenizers, unlike perplexity.
  """
  token_bytes = jnp.asarray(token_bytes, jnp.float32)

  def eval_step(params, batch, frozen=None):
    nll, _, count = loss_sums(graphdef, params, batch, 0.0, forward, frozen, chunk)
    nbytes = jnp.sum(token_bytes[batch["targets"]] * batch["weights"])
    return {"nll": nll, "tokens": count, "bytes": nbytes}

  return eval_step


def summarize_eval(sums: dict) -> dict:
  """Turns summed eval numbers into loss (nats/token), perplexity and bits per byte."""
  loss = sums["nll"] / max(sums["tokens"], 1)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50)),
          "bits_per_byte": sums["nll"] / math.log(2) / max(sums["bytes"], 1)}
