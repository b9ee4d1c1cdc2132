"""Post-training objectives: a loss from jaxlm/posttrain/losses.py over the model's own forward pass,
packaged as the train step's `Objective` (jaxlm/train/step.py), so post-training runs the same pure,
sharded, accumulated step as pretraining.

Pair batches hold each preference pair in two adjacent rows (2i: the chosen completion, 2i + 1: the
rejected one), every row in the trainer's format (inputs, targets, segment_ids, positions, weights:
1 on the completion's targets). Adjacent rows stay on one device however the batch is split (the
row count per device is even), so pairing needs no communication.

`frozen` (the step's untrained parameters) is a dict: "reference": the reference model's
parameters (a frozen copy of the starting policy, sharded like it), absent when the batch carries
precomputed "reference_logps" [rows, seq_len] (per-token, 0 off the weights). KTO batches pair each
example with a mismatched one the same way, and a reward model's batches are preference pairs
(jaxlm/posttrain/record_data.py builds all of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.posttrain import losses
from jaxlm.train.step import Objective, model_forward


def interleave_pairs(chosen: dict, rejected: dict) -> dict:
  """Two numpy batches of n rows (pair i in row i of both) -> one of 2n rows, pair i in rows 2i
  and 2i + 1."""
  return {k: np.stack([chosen[k], rejected[k]], axis=1).reshape(-1, *chosen[k].shape[1:])
          for k in chosen}


def token_completion_logprobs(graphdef, params, batch, forward=model_forward):
  """Per-token log-probs of the weighted targets [rows, seq_len], 0 off the weights."""
  logits, batch = forward(nnx.merge(graphdef, params), batch)
  return losses.sequence_logprobs(logits, batch["targets"], batch["weights"])[0]


def completion_logprobs(graphdef, params, batch, forward=model_forward):
  """log p(completion | prompt) of every row: the sum of the weighted targets' log-probs [rows]."""
  return jnp.sum(token_completion_logprobs(graphdef, params, batch, forward), axis=-1)


def reference_logprobs(graphdef, frozen, batch, forward=model_forward):
  """The reference model's completion log-probs [rows]: precomputed in the batch (per token,
  "reference_logps" [rows, seq_len]), or computed from frozen["reference"] (no gradient)."""
  if "reference_logps" in batch:
    return jnp.sum(batch["reference_logps"], axis=-1)
  return jax.lax.stop_gradient(completion_logprobs(graphdef, frozen["reference"], batch, forward))


def dpo_objective(graphdef, forward=model_forward, *, beta: float, label_smoothing: float = 0.0,
                  loss_type: str = "sigmoid", rpo_alpha: float = 0.0) -> Objective:
  """DPO (loss_type "sigmoid", with conservative label smoothing) or IPO ("ipo") on pair batches;
  rpo_alpha > 0 adds the chosen completions' per-token NLL (losses.dpo_loss)."""
  def fn(params, frozen, batch):
    policy = completion_logprobs(graphdef, params, batch, forward)  # [2 pairs]
    reference = reference_logprobs(graphdef, frozen, batch, forward)
    tokens = jnp.sum(batch["weights"], axis=-1)
    return losses.dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                           tokens[0::2], tokens[1::2], beta=beta, label_smoothing=label_smoothing,
                           loss_type=loss_type, rpo_alpha=rpo_alpha)
  return Objective(fn, "pairs")


def kto_objective(graphdef, forward=model_forward, *, beta: float, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0) -> Objective:
  """KTO on example batches: row 2i the example (label in "desirable"), row 2i + 1 its prompt with
  another example's completion. The KL reference point is the mean of policy - reference over the
  mismatched rows the step sees (the micro-batch under gradient accumulation, as TRL's per-device
  batch); it carries no gradient."""
  def fn(params, frozen, batch):
    policy = completion_logprobs(graphdef, params, batch, forward)  # [2 examples]
    reference = reference_logprobs(graphdef, frozen, batch, forward)
    kl = jax.lax.stop_gradient(losses.kto_kl(policy[1::2], reference[1::2]))
    return losses.kto_loss(policy[0::2], reference[0::2], batch["desirable"][0::2, 0] > 0, kl,
                           beta=beta, desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight)
  return Objective(fn, "examples")


def _with_last_token(batch):
  """(inputs, positions, segment_ids, last [rows]) with each row's final token fed as an input too.

  A row's inputs stop one token short of the sequence (inputs = ids[:-1], targets = ids[1:]); a
  reward model scores the whole sequence, so its last target is written after its inputs (when the
  row has room) and the score is read there.
  """
  inputs, segment_ids = batch["inputs"], batch["segment_ids"]
  rows, width = inputs.shape
  n = jnp.sum(segment_ids > 0, axis=-1)  # [rows] real inputs
  room = n < width
  at = jnp.minimum(n, width - 1)
  r = jnp.arange(rows)
  last_target = batch["targets"][r, jnp.maximum(n - 1, 0)]
  inputs = inputs.at[r, at].set(jnp.where(room, last_target, inputs[r, at]))
  positions = batch["positions"].at[r, at].set(
      jnp.where(room, batch["positions"][r, jnp.maximum(n - 1, 0)] + 1, batch["positions"][r, at]))
  segment_ids = segment_ids.at[r, at].set(jnp.where(room, 1, segment_ids[r, at]))
  return inputs, positions, segment_ids, jnp.where(room, n, n - 1)


def sequence_scores(graphdef, params, batch):
  """The score head's value at each row's final token [rows] (a reward model's reward)."""
  inputs, positions, segment_ids, last = _with_last_token(batch)
  _, scores = nnx.merge(graphdef, params).logits_and_scores(inputs, positions, segment_ids)
  return jnp.take_along_axis(scores[..., 0], last[:, None], axis=-1)[:, 0]


def reward_objective(graphdef, *, center_coefficient: float = 0.0) -> Objective:
  """A reward model on pair batches: Bradley-Terry on the score head's value at each sequence's
  final token (chosen in row 2i, rejected in row 2i + 1)."""
  def fn(params, frozen, batch):
    del frozen
    r = sequence_scores(graphdef, params, batch)  # [2 pairs]
    return losses.reward_model_loss(r[0::2], r[1::2], center_coefficient=center_coefficient)
  return Objective(fn, "pairs")


def make_objective(config, graphdef, forward=model_forward) -> Objective | None:
  """The Objective config.posttrain.objective names for dpo/ipo/kto/reward; None for "lm" (the
  train step's default). grpo/ppo objectives are built by their rollout loop."""
  p = config.posttrain
  if p.objective in ("dpo", "ipo"):
    return dpo_objective(graphdef, forward, beta=p.beta, label_smoothing=p.label_smoothing,
                         loss_type="ipo" if p.objective == "ipo" else "sigmoid", rpo_alpha=p.rpo_alpha)
  if p.objective == "kto":
    return kto_objective(graphdef, forward, beta=p.beta, desirable_weight=p.kto_desirable_weight,
                         undesirable_weight=p.kto_undesirable_weight)
  if p.objective == "reward":
    return reward_objective(graphdef, center_coefficient=p.reward_center)
  return None
