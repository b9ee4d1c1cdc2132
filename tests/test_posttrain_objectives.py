"""Post-training objectives through jaxlm's real train step: DPO starts at ln 2 (policy = reference),
learns a fixed preference, and gives the same update from a frozen reference model or precomputed
reference log-probs, and with or without gradient accumulation."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm.config import base_config
from jaxlm.models import build_model
from jaxlm.posttrain.objectives import (completion_logprobs, dpo_objective, interleave_pairs,
                                        token_completion_logprobs)
from jaxlm.train.step import init_state, make_train_step



def tiny():
  c = base_config()
  c.model.update(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 max_seq_len=16)
  c.train.update(batch_size=8, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
  return c


def pair_batch(pairs=4, length=12, prompt=5, seed=0):
  """Rows of [prompt | completion]; weights on the completion's targets only."""
  rng = np.random.default_rng(seed)

  def rows(tokens):
    weights = np.zeros((pairs, length), np.int32)
    weights[:, prompt - 1:] = 1  # targets of the completion tokens
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
            "segment_ids": np.ones((pairs, length), np.int32),
            "positions": np.tile(np.arange(length, dtype=np.int32), (pairs, 1))}

  prompts = rng.integers(0, 32, (pairs, prompt))
  chosen = np.concatenate([prompts, rng.integers(0, 32, (pairs, length + 1 - prompt))], 1)
  rejected = np.concatenate([prompts, rng.integers(0, 32, (pairs, length + 1 - prompt))], 1)
  return interleave_pairs(rows(chosen.astype(np.int32)), rows(rejected.astype(np.int32)))


@pytest.mark.fast
def test_dpo_starts_at_ln2_and_learns_the_preference():
  c = tiny()
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  tx = optax.adam(1e-2)
  step = jax.jit(make_train_step(graphdef, tx, c.train, objective=dpo_objective(graphdef, beta=0.5)))
  state, frozen, batch = init_state(params, tx, 0), {"reference": params}, pair_batch()
  losses, accuracies = [], []
  for _ in range(15):
    state, metrics = step(state, batch, frozen)
    losses.append(float(metrics["loss"]))
    accuracies.append(float(metrics["rewards/accuracies"]))
  assert abs(losses[0] - math.log(2)) < 1e-6 and metrics["pairs"] == 4
  assert losses[-1] < 0.3 * losses[0] and accuracies[-1] == 1.0, losses


def test_precomputed_reference_and_accumulation_give_the_same_update():
  c = tiny()
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  tx = optax.sgd(0.1)
  batch = pair_batch(seed=1)
  objective = dpo_objective(graphdef, beta=0.1, label_smoothing=0.1)
  shifted = jax.tree.map(lambda p: p * 1.01, params)  # a reference that is not the policy
  updates = []
  for accum, precomputed in ((1, False), (1, True), (4, False)):
    c.train.grad_accum_steps = accum
    step = jax.jit(make_train_step(graphdef, tx, c.train, objective=objective))
    b, frozen = dict(batch), {"reference": shifted}
    if precomputed:
      b["reference_logps"] = np.asarray(token_completion_logprobs(graphdef, shifted, batch))
      frozen = {}
    state, metrics = step(init_state(params, tx, 0), b, frozen)
    updates.append(jax.tree.leaves(jax.tree.map(lambda a, p: np.asarray(a - p), state.params, params)))
  for other in updates[1:]:
    for a, b in zip(updates[0], other):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
