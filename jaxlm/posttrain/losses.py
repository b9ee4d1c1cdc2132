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


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _no_grad(sums: dict) -> dict:
  """Metric sums are for logging: they never carry gradient."""
  return {name: jax.lax.stop_gradient(value) for name, value in sums.items()}


# Log-probabilities and per-row picks.

def token_logprobs(logits, targets):
  """log softmax(logits)[target] at every position.

  logits: [rows, length, vocab]; targets: int [rows, length], already aligned with logits (the
  token each position predicts, as the batch's `targets`). Returns [rows, length]. Ids outside the
  vocabulary (e.g. -100 padding) are clipped into it: mask those positions out.
  """
  logits = _f32(logits)
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
  logits = _f32(logits)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, -1)


def last_index(mask):
  """Position of each row's last marked token: mask [rows, length] -> int32 [rows] (0 if none)."""
  positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(jnp.asarray(mask, bool), positions, 0), axis=-1)


def last_token_values(values, mask):
  """The scalar at each row's last marked token (a reward or value head's score of the sequence).

  values: [rows, length]; mask: [rows, length] -> [rows]; 0 for a row with no marked token.
  """
  values = _f32(values)
  picked = jnp.take_along_axis(values, last_index(mask)[:, None], axis=-1)[:, 0]
  return jnp.where(jnp.any(jnp.asarray(mask, bool), axis=-1), picked, 0.0)


# Preference pairs: DPO and IPO.

def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
             chosen_tokens=None, rejected_tokens=None, *, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
  """Direct preference optimization on sequence log-probs (Rafailov et al. 2023), TRL's DPOTrainer.

  Inputs [pairs]: each completion's log-prob summed over its tokens (sequence_logprobs) under the
  policy and the frozen reference. With z = (pi_c - pi_r) - (ref_c - ref_r), per pair:
    "sigmoid": -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z), eps = label_smoothing
               (conservative DPO; eps = 0 is DPO). ln 2 at z = 0, e.g. while policy == reference.
    "ipo":     (z - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17), where, as TRL does, every log-prob
               is first divided by its completion's token count (chosen_tokens, rejected_tokens
               [pairs]); label smoothing does not apply.
  Metrics (means per pair), from the implicit rewards r = beta (pi - ref) of the same (summed or
  averaged) log-probs: rewards/chosen, rewards/rejected, rewards/margins (r_c - r_r),
  rewards/accuracies ([r_c > r_r]). Returns (loss sum, metric sums, number of pairs).
  """
  if loss_type not in ("sigmoid", "ipo"):
    raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
  pc, pr, rc, rr = map(_f32, (policy_chosen, policy_rejected, reference_chosen, reference_rejected))
  if loss_type == "ipo":
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("dpo_loss(loss_type='ipo') averages log-probs over tokens: pass chosen_tokens "
                       "and rejected_tokens (each completion's token count)")
    if label_smoothing:
      raise ValueError("label_smoothing applies to loss_type='sigmoid' only; set it to 0 for 'ipo'")
    n_c, n_r = jnp.maximum(_f32(chosen_tokens), 1.0), jnp.maximum(_f32(rejected_tokens), 1.0)
    pc, rc, pr, rr = pc / n_c, rc / n_c, pr / n_r, rr / n_r
  z = (pc - pr) - (rc - rr)  # [pairs]
  if loss_type == "ipo":
    losses = jnp.square(z - 1.0 / (2.0 * beta))
  else:
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z)
              - label_smoothing * jax.nn.log_sigmoid(-beta * z))
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)  # implicit rewards [pairs]
  metrics = _no_grad({
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
  return jnp.mean(_f32(policy_kl_logps) - _f32(reference_kl_logps))


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
  z0 = jax.lax.stop_gradient(jnp.maximum(_f32(kl), 0.0))
  h = _f32(policy_logps) - _f32(reference_logps)  # [rows]
  losses = jnp.where(good, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (h - z0))),
                     undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - h))))
  count = jnp.asarray(h.shape[0], jnp.float32)
  rewards = beta * h
  metrics = _no_grad({
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
  r_c, r_r = _f32(chosen_rewards), _f32(rejected_rewards)
  diff = r_c - r_r if margin is None else r_c - r_r - _f32(margin)
  losses = -jax.nn.log_sigmoid(diff)
  if center_coefficient:
    losses = losses + center_coefficient * jnp.square(r_c + r_r)
  metrics = _no_grad({
      "loss": jnp.sum(losses),
      "accuracy": jnp.sum((r_c > r_r).astype(jnp.float32)),
      "rewards/chosen": jnp.sum(r_c),
      "rewards/rejected": jnp.sum(r_r),
      "rewards/margins": jnp.sum(r_c - r_r),
  })
  return jnp.sum(losses), metrics, jnp.asarray(r_c.shape[0], jnp.float32)


# Token-level aggregation, shared by GRPO and PPO.

def aggregate(per_token, mask, aggregation: str = "token"):
  """(sum, count) of per-token values [rows, length] over the mask, to divide once globally.

  "token":    the sum over all marked tokens; count = marked tokens. sum / count over the global
              batch is the mean over its tokens (TRL GRPO's "bnpo"/"dapo", PPO's masked mean).
  "sequence": each row's mean over its own tokens, summed over rows; count = rows with at least one
              marked token. sum / count is the mean over sequences of per-sequence means (TRL
              GRPO's "grpo", which also counts empty rows).
  """
  m = jnp.asarray(mask, bool)
  masked = jnp.where(m, _f32(per_token), 0.0)
  if aggregation == "token":
    return jnp.sum(masked), jnp.sum(m.astype(jnp.float32))
  if aggregation == "sequence":
    tokens = jnp.sum(m.astype(jnp.float32), axis=-1)  # [rows]
    row_means = jnp.sum(masked, axis=-1) / jnp.maximum(tokens, 1.0)
    return jnp.sum(row_means), jnp.sum((tokens > 0).astype(jnp.float32))
  raise ValueError(f"unknown aggregation {aggregation!r}; use 'token' or 'sequence'")


# GRPO.

def group_advantages(rewards, group_size: int, *, scale: str = "group", eps: float = 1e-4):
  """GRPO's advantages: each completion's reward against the other completions of its prompt.

  rewards: [prompts * group_size], each prompt's group_size completions adjacent -> [same].
    A = (r - mean of r over the group) / (std + eps)
  with std the unbiased (n - 1) standard deviation, as torch.std in TRL, of the group ("group"),
  of the whole batch ("batch"), or no division at all ("none", Dr. GRPO). A group whose rewards
  are all equal gets A = 0.
  """
  r = _f32(rewards)
  if group_size < 2 or r.ndim != 1 or r.shape[0] % group_size:
    raise ValueError(f"group_advantages needs rewards [prompts * group_size] with group_size >= 2; "
                     f"got shape {r.shape} and group_size {group_size}")
  groups = r.reshape(-1, group_size)
  centered = (groups - jnp.mean(groups, axis=-1, keepdims=True)).reshape(-1)
  if scale == "none":
    return centered
  if scale == "group":
    std = jnp.repeat(jnp.std(groups, axis=-1, ddof=1), group_size)
  elif scale == "batch":
    std = jnp.std(r, ddof=1)
  else:
    raise ValueError(f"group_advantages: unknown scale {scale!r}; use 'group', 'batch' or 'none'")
  return centered / (std + eps)


def k3_kl(logprobs, reference_logprobs):
  """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k3):
  exp(d) - d - 1 with d = ref - logp. Never negative, unbiased, 0 where the two agree. [rows, length]."""
  d = _f32(reference_logprobs) - _f32(logprobs)
  return jnp.exp(d) - d - 1.0


def grpo_loss(logprobs, advantages, mask, *, old_logprobs=None, reference_logprobs=None,
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              aggregation: str = "token"):
  """Group relative policy optimization (Shao et al. 2024), TRL's GRPOTrainer.

  logprobs: [rows, length] per-token log-probs of the sampled completions under the policy being
  trained; advantages: [rows] (group_advantages); mask: [rows, length], the completion tokens;
  old_logprobs: [rows, length] under the policy that sampled them (None: this policy, so the ratio
  is 1 with the gradient of logprobs, one update per generation); reference_logprobs: [rows,
  length] under the frozen reference, needed only when beta != 0. Per token:
    ratio = exp(logp - old_logp)
    loss  = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta k3_kl(logp, ref)
  epsilon_high defaults to epsilon (a larger one is DAPO's clip-higher). Aggregated by `aggregate`
  ("token" or "sequence"); every metric is aggregated the same way: clip_ratio/low (ratio below
  1 - epsilon with A < 0), clip_ratio/high (above 1 + epsilon_high with A > 0), clip_ratio/region
  (either; where the clipped side is taken, the token has no gradient), and kl (k3) when
  reference_logprobs is given. Returns (loss sum, metric sums, count).
  """
  if beta != 0.0 and reference_logprobs is None:
    raise ValueError("grpo_loss with beta != 0 needs reference_logprobs (or set beta=0: no KL term)")
  logp = _f32(logprobs)
  old = jax.lax.stop_gradient(logp) if old_logprobs is None else _f32(old_logprobs)
  adv = _f32(advantages)[:, None]  # [rows, 1]
  high = epsilon if epsilon_high is None else epsilon_high
  ratio = jnp.exp(logp - old)
  per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - epsilon, 1.0 + high) * adv)
  kl_sum = {}
  if reference_logprobs is not None:
    kl = k3_kl(logp, reference_logprobs)
    if beta != 0.0:
      per_token = per_token + beta * kl
    kl_sum["kl"] = aggregate(kl, mask, aggregation)[0]
  low_clipped = (ratio < 1.0 - epsilon) & (adv < 0)
  high_clipped = (ratio > 1.0 + high) & (adv > 0)
  loss_sum, count = aggregate(per_token, mask, aggregation)

  def fraction(flags):
    return aggregate(flags.astype(jnp.float32), mask, aggregation)[0]

  metrics = _no_grad({
      "loss": loss_sum,
      "clip_ratio/low": fraction(low_clipped),
      "clip_ratio/high": fraction(high_clipped),
      "clip_ratio/region": fraction(low_clipped | high_clipped),
      **kl_sum,
  })
  return loss_sum, metrics, count


# PPO.

def ppo_rewards(scores, mask, kl=None, *, kl_coef: float = 0.05):
  """RLHF's per-token rewards: -kl_coef kl on every marked token, plus the sequence's score on its
  last one. scores: [rows]; mask, kl: [rows, length] (kl e.g. logp - ref_logp, TRL's default "k1",
  or k3_kl; None: no penalty). Returns [rows, length], 0 off the mask. TRL puts the score one
  position past the last token (its padding_mask_p1); here it lands on the last token itself.
  """
  m = jnp.asarray(mask, bool)
  at_last = jnp.arange(m.shape[-1])[None, :] == last_index(m)[:, None]
  rewards = jnp.where(at_last & m, _f32(scores)[:, None], 0.0)
  if kl is not None:
    rewards = rewards - kl_coef * jnp.where(m, _f32(kl), 0.0)
  return rewards


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
  """Generalized advantage estimation (Schulman et al. 2016) over each row's marked tokens.

  rewards, values, mask: [rows, length], one episode per row: its marked tokens are contiguous (an
  unmarked prompt before them and padding after are fine; an unmarked gap would end the episode).
  Right to left, with V and A taken as 0 past a row's last marked token (the episode ends there):
    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   returns = A + V
  Returns (advantages, returns) [rows, length], 0 off the mask. No gradient flows (they are
  targets). TRL defaults: gamma 1, lam 0.95; TRL keeps one value past the last token and
  bootstraps from it (padding_mask_p1), where here the episode ends at the last token.
  """
  m = _f32(jnp.asarray(mask, bool))
  r, v = jax.lax.stop_gradient(_f32(rewards) * m), jax.lax.stop_gradient(_f32(values) * m)
  next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)  # is t + 1 in the episode
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1) * next_m
  delta = r + gamma * next_v - v

  def step(carry, x):  # carry: A_{t+1} [rows]
    delta_t, next_m_t = x
    a = delta_t + gamma * lam * next_m_t * carry
    return a, a

  _, adv = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32), (delta.T, next_m.T), reverse=True)
  adv = adv.T * m
  return adv, (adv + v) * m


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / sqrt(var + eps) over the marked entries, with the unbiased (n - 1) variance as
  TRL's masked_whiten; shift_mean=False adds the mean back. [rows, length] -> same, 0 off the mask.
  A batch statistic: apply it to the whole rollout batch (PPO whitens advantages), not per
  micro-batch."""
  m = _f32(jnp.asarray(mask, bool))
  x = _f32(x)
  n = jnp.sum(m)
  mean = jnp.sum(x * m) / n
  var = jnp.sum(jnp.square(x - mean) * m) / (n - 1.0)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  return (out if shift_mean else out + mean) * m


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, *,
             epsilon: float = 0.2, value_epsilon: float = 0.2, value_coef: float = 0.1,
             entropy=None, entropy_coef: float = 0.0):
  """Proximal policy optimization (Schulman et al. 2017) with a value head, TRL's PPOTrainer.

  Every input [rows, length]: logprobs and values from the model being trained; old_logprobs,
  old_values, advantages and returns from the rollout (gae, maybe masked_whiten'd advantages);
  entropy: optional token_entropy. Per token, with ratio = exp(logp - old_logp):
    policy  = max(-A ratio, -A clip(ratio, 1 - epsilon, 1 + epsilon))
    value   = 0.5 max((V - R)^2, (clip(V, V_old - value_epsilon, V_old + value_epsilon) - R)^2)
    loss    = policy + value_coef value - entropy_coef entropy
  aggregated over tokens (aggregate "token"). TRL has no entropy term (entropy_coef 0) and takes
  the value loss over one token more (padding_mask_p1); here every term uses the mask. Metrics
  (means per token): loss/policy, loss/value, clipfrac/policy, clipfrac/value,
  approx_kl (0.5 (logp - old_logp)^2) and entropy when given. Returns (loss sum, metric sums,
  token count).
  """
  logp, old, adv = _f32(logprobs), _f32(old_logprobs), _f32(advantages)
  v, old_v, ret = _f32(values), _f32(old_values), _f32(returns)
  ratio = jnp.exp(logp - old)
  policy_unclipped = -adv * ratio
  policy_clipped = -adv * jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
  policy = jnp.maximum(policy_unclipped, policy_clipped)
  value_unclipped = jnp.square(v - ret)
  value_clipped = jnp.square(jnp.clip(v, old_v - value_epsilon, old_v + value_epsilon) - ret)
  value = 0.5 * jnp.maximum(value_unclipped, value_clipped)
  per_token = policy + value_coef * value

  def total(x):
    return aggregate(x, mask, "token")[0]

  extra = {}
  if entropy is not None:
    per_token = per_token - entropy_coef * _f32(entropy)
    extra["entropy"] = total(entropy)
  loss_sum, count = aggregate(per_token, mask, "token")
  metrics = _no_grad({
      "loss": loss_sum,
      "loss/policy": total(policy),
      "loss/value": total(value),
      "clipfrac/policy": total((policy_clipped > policy_unclipped).astype(jnp.float32)),
      "clipfrac/value": total((value_clipped > value_unclipped).astype(jnp.float32)),
      "approx_kl": total(0.5 * jnp.square(logp - old)),
      **extra,
  })
  return loss_sum, metrics, count
