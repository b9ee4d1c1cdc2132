"""GRPO and PPO as the train step's `Objective` (jaxlm/train/step.py), and the pure function that
scores a rollout once before its updates.

Rollout batches are one (prompt + completion) a row (jaxlm/posttrain/rollout.py): the trainer's
int32 features with weights 1 on the completion's targets, plus float32 per-token features
[rows, seq_len] at the same positions (every feature is [rows, seq_len], so one batch sharding
places them all and micro-batches split them alike):
  old_logprobs        the policy's log-probs when the rollout was sampled (ratio denominators)
  advantages          grpo: the row's group advantage on every position; ppo: whitened GAE
  reference_logprobs  grpo with kl_beta > 0: the frozen reference's log-probs
  old_values, returns ppo: the value head's outputs at sampling time, and GAE's targets

`score_rollout` computes those from the policy (and the reference, when there is one) in one
jitted forward pass over the whole rollout batch, before its posttrain.updates_per_rollout
updates: the reference's log-probs do not change while the policy trains, so they are computed once
per rollout rather than once per update, and PPO's advantage whitening is a statistic of the whole
rollout batch, which a micro-batched step could not take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.posttrain import losses, rl_losses
from jaxlm.train.step import Objective, model_forward


def tempered_logprobs(logits, targets, temperature: float):
  """Log-probs of the targets under softmax(logits / temperature): the policy that sampled at that
  temperature (TRL's trainers divide the logits the same way). temperature 0 or 1: the logits'."""
  if temperature not in (0.0, 1.0):
    logits = logits / temperature
  return losses.token_logprobs(logits, targets)


def grpo_objective(graphdef, forward=model_forward, *, epsilon: float, beta: float = 0.0,
                   aggregation: str = "token", temperature: float = 1.0) -> Objective:
  """GRPO's clipped surrogate (+ beta k3 KL to precomputed reference log-probs), for the policy
  at the rollouts' temperature."""
  def fn(params, frozen, batch):  # pylint: disable=unused-argument
    logits, batch = forward(nnx.merge(graphdef, params), batch)
    logp = tempered_logprobs(logits, batch["targets"], temperature)  # [rows, length]
    return rl_losses.grpo_loss(
        logp, batch["advantages"][:, 0], batch["weights"], old_logprobs=batch["old_logprobs"],
        reference_logprobs=batch.get("reference_logprobs"), epsilon=epsilon, beta=beta,
        aggregation=aggregation)
  return Objective(fn, "tokens" if aggregation == "token" else "sequences")


def logits_and_values(graphdef, params, batch):
  """(logits [rows, length, vocab], the value head's outputs [rows, length])."""
  model = nnx.merge(graphdef, params)
  logits, scores = model.logits_and_scores(batch["inputs"], batch["positions"], batch["segment_ids"])
  return logits, scores[..., 0]


def ppo_objective(graphdef, *, epsilon: float, value_epsilon: float, value_coef: float,
                  temperature: float = 1.0) -> Objective:
  """PPO's clipped policy loss + value_coef x clipped value loss, on a model with a score head."""
  def fn(params, frozen, batch):  # pylint: disable=unused-argument
    logits, values = logits_and_values(graphdef, params, batch)
    logp = tempered_logprobs(logits, batch["targets"], temperature)
    return rl_losses.ppo_loss(logp, batch["old_logprobs"], batch["advantages"], values,
                              batch["old_values"], batch["returns"], batch["weights"],
                              epsilon=epsilon, value_epsilon=value_epsilon, value_coef=value_coef)
  return Objective(fn, "tokens")


def make_rollout_scorer(graphdef, reference_graphdef, p):
  """score(params, reference_params or None, batch) -> (features to add to the batch, {stat: value}).

  batch: the rollout rows plus "rewards" [rows, length] (each row's summed reward on every
  position) for PPO, or "advantages" (grpo, already computed) passed through. p: config.posttrain.
  Log-probs are those of the policy at posttrain.temperature (logits / temperature), the
  distribution the rollouts were sampled from. Stats (means over completion tokens): kl (k3 to
  the reference, when there is one), logprob_gap (|sampler's log-prob - learner's|, both at
  temperature 1: decoding and training forward passes agree to rounding);
  ppo also value (mean value) and advantage_raw (mean GAE before whitening).
  """
  ppo, temperature = p.objective == "ppo", p.temperature

  def score(params, reference, batch):
    mask = batch["weights"].astype(bool)
    m = mask.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    if ppo:
      logits, values = logits_and_values(graphdef, params, batch)
    else:
      logits, _ = model_forward(nnx.merge(graphdef, params), batch)  # in the rows' own order
    untempered = losses.token_logprobs(logits, batch["targets"])  # what the sampler reports
    logp = jnp.where(mask, tempered_logprobs(logits, batch["targets"], temperature), 0.0)
    out = {"old_logprobs": logp}
    stats = {"logprob_gap": jnp.sum(jnp.abs(untempered - batch["sample_logprobs"]) * m) / tokens}
    ref = None
    if reference is not None:
      ref_logits, _ = model_forward(nnx.merge(reference_graphdef, reference), batch)
      ref = jnp.where(mask, tempered_logprobs(ref_logits, batch["targets"], temperature), 0.0)
      out["reference_logprobs"] = ref
      stats["kl"] = jnp.sum(rl_losses.k3_kl(logp, ref) * m) / tokens
    if ppo:
      scores = batch["rewards"][:, 0]
      kl = None if ref is None else logp - ref  # k1 per token, as TRL's PPO
      rewards = rl_losses.ppo_rewards(scores, mask, kl, kl_coef=p.ppo_kl_coef)
      values = jnp.where(mask, values, 0.0)
      adv, returns = rl_losses.gae(rewards, values, mask, gamma=p.gamma, lam=p.gae_lambda)
      out.update(advantages=rl_losses.masked_whiten(adv, mask), old_values=values, returns=returns)
      stats.update(value=jnp.sum(values) / tokens, advantage_raw=jnp.sum(adv) / tokens)
    return jax.lax.stop_gradient(out), stats

  return score
