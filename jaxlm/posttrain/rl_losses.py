"""Reinforcement-learning losses: GRPO (group-normalized advantages, clipped ratio, k3 KL) and PPO
(GAE, clipped policy and value losses), with the (loss sum, metric sums, count) convention of
losses.py, so the train step divides once by the global count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.posttrain.losses import f32, last_index, no_grad


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
  masked = jnp.where(m, f32(per_token), 0.0)
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
  r = f32(rewards)
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
  d = f32(reference_logprobs) - f32(logprobs)
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
  logp = f32(logprobs)
  old = jax.lax.stop_gradient(logp) if old_logprobs is None else f32(old_logprobs)
  adv = f32(advantages)[:, None]  # [rows, 1]
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

  metrics = no_grad({
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
  rewards = jnp.where(at_last & m, f32(scores)[:, None], 0.0)
  if kl is not None:
    rewards = rewards - kl_coef * jnp.where(m, f32(kl), 0.0)
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
  m = f32(jnp.asarray(mask, bool))
  r, v = jax.lax.stop_gradient(f32(rewards) * m), jax.lax.stop_gradient(f32(values) * m)
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
  m = f32(jnp.asarray(mask, bool))
  x = f32(x)
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
  logp, old, adv = f32(logprobs), f32(old_logprobs), f32(advantages)
  v, old_v, ret = f32(values), f32(old_values), f32(returns)
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
    per_token = per_token - entropy_coef * f32(entropy)
    extra["entropy"] = total(entropy)
  loss_sum, count = aggregate(per_token, mask, "token")
  metrics = no_grad({
      "loss": loss_sum,
      "loss/policy": total(policy),
      "loss/value": total(value),
      "clipfrac/policy": total((policy_clipped > policy_unclipped).astype(jnp.float32)),
      "clipfrac/value": total((value_clipped > value_unclipped).astype(jnp.float32)),
      "approx_kl": total(0.5 * jnp.square(logp - old)),
      **extra,
  })
  return loss_sum, metrics, count
