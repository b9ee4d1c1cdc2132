"""The pure loss functions of post-training: DPO and IPO, KTO, reward models, GRPO and PPO.

Every loss returns (loss_sum, metric_sums, count), like the pretraining cross-entropy
(jaxlm/train/loss.py): sums over the batch's examples (pairs, sequences or tokens) and the number
to divide them by. The train step adds them up over micro-batches and divides once by the count of
the whole global batch (jaxlm/train/step.py, `Objective`), so gradient accumulation and packing
never change the update. Every metric sum is divided by that same count; a metric that needs
another denominator says so.

The definitions follow Hugging Face TRL's trainers (DPOTrainer, KTOTrainer, RewardTrainer,
GRPOTrainer, PPOTrainer); where jaxlm differs, the docstring says how. Inputs are cast to float32.
String and Python-number options are static: bind them before jax.jit (functools.partial).

Shapes: rows = sequences, length = tokens per row, vocab = vocabulary size, pairs = preference
pairs. A mask [rows, length] marks the tokens that count (the completion, not prompt or padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def f32(x):
  return jnp.asarray(x, jnp.float32)


def no_grad(sums: dict) -> dict:
  """Metric sums are for logging: they never carry gradient."""
  return {name: jax.lax.stop_gradient(value) for name, value in sums.items()}


# Log-probabilities and per-row picks.

def token_logprobs(logits, targets):
  """log softmax(logits)[target] at every position.

  logits: [rows, length, vocab]; targets: int [rows, length], already aligned with logits (the
  token each position predicts, as the batch's `targets`). Returns [rows, length]. Ids outside the
  vocabulary (e.g. -100 padding) are clipped into it: mask those positions out.
  """
  logits = f32(logits)
  targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(logits, targets, mask):
  """(per-token log-probs [rows, length], 0 off the mask; their sum per row [rows]).

  The sum is log pi(completion | prompt) when the mask marks the completion's tokens.
  """
  per_token = jnp.where(jnp.asarray(mask, bool), token_logprobs(logits, targets), 0.0)
  return per_token, jnp.sum(per_token, axis=-1)


def token_entropy(logits):
  """Entropy of the next-token distribution, H = logsumexp(z) - sum_v softmax(z)_v z_v.

  logits: [rows, length, vocab] -> [rows, length].
  """
  logits = f32(logits)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, -1)


def last_index(mask):
  """Position of each row's last marked token: mask [rows, length] -> int32 [rows] (0 if none)."""
  positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(jnp.asarray(mask, bool), positions, 0), axis=-1)


def last_token_values(values, mask):
  """The scalar at each row's last marked token (a reward or value head's score of the sequence).

  values: [rows, length]; mask: [rows, length] -> [rows]; 0 for a row with no marked token.
  """
  values = f32(values)
  picked = jnp.take_along_axis(values, last_index(mask)[:, None], axis=-1)[:, 0]
  return jnp.where(jnp.any(jnp.asarray(mask, bool), axis=-1), picked, 0.0)


# Preference pairs: DPO and IPO.

def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
             chosen_tokens=None, rejected_tokens=None, *, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid", rpo_alpha: float = 0.0):
  """Direct preference optimization on sequence log-probs (Rafailov et al. 2023), TRL's DPOTrainer.

  Inputs [pairs]: each completion's log-prob summed over its tokens (sequence_logprobs) under the
  policy and the frozen reference. With z = (pi_c - pi_r) - (ref_c - ref_r), per pair:
    "sigmoid": -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z), eps = label_smoothing
               (conservative DPO; eps = 0 is DPO). ln 2 at z = 0, e.g. while policy == reference.
    "ipo":     (z - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17), where, as TRL does, every log-prob
               is first divided by its completion's token count (chosen_tokens, rejected_tokens
               [pairs]); label smoothing does not apply.
  rpo_alpha > 0 adds rpo_alpha x the chosen completion's negative log-likelihood per token,
  -pi_c / chosen_tokens (RPO, Pang et al. 2024; TRL's rpo_alpha): DPO alone may lower the
  chosen completion's likelihood along with the rejected one's, and this term holds it up.
  Metrics (means per pair), from the implicit rewards r = beta (pi - ref) of the same (summed or
  averaged) log-probs: rewards/chosen, rewards/rejected, rewards/margins (r_c - r_r),
  rewards/accuracies ([r_c > r_r]). Returns (loss sum, metric sums, number of pairs).
  """
  if rpo_alpha and chosen_tokens is None:
    raise ValueError("dpo_loss(rpo_alpha > 0) needs chosen_tokens (the chosen completions' lengths)")
  nll = -f32(policy_chosen) / jnp.maximum(f32(chosen_tokens), 1.0) if rpo_alpha else None
  if loss_type not in ("sigmoid", "ipo"):
    raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
  pc, pr, rc, rr = map(f32, (policy_chosen, policy_rejected, reference_chosen, reference_rejected))
  if loss_type == "ipo":
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("dpo_loss(loss_type='ipo') averages log-probs over tokens: pass chosen_tokens "
                       "and rejected_tokens (each completion's token count)")
    if label_smoothing:
      raise ValueError("label_smoothing applies to loss_type='sigmoid' only; set it to 0 for 'ipo'")
    n_c, n_r = jnp.maximum(f32(chosen_tokens), 1.0), jnp.maximum(f32(rejected_tokens), 1.0)
    pc, rc, pr, rr = pc / n_c, rc / n_c, pr / n_r, rr / n_r
  z = (pc - pr) - (rc - rr)  # [pairs]
  if loss_type == "ipo":
    losses = jnp.square(z - 1.0 / (2.0 * beta))
  else:
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z)
              - label_smoothing * jax.nn.log_sigmoid(-beta * z))
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)  # implicit rewards [pairs]
  extra = {}
  if rpo_alpha:
    losses = losses + rpo_alpha * nll
    extra["nll/chosen"] = jnp.sum(nll)
  metrics = no_grad({
      **extra,
      "loss": jnp.sum(losses),
      "rewards/chosen": jnp.sum(chosen),
      "rewards/rejected": jnp.sum(rejected),
      "rewards/margins": jnp.sum(chosen - rejected),
      "rewards/accuracies": jnp.sum((chosen > rejected).astype(jnp.float32)),
  })
  return jnp.sum(losses), metrics, jnp.asarray(losses.shape[0], jnp.float32)


# Unpaired desirable / undesirable examples: KTO.

def kto_kl(policy_kl_logps, reference_kl_logps):
  """KTO's reference point: mean of pi - ref over mismatched (prompt, completion) pairs [rows] -> [].

  The mismatched pairs (each prompt with another row's completion) estimate KL(pi || ref) without
  rewarding the policy for the real completions. TRL takes this mean over each step's batch on all
  devices; for an update that does not depend on gradient accumulation, take it over the whole
  global batch before the loss (it carries no gradient). kto_loss clamps it at 0.
  """
  return jnp.mean(f32(policy_kl_logps) - f32(reference_kl_logps))


def kto_loss(policy_logps, reference_logps, desirable, kl, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """Kahneman-Tversky optimization (Ethayarajh et al. 2024), TRL's KTOTrainer.

  policy_logps, reference_logps: [rows] sequence log-probs; desirable: bool [rows] (the example's
  label); kl: [] the batch's KL estimate (kto_kl). With z0 = stop_gradient(max(kl, 0)) and
  h = pi - ref, per example:
    desirable:   desirable_weight   * (1 - sigmoid(beta (h - z0)))
    undesirable: undesirable_weight * (1 - sigmoid(beta (z0 - h)))
  The mean is over all examples of both kinds (TRL). Metrics: kl (z0); desirable (the fraction of
  desirable examples); rewards/desirable and rewards/undesirable, the sums of r = beta h over each
  kind divided by ALL examples: divide by `desirable` (resp. 1 - desirable) for TRL's
  rewards/chosen (resp. rewards/rejected), the mean over that kind. Returns (loss sum, metric sums,
  number of examples).
  """
  good = jnp.asarray(desirable, bool)
  z0 = jax.lax.stop_gradient(jnp.maximum(f32(kl), 0.0))
  h = f32(policy_logps) - f32(reference_logps)  # [rows]
  losses = jnp.where(good, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (h - z0))),
                     undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - h))))
  count = jnp.asarray(h.shape[0], jnp.float32)
  rewards = beta * h
  metrics = no_grad({
      "loss": jnp.sum(losses),
      "kl": z0 * count,
      "desirable": jnp.sum(good.astype(jnp.float32)),
      "rewards/desirable": jnp.sum(jnp.where(good, rewards, 0.0)),
      "rewards/undesirable": jnp.sum(jnp.where(good, 0.0, rewards)),
  })
  return jnp.sum(losses), metrics, count


# Reward models.

def reward_model_loss(chosen_rewards, rejected_rewards, margin=None, *, center_coefficient: float = 0.0):
  """Bradley-Terry loss of a scalar reward model, TRL's RewardTrainer.

  chosen_rewards, rejected_rewards: [pairs] (last_token_values of the reward head); margin: [pairs]
  or None, how much better the chosen one is required to be. Per pair:
    -log sigmoid(r_c - r_r - margin) + center_coefficient (r_c + r_r)^2
  (the second term keeps rewards centred on 0; TRL's center_rewards_coefficient). Metrics (means
  per pair): accuracy ([r_c > r_r], a tie counts as wrong), rewards/chosen, rewards/rejected,
  rewards/margins. Returns (loss sum, metric sums, number of pairs).
  """
  r_c, r_r = f32(chosen_rewards), f32(rejected_rewards)
  diff = r_c - r_r if margin is None else r_c - r_r - f32(margin)
  losses = -jax.nn.log_sigmoid(diff)
  if center_coefficient:
    losses = losses + center_coefficient * jnp.square(r_c + r_r)
  metrics = no_grad({
      "loss": jnp.sum(losses),
      "accuracy": jnp.sum((r_c > r_r).astype(jnp.float32)),
      "rewards/chosen": jnp.sum(r_c),
      "rewards/rejected": jnp.sum(r_r),
      "rewards/margins": jnp.sum(r_c - r_r),
  })
  return jnp.sum(losses), metrics, jnp.asarray(r_c.shape[0], jnp.float32)


# GRPO and PPO live in rl_losses.py; re-exported so callers find every loss here. Looked up on
# first use (PEP 562), not imported at the end of this module: rl_losses imports this module, so an
# eager import would fail whenever rl_losses is the first of the two to be imported.
_RL_LOSSES = ("aggregate", "gae", "group_advantages", "grpo_loss", "k3_kl", "masked_whiten", "ppo_loss",
              "ppo_rewards")


def __getattr__(name):
  if name in _RL_LOSSES:
    from jaxlm.posttrain import rl_losses  # pylint: disable=g-import-not-at-top
    return getattr(rl_losses, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
