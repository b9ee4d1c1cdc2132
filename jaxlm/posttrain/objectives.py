"""Post-training objectives: a loss from jaxlm/posttrain/losses.py over the model's own forward pass,
packaged as the train step's `Objective` (jaxlm/train/step.py), so post-training runs the same pure,
sharded, accumulated step as pretraining.

Pair batches hold each preference pair in two adjacent rows (2i: the chosen completion, 2i + 1: the
rejected one), every row in the trainer's format (inputs, targets, segment_ids, positions, weights:
1 on the completion's targets). Adjacent rows stay on one device however the batch is split (the
row count per device is even), so pairing needs no communication.

`frozen` (the step's untrained parameters) is a dict: "reference": the reference model's
parameters (a frozen copy of the starting policy, sharded like it), absent when the batch carries
precomputed "reference_logps" [rows].
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


def completion_logprobs(graphdef, params, batch, forward=model_forward):
  """log p(completion | prompt) of every row: the sum of the weighted targets' log-probs [rows]."""
  logits, batch = forward(nnx.merge(graphdef, params), batch)
  return losses.sequence_logprobs(logits, batch["targets"], batch["weights"])[1]


def reference_logprobs(graphdef, frozen, batch, forward=model_forward):
  """The reference model's completion log-probs [rows]: precomputed in the batch, or computed from
  frozen["reference"] (no gradient flows into it)."""
  if "reference_logps" in batch:
    return batch["reference_logps"]
  return jax.lax.stop_gradient(completion_logprobs(graphdef, frozen["reference"], batch, forward))


def dpo_objective(graphdef, forward=model_forward, *, beta: float, label_smoothing: float = 0.0,
                  loss_type: str = "sigmoid") -> Objective:
  """DPO (loss_type "sigmoid", with conservative label smoothing) or IPO ("ipo") on pair batches."""
  def fn(params, frozen, batch):
    policy = completion_logprobs(graphdef, params, batch, forward)  # [2 pairs]
    reference = reference_logprobs(graphdef, frozen, batch, forward)
    tokens = jnp.sum(batch["weights"], axis=-1)
    return losses.dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                           tokens[0::2], tokens[1::2], beta=beta, label_smoothing=label_smoothing,
                           loss_type=loss_type)
  return Objective(fn, "pairs")
