"""Post-training losses against values worked out by hand on tiny batches, plus their invariants:
DPO is ln 2 at policy == reference, clipped tokens get no gradient, GAE matches a plain loop, and
sums over two halves of a batch equal the sums over the whole."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.posttrain import losses as L

LN2 = math.log(2.0)


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def softplus(x):  # -log sigmoid(-x)
  return math.log(1.0 + math.exp(x))


def means(loss_sum, metrics, count):
  """What the train step logs: every sum divided by the count."""
  return float(loss_sum / count), {k: float(v / count) for k, v in metrics.items()}


# Log-probabilities and per-row picks.

@pytest.mark.fast
def test_token_and_sequence_logprobs():
  # Logits are logs of unnormalized probabilities, so every log-prob is a simple fraction.
  logits = np.log(np.asarray([
      [[1, 2, 1], [3, 1, 4]],
      [[1, 1, 1], [5, 1, 1]],
  ], np.float64))
  logits[1, 0] += 5.0  # a shift changes nothing
  targets = np.asarray([[1, 0], [2, -100]])  # -100: padding, clipped into the vocabulary and masked
  mask = np.asarray([[1, 1], [1, 0]])
  per_token, sums = L.sequence_logprobs(logits, targets, mask)
  want = [[math.log(2 / 4), math.log(3 / 8)], [math.log(1 / 3), 0.0]]
  np.testing.assert_allclose(per_token, want, rtol=1e-6)
  np.testing.assert_allclose(sums, [math.log(2 / 4) + math.log(3 / 8), math.log(1 / 3)], rtol=1e-6)
  np.testing.assert_allclose(L.token_logprobs(logits, np.asarray([[0, 2], [0, 0]])),
                             [[math.log(1 / 4), math.log(4 / 8)], [math.log(1 / 3), math.log(5 / 7)]],
                             rtol=1e-6)
  assert per_token.dtype == jnp.float32


@pytest.mark.fast
def test_token_entropy():
  logits = np.log(np.asarray([[[1.0, 1.0, 1.0], [1.0, 2.0, 1.0]]]))
  # uniform over 3: ln 3; (1/4, 1/2, 1/4): 2 x 1/4 ln 4 + 1/2 ln 2 = 1.5 ln 2
  np.testing.assert_allclose(L.token_entropy(logits), [[math.log(3), 1.5 * LN2]], rtol=1e-6)


@pytest.mark.fast
def test_last_token_values():
  values = np.asarray([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]], np.float32)
  mask = np.asarray([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])  # right padding, a prompt, empty
  np.testing.assert_array_equal(L.last_index(mask), [2, 1, 0])
  np.testing.assert_array_equal(L.last_token_values(values, mask), [3, 6, 0])


# DPO and IPO.

DPO_BATCH = dict(policy_chosen=[-5.0, -9.0], policy_rejected=[-7.0, -8.0],
                 reference_chosen=[-6.0, -8.0], reference_rejected=[-6.0, -8.0])


@pytest.mark.fast
def test_dpo_by_hand():
  # z = (pi_c - pi_r) - (ref_c - ref_r): pair 0: 2 - 0 = 2; pair 1: -1 - 0 = -1. beta 0.1:
  # -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139; -log sigmoid(-0.1) = log(1 + e^0.1) = 0.744397.
  loss, metrics = means(*L.dpo_loss(**DPO_BATCH, beta=0.1))
  assert loss == pytest.approx((0.5981388693815918 + 0.744396660073571) / 2, rel=1e-6)
  # rewards beta (pi - ref): chosen 0.1 and -0.1, rejected -0.1 and 0; one pair of two is right.
  assert metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-7)
  assert metrics["rewards/rejected"] == pytest.approx(-0.05, rel=1e-6)
  assert metrics["rewards/margins"] == pytest.approx(0.05, rel=1e-6)
  assert metrics["rewards/accuracies"] == 0.5
  assert metrics["loss"] == pytest.approx(loss, rel=1e-6)
  # conservative DPO, eps 0.2: (1 - eps) log(1 + e^{-beta z}) + eps log(1 + e^{beta z})
  loss, _ = means(*L.dpo_loss(**DPO_BATCH, beta=0.1, label_smoothing=0.2))
  want = (0.8 * softplus(-0.2) + 0.2 * softplus(0.2) + 0.8 * softplus(0.1) + 0.2 * softplus(-0.1)) / 2
  assert loss == pytest.approx(want, rel=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.0), (2.0, 0.3)])
def test_dpo_is_ln2_when_policy_equals_reference(beta, label_smoothing):
  rng = np.random.default_rng(0)
  chosen, rejected = rng.normal(-20, 5, 6), rng.normal(-20, 5, 6)
  loss_sum, metrics, count = L.dpo_loss(chosen, rejected, chosen, rejected, beta=beta,
                                        label_smoothing=label_smoothing)
  assert float(loss_sum / count) == pytest.approx(LN2, rel=1e-6)
  assert float(metrics["rewards/accuracies"]) == 0.0  # equal rewards are not a right answer


@pytest.mark.fast
def test_rpo_adds_the_chosen_completions_nll_per_token():
  # DPO_BATCH's chosen log-probs -5 and -9 over 4 and 2 tokens: NLL per token 1.25 and 4.5, their
  # mean 2.875; alpha 0.5 adds 1.4375 to the DPO loss of test_dpo_by_hand.
  batch = {**DPO_BATCH, "chosen_tokens": [4, 2], "rejected_tokens": [1, 1]}
  dpo, _ = means(*L.dpo_loss(**batch, beta=0.1))
  loss, metrics = means(*L.dpo_loss(**batch, beta=0.1, rpo_alpha=0.5))
  assert loss == pytest.approx(dpo + 1.4375, rel=1e-6)
  assert metrics["nll/chosen"] == pytest.approx(2.875, rel=1e-6)
  with pytest.raises(ValueError, match="chosen_tokens"):
    L.dpo_loss(**DPO_BATCH, rpo_alpha=0.5)


@pytest.mark.fast
def test_ipo_averages_log_probs_over_tokens():
  # Token-averaged log-probs: pair 0: chosen -6/3 = -2 (ref -9/3 = -3), rejected -8/4 = -2 (ref
  # -8/4 = -2), z = 0 - (-1) = 1; pair 1: chosen -4/2, rejected -3/1, same under ref, z = 0.
  # beta 0.5: 1 / (2 beta) = 1, losses (1 - 1)^2 = 0 and (0 - 1)^2 = 1.
  loss, metrics = means(*L.dpo_loss([-6.0, -4.0], [-8.0, -3.0], [-9.0, -4.0], [-8.0, -3.0],
                                    chosen_tokens=[3, 2], rejected_tokens=[4, 1], beta=0.5,
                                    loss_type="ipo"))
  assert loss == pytest.approx(0.5, rel=1e-6)
  # rewards from the averaged log-probs: chosen 0.5 (-2 + 3) = 0.5 and 0; rejected 0 and 0
  assert metrics["rewards/chosen"] == pytest.approx(0.25, rel=1e-6)
  assert metrics["rewards/rejected"] == pytest.approx(0.0, abs=1e-7)
  with pytest.raises(ValueError, match="chosen_tokens"):
    L.dpo_loss(**DPO_BATCH, loss_type="ipo")
  with pytest.raises(ValueError, match="loss_type"):
    L.dpo_loss(**DPO_BATCH, loss_type="hinge")


# KTO.

@pytest.mark.fast
def test_kto_by_hand():
  # KL from mismatched pairs: mean(-7 - -8, -9 - -9) = 0.5. h = pi - ref = (1, -1, 0).
  kl = L.kto_kl([-7.0, -9.0], [-8.0, -9.0])
  assert float(kl) == pytest.approx(0.5)
  loss, metrics = means(*L.kto_loss([-4.0, -6.0, -5.0], [-5.0, -5.0, -5.0], [True, False, True], kl,
                                    beta=0.5, desirable_weight=1.0, undesirable_weight=1.5))
  # desirable: 1 - sigmoid(beta (h - 0.5)); undesirable: 1.5 (1 - sigmoid(beta (0.5 - h)))
  want = ((1 - sigmoid(0.5 * 0.5)) + 1.5 * (1 - sigmoid(0.5 * 1.5)) + (1 - sigmoid(0.5 * -0.5))) / 3
  assert loss == pytest.approx(want, rel=1e-6)
  assert want == pytest.approx(0.49374398374563694)
  assert metrics["kl"] == pytest.approx(0.5)
  assert metrics["desirable"] == pytest.approx(2 / 3)
  # TRL's rewards/chosen: the mean of beta h over desirable examples, (0.5 + 0) / 2
  assert metrics["rewards/desirable"] / metrics["desirable"] == pytest.approx(0.25, rel=1e-6)
  assert metrics["rewards/undesirable"] / (1 - metrics["desirable"]) == pytest.approx(-0.5, rel=1e-6)


@pytest.mark.fast
def test_kto_kl_is_clamped_and_carries_no_gradient():
  args = (jnp.asarray([-4.0, -6.0]), jnp.asarray([-5.0, -5.0]), jnp.asarray([True, False]))
  at_zero = L.kto_loss(*args, jnp.asarray(0.0))[0]
  assert float(L.kto_loss(*args, jnp.asarray(-0.3))[0]) == pytest.approx(float(at_zero))

  def through_kl(policy_kl):
    return L.kto_loss(*args, L.kto_kl(policy_kl, jnp.asarray([-8.0, -9.0])))[0]

  assert np.all(np.asarray(jax.grad(through_kl)(jnp.asarray([-7.0, -8.0]))) == 0.0)


# Reward models.

@pytest.mark.fast
def test_reward_model_by_hand():
  chosen, rejected = [2.0, 0.5], [1.0, 1.0]
  # r_c - r_r - margin: 2 - 1 - 0.5 = 0.5 and 0.5 - 1 - 0 = -0.5
  loss, metrics = means(*L.reward_model_loss(chosen, rejected, [0.5, 0.0]))
  assert loss == pytest.approx((softplus(-0.5) + softplus(0.5)) / 2, rel=1e-6)
  assert metrics["accuracy"] == 0.5
  assert metrics["rewards/margins"] == pytest.approx((1.0 - 0.5) / 2)
  assert metrics["rewards/chosen"] == pytest.approx(1.25)
  # without a margin, centred: + 0.01 (r_c + r_r)^2 = 0.01 x 9 and 0.01 x 2.25
  loss, _ = means(*L.reward_model_loss(chosen, rejected, center_coefficient=0.01))
  want = (softplus(-1.0) + 0.09 + softplus(0.5) + 0.0225) / 2
  assert loss == pytest.approx(want, rel=1e-6)


# GRPO.

@pytest.mark.fast
def test_group_advantages_by_hand():
  rewards = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0]
  # group 1: mean 0.5, deviations (0.5, -0.5, 0), unbiased variance 0.5 / 2, std 0.5
  # group 2: all equal, advantage 0; group 3: mean 1, deviations (-1, 2, -1), variance 6 / 2, std sqrt 3
  s3 = math.sqrt(3) + 1e-4
  want = [0.5 / 0.5001, -0.5 / 0.5001, 0, 0, 0, 0, -1 / s3, 2 / s3, -1 / s3]
  np.testing.assert_allclose(L.group_advantages(rewards, 3), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(L.group_advantages(rewards, 3, scale="none"),
                             [0.5, -0.5, 0, 0, 0, 0, -1, 2, -1], atol=1e-7)
  batch_std = np.std(rewards, ddof=1)
  deviations = np.asarray([0.5, -0.5, 0, 0, 0, 0, -1, 2, -1])
  np.testing.assert_allclose(L.group_advantages(rewards, 3, scale="batch"),
                             deviations / (batch_std + 1e-4), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="group_size"):
    L.group_advantages(rewards, 4)


@pytest.mark.fast
def test_group_advantages_are_normalized_per_group():
  rewards = np.random.default_rng(1).normal(3.0, 2.0, 4 * 8)
  adv = np.asarray(L.group_advantages(rewards, 8, eps=0.0)).reshape(4, 8)
  np.testing.assert_allclose(adv.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(adv.std(-1, ddof=1), 1.0, rtol=1e-5)


# Two rows: row 0 (A = +1) has 3 tokens with ratios 1.5, 0.5, 1; row 1 (A = -1) has 2 tokens with
# ratios 1.5, 0.5 and a padding token whose numbers are garbage. ref - logp: ln 2, 0, -ln 2 on row
# 0; 0, ln 2 on row 1.
GRPO_LOGP = np.asarray([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
GRPO_RATIO = np.asarray([[1.5, 0.5, 1.0], [1.5, 0.5, 100.0]])
GRPO_REF = GRPO_LOGP + np.asarray([[LN2, 0.0, -LN2], [0.0, LN2, 50.0]])
GRPO_MASK = np.asarray([[1, 1, 1], [1, 1, 0]])
GRPO_ADV = np.asarray([1.0, -1.0])


def grpo(aggregation, beta=0.0, logp=GRPO_LOGP):
  return L.grpo_loss(logp, GRPO_ADV, GRPO_MASK, old_logprobs=GRPO_LOGP - np.log(GRPO_RATIO),
                     reference_logprobs=GRPO_REF, epsilon=0.2, beta=beta, aggregation=aggregation)


@pytest.mark.fast
def test_grpo_by_hand():
  # -min(r A, clip(r, 0.8, 1.2) A) per token:
  # row 0, A = 1:  r 1.5 -> -min(1.5, 1.2) = -1.2;  r 0.5 -> -min(0.5, 0.8) = -0.5;  r 1 -> -1
  # row 1, A = -1: r 1.5 -> -min(-1.5, -1.2) = 1.5; r 0.5 -> -min(-0.5, -0.8) = 0.8
  # sums: row 0 -2.7 over 3 tokens, row 1 2.3 over 2 tokens
  loss, metrics = means(*grpo("token"))
  assert loss == pytest.approx((-2.7 + 2.3) / 5, rel=1e-5)
  # clipped: row 0 token 0 (high, A > 0), row 1 token 1 (low, A < 0): 2 tokens of 5
  assert metrics["clip_ratio/high"] == pytest.approx(1 / 5)
  assert metrics["clip_ratio/low"] == pytest.approx(1 / 5)
  assert metrics["clip_ratio/region"] == pytest.approx(2 / 5)
  # k3 = e^d - d - 1: d = ln 2 -> 1 - ln 2; d = -ln 2 -> ln 2 - 1/2; d = 0 -> 0.
  # KL sums: row 0 (1 - ln 2) + (ln 2 - 1/2) = 1/2, row 1 1 - ln 2.
  assert metrics["kl"] == pytest.approx((0.5 + 1 - LN2) / 5, rel=1e-5)
  loss, _ = means(*grpo("token", beta=0.04))
  assert loss == pytest.approx((-2.7 + 2.3 + 0.04 * (0.5 + 1 - LN2)) / 5, rel=1e-5)
  # "sequence": mean over rows of each row's token mean
  loss, metrics = means(*grpo("sequence"))
  assert loss == pytest.approx((-2.7 / 3 + 2.3 / 2) / 2, rel=1e-5)
  assert metrics["clip_ratio/region"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  loss, _ = means(*grpo("sequence", beta=0.04))
  assert loss == pytest.approx(((-2.7 + 0.04 * 0.5) / 3 + (2.3 + 0.04 * (1 - LN2)) / 2) / 2, rel=1e-5)


@pytest.mark.fast
def test_grpo_clipped_tokens_get_no_gradient():
  grad = jax.grad(lambda logp: grpo("token", logp=logp)[0])(jnp.asarray(GRPO_LOGP, jnp.float32))
  # d/dlogp of -r A is -r A where the unclipped side is the min; 0 where the clipped one is, and
  # on padding (the token sum is not divided here: the train step divides by the global count)
  np.testing.assert_allclose(grad, [[0.0, -0.5, -1.0], [1.5, 0.0, 0.0]], rtol=1e-5, atol=1e-7)


@pytest.mark.fast
def test_grpo_at_ratio_one_without_kl_is_minus_the_mean_advantage():
  rng = np.random.default_rng(2)
  logp = jnp.asarray(rng.normal(-2.0, 0.5, (4, 5)), jnp.float32)
  mask = np.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  adv = np.asarray([0.7, -1.2, 0.4, 2.0])
  tokens = mask.sum(-1)  # 5, 2, 3, 1
  loss, metrics = means(*L.grpo_loss(logp, adv, mask))
  assert loss == pytest.approx(-(adv * tokens).sum() / tokens.sum(), rel=1e-5)
  assert metrics["clip_ratio/region"] == 0.0 and "kl" not in metrics
  loss, _ = means(*L.grpo_loss(logp, adv, mask, aggregation="sequence"))
  assert loss == pytest.approx(-adv.mean(), rel=1e-5)
  # the policy gradient: -A on every token of the row
  grad = jax.grad(lambda lp: L.grpo_loss(lp, adv, mask)[0])(logp)
  np.testing.assert_allclose(grad, -adv[:, None] * mask, rtol=1e-6)


@pytest.mark.fast
def test_grpo_sequence_mean_ignores_padding_rows():
  # a row with no completion token (batch padding) adds nothing to the sum or to the count
  logp = np.concatenate([GRPO_LOGP, np.zeros((1, 3))])
  old = np.concatenate([GRPO_LOGP - np.log(GRPO_RATIO), np.ones((1, 3))])
  mask = np.concatenate([GRPO_MASK, np.zeros((1, 3))])
  loss_sum, _, count = L.grpo_loss(logp, np.append(GRPO_ADV, 5.0), mask, old_logprobs=old,
                                   aggregation="sequence")
  assert float(count) == 2.0
  assert float(loss_sum / count) == pytest.approx((-2.7 / 3 + 2.3 / 2) / 2, rel=1e-5)


@pytest.mark.fast
def test_grpo_errors():
  with pytest.raises(ValueError, match="reference_logprobs"):
    L.grpo_loss(GRPO_LOGP, GRPO_ADV, GRPO_MASK, beta=0.04)
  with pytest.raises(ValueError, match="aggregation"):
    L.grpo_loss(GRPO_LOGP, GRPO_ADV, GRPO_MASK, aggregation="tokens")


# PPO.

def gae_loop(rewards, values, mask, gamma, lam):
  """GAE the plain way: each row walked right to left over its own (contiguous) tokens."""
  adv = np.zeros_like(rewards)
  for row in range(rewards.shape[0]):
    steps = np.nonzero(mask[row])[0]
    last = 0.0
    for i in reversed(range(len(steps))):
      t = steps[i]
      next_value = values[row, steps[i + 1]] if i + 1 < len(steps) else 0.0
      delta = rewards[row, t] + gamma * next_value - values[row, t]
      last = delta + gamma * lam * last
      adv[row, t] = last
  return adv, (adv + values) * mask


@pytest.mark.fast
def test_gae_by_hand():
  # gamma = lam = 1: A_t = sum of future rewards - V_t, so the returns are all 1
  rewards = np.asarray([[0.0, 0.0, 1.0, 0.0]])
  values = np.asarray([[0.5, 0.6, 0.7, 9.0]])  # 9: padding, ignored
  mask = np.asarray([[1, 1, 1, 0]])
  adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(adv, [[0.5, 0.4, 0.3, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]], rtol=1e-6)
  # gamma 0.9, lam 0.8, a prompt token first: delta_2 = 1 - 0.4 = 0.6 = A_2;
  # delta_1 = 0.9 x 0.4 - 0.5 = -0.14, A_1 = -0.14 + 0.72 x 0.6 = 0.292
  adv, ret = L.gae([[5.0, 0.0, 1.0]], [[3.0, 0.5, 0.4]], [[0, 1, 1]], gamma=0.9, lam=0.8)
  np.testing.assert_allclose(adv, [[0.0, 0.292, 0.6]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[0.0, 0.792, 1.0]], rtol=1e-6)


@pytest.mark.fast
def test_gae_matches_a_plain_loop_on_ragged_rows():
  rng = np.random.default_rng(3)
  mask = np.asarray([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
  rewards = rng.normal(size=mask.shape) * mask
  values = rng.normal(size=mask.shape)  # garbage off the mask too
  want_adv, want_ret = gae_loop(rewards, values * mask, mask, 0.95, 0.9)
  adv, ret = jax.jit(functools.partial(L.gae, gamma=0.95, lam=0.9))(rewards, values, mask)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


@pytest.mark.fast
def test_ppo_rewards_and_whitening():
  mask = np.asarray([[1, 1, 1, 0], [0, 1, 1, 0]])
  kl = np.asarray([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, 0.5, 9.0]])
  np.testing.assert_allclose(L.ppo_rewards([1.0, 2.0], mask, kl, kl_coef=0.1),
                             [[-0.01, -0.02, 0.97, 0.0], [0.0, -0.05, 1.95, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(L.ppo_rewards([1.0, 2.0], mask), [[0, 0, 1, 0], [0, 0, 2, 0]])
  # 1, 2, 3: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1
  x, m = np.asarray([[1.0, 2.0, 3.0, 7.0]]), np.asarray([[1, 1, 1, 0]])
  np.testing.assert_allclose(L.masked_whiten(x, m), [[-1, 0, 1, 0]], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(L.masked_whiten(x, m, shift_mean=False), [[1, 2, 3, 0]], rtol=1e-6)


# Three tokens over two rows (row 0: t0, t1; row 1: t2), padding elsewhere.
PPO_MASK = np.asarray([[1, 1, 0], [1, 0, 0]])
PPO_LOGP = np.asarray([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
PPO = dict(
    old_logprobs=PPO_LOGP - np.log([[1.5, 0.5, 1.0], [1.0, 1.0, 1.0]]),
    advantages=np.asarray([[1.0, -2.0, 0.0], [0.5, 0.0, 0.0]]),
    values=np.asarray([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]]),
    old_values=np.asarray([[0.5, 0.1, 0.0], [3.5, 0.0, 0.0]]),
    returns=np.asarray([[2.0, 0.0, 0.0], [3.2, 0.0, 0.0]]),
    mask=PPO_MASK,
)


@pytest.mark.fast
def test_ppo_by_hand():
  # policy max(-A r, -A clip(r, 0.8, 1.2)):
  #   t0 A 1, r 1.5: max(-1.5, -1.2) = -1.2 (clipped); t1 A -2, r 0.5: max(1.0, 1.6) = 1.6 (clipped);
  #   t2 A 0.5, r 1: -0.5
  # value 0.5 max((V - R)^2, (clip(V, V_old -+ 0.2) - R)^2):
  #   t0 V 1 -> clipped 0.7, R 2: 0.5 max(1, 1.69) = 0.845 (clipped); t1 0;
  #   t2 V 3 -> clipped 3.3, R 3.2: 0.5 max(0.04, 0.01) = 0.02
  loss, metrics = means(*L.ppo_loss(PPO_LOGP, **PPO, epsilon=0.2, value_epsilon=0.2, value_coef=0.1))
  assert loss == pytest.approx((-1.2 + 1.6 - 0.5 + 0.1 * (0.845 + 0.02)) / 3, rel=1e-5)
  assert metrics["loss/policy"] == pytest.approx(-0.1 / 3, rel=1e-5)
  assert metrics["loss/value"] == pytest.approx(0.865 / 3, rel=1e-5)
  assert metrics["clipfrac/policy"] == pytest.approx(2 / 3)
  assert metrics["clipfrac/value"] == pytest.approx(1 / 3)
  assert metrics["approx_kl"] == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3, rel=1e-5)
  entropy = np.asarray([[1.0, 2.0, 9.0], [0.5, 9.0, 9.0]])
  loss, metrics = means(*L.ppo_loss(PPO_LOGP, **PPO, entropy=entropy, entropy_coef=0.01))
  assert loss == pytest.approx((-0.1 + 0.0865 - 0.01 * 3.5) / 3, rel=1e-5)
  assert metrics["entropy"] == pytest.approx(3.5 / 3)


@pytest.mark.fast
def test_ppo_clipped_tokens_get_no_gradient():
  grad = jax.grad(lambda logp: L.ppo_loss(logp, **PPO)[0])(jnp.asarray(PPO_LOGP, jnp.float32))
  # t0 and t1 are clipped; t2: d/dlogp (-A r) = -0.5
  np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0], [-0.5, 0.0, 0.0]], atol=1e-7)
  grad_v = jax.grad(lambda v: L.ppo_loss(PPO_LOGP, **{**PPO, "values": v})[0])(
      jnp.asarray(PPO["values"], jnp.float32))
  # t0's value is clipped (its loss is the clipped one): no gradient; t2: 0.1 x (V - R) = -0.02
  np.testing.assert_allclose(grad_v, [[0.0, 0.0, 0.0], [-0.02, 0.0, 0.0]], rtol=1e-5, atol=1e-7)


# The sums/count convention.

def halves(fn, *arrays, **options):
  """fn on the whole batch and on its two halves (first axis): (whole, sum of halves)."""
  n = len(arrays[0]) // 2
  whole = fn(*arrays, **options)
  first = fn(*(a[:n] for a in arrays), **options)
  second = fn(*(a[n:] for a in arrays), **options)
  return whole, jax.tree.map(jnp.add, first, second)


def assert_same_sums(whole, split):
  np.testing.assert_allclose(whole[0], split[0], rtol=1e-5)
  np.testing.assert_allclose(whole[2], split[2])
  assert set(whole[1]) == set(split[1])
  for name in whole[1]:
    np.testing.assert_allclose(whole[1][name], split[1][name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.fast
def test_halves_add_up_to_the_whole_batch():
  rng = np.random.default_rng(4)
  pairs = [rng.normal(-10, 3, 6) for _ in range(4)]
  tokens = [rng.integers(1, 9, 6) for _ in range(2)]
  assert_same_sums(*halves(L.dpo_loss, *pairs, beta=0.1, label_smoothing=0.1))
  assert_same_sums(*halves(L.dpo_loss, *pairs, *tokens, beta=0.1, loss_type="ipo"))
  assert_same_sums(*halves(L.reward_model_loss, pairs[0], pairs[1], pairs[2] * 0.01,
                           center_coefficient=0.01))
  kto = functools.partial(L.kto_loss, kl=0.3)
  assert_same_sums(*halves(kto, pairs[0], pairs[1], np.asarray([1, 0, 1, 1, 0, 0], bool)))

  mask = np.asarray([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
  shape = mask.shape
  logp, old, ref = (rng.normal(-2, 0.3, shape) for _ in range(3))
  adv = rng.normal(size=shape[0])
  for aggregation in ("token", "sequence"):
    def grpo_sums(lp, a, m, o, r):
      return L.grpo_loss(lp, a, m, old_logprobs=o, reference_logprobs=r, beta=0.04,
                         aggregation=aggregation)
    assert_same_sums(*halves(grpo_sums, logp, adv, mask, old, ref))

  def ppo_sums(lp, o, a, v, ov, ret, m, ent):
    return L.ppo_loss(lp, o, a, v, ov, ret, m, entropy=ent, entropy_coef=0.01)

  advantages, values, old_values, returns, entropy = (rng.normal(size=shape) for _ in range(5))
  assert_same_sums(*halves(ppo_sums, logp, old, advantages, values, old_values, returns, mask,
                           np.abs(entropy)))


@pytest.mark.fast
def test_losses_jit():
  jitted = jax.jit(functools.partial(L.grpo_loss, beta=0.04, aggregation="sequence"))
  eager = grpo("sequence", beta=0.04)
  got = jitted(GRPO_LOGP, GRPO_ADV, GRPO_MASK, old_logprobs=GRPO_LOGP - np.log(GRPO_RATIO),
               reference_logprobs=GRPO_REF)
  np.testing.assert_allclose(got[0], eager[0], rtol=1e-6)
  got = jax.jit(functools.partial(L.dpo_loss, beta=0.1))(*map(np.asarray, DPO_BATCH.values()))
  np.testing.assert_allclose(got[0], L.dpo_loss(**DPO_BATCH, beta=0.1)[0], rtol=1e-6)
  got = jax.jit(L.ppo_loss)(PPO_LOGP, *PPO.values())
  np.testing.assert_allclose(got[0], L.ppo_loss(PPO_LOGP, **PPO)[0], rtol=1e-6)
  args = (np.asarray([-4.0, -6.0]), np.asarray([-5.0, -5.0]), np.asarray([True, False]), 0.2)
  np.testing.assert_allclose(jax.jit(L.kto_loss)(*args)[0], L.kto_loss(*args)[0], rtol=1e-6)
  args = (np.asarray([2.0, 0.5]), np.asarray([1.0, 1.0]), np.asarray([0.5, 0.0]))
  np.testing.assert_allclose(jax.jit(L.reward_model_loss)(*args)[0], L.reward_model_loss(*args)[0],
                             rtol=1e-6)
