"""GRPO and PPO: reward registry, rollout rows, the objectives through jaxlm's real train step on
a tiny model (GRPO learns a toy preference; PPO's value loss falls), and config errors."""

import functools
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm.config import ConfigError, base_config, validate
from jaxlm.inference.decode import generate_batch
from jaxlm.models import build_model
from jaxlm.posttrain import rewards, rl_losses, rl_objectives, rollout
from jaxlm.posttrain.rl_loop import check_config
from jaxlm.train.step import init_state, make_train_step

fast = pytest.mark.fast


# --- rewards ------------------------------------------------------------------------------------

@fast
def test_reward_functions_and_their_sum():
  record = {"prompt": "12+45=", "answer": "57"}
  em, fmt = rewards.REGISTRY["exact_match"].fn, rewards.REGISTRY["format"].fn
  assert [em(c, record) for c in ("57\n", "57", "57\n9", "58\n", "5", "")] == [1, 1, 1, 0, 0, 0]
  assert [fmt(c, record) for c in ("57\n", "57", "5x\n", "x57\n", "", "\n")] == [1, 0.5, 0.25, 0, 0, 0]
  total, each = rewards.score(rewards.resolve("exact_match, format"), ["57\n", "58", "a"], [record] * 3)
  assert total == [2.0, 0.5, 0.0] and each == {"exact_match": [1, 0, 0], "format": [1, 0.5, 0]}


@fast
def test_unknown_or_repeated_reward_is_a_config_error_listing_the_registered_ones():
  with pytest.raises(ConfigError, match=r"'exact_mach' is not a registered reward.*'exact_match', 'format'"):
    rewards.resolve("exact_mach")
  with pytest.raises(ConfigError, match="twice"):
    rewards.resolve("format,format")
  with pytest.raises(ConfigError, match="2 of the 3 records in data.jsonl lack it"):
    rewards.check_records(rewards.resolve("exact_match"), [{"answer": "1"}, {}, {}], "data.jsonl")


@fast
def test_registering_a_reward():
  @rewards.register("test_length")
  def length(completion, record):  # pylint: disable=unused-argument
    return float(len(completion))
  try:
    assert rewards.score(rewards.resolve("test_length"), ["abc"], [{}])[0] == [3.0]
    with pytest.raises(ValueError, match="already registered"):
      rewards.register("test_length")(length)
  finally:
    del rewards.REGISTRY["test_length"]


# --- rollout rows -------------------------------------------------------------------------------

@fast
def test_rows_weight_exactly_the_completion_tokens():
  prompts = [[1, 10, 11], [1, 12], [1, 13, 14, 15]]
  tokens = [np.array([20, 21]), np.array([22, 23, 24]), np.array([25])]
  logprobs = [np.array([-0.1, -0.2]), np.array([-0.3, -0.4, -0.5]), np.array([-0.6])]
  rows = rollout.build_rows(prompts, tokens, logprobs, seq_len=6)
  for i, (p, t) in enumerate(zip(prompts, tokens)):
    n = len(p) + len(t) - 1
    marked = rows["weights"][i].astype(bool)
    np.testing.assert_array_equal(rows["targets"][i][marked], t)  # the completion, and only it
    np.testing.assert_array_equal(rows["inputs"][i, :n], np.concatenate([p, t])[:-1])
    np.testing.assert_array_equal(rows["segment_ids"][i], [1] * n + [0] * (6 - n))
    np.testing.assert_array_equal(rows["positions"][i, :n], np.arange(n))
    np.testing.assert_allclose(rows["sample_logprobs"][i][marked], logprobs[i])
    assert not rows["sample_logprobs"][i][~marked].any()
  with pytest.raises(ValueError, match="more than seq_len"):
    rollout.build_rows(prompts, tokens, logprobs, seq_len=3)


@fast
def test_group_advantages_are_normalized_within_each_group():
  r = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0.5, 0.25, 2], np.float32)
  adv = rollout.group_advantages(r, 4)
  groups = adv.reshape(3, 4)
  np.testing.assert_allclose(groups.mean(1), 0, atol=1e-6)
  np.testing.assert_allclose(groups[[0, 2]].std(1, ddof=1), 1, atol=1e-3)
  assert not groups[1].any()  # all equal: no signal
  np.testing.assert_allclose(adv, rl_losses.group_advantages(r, 4), rtol=1e-5, atol=1e-6)


@fast
def test_prompt_order_is_a_function_of_seed_and_rollout():
  first = [rollout.step_prompts(10, 4, seed=3, rollout=r) for r in range(1, 6)]
  again = [rollout.step_prompts(10, 4, seed=3, rollout=r) for r in (5, 1, 2, 3, 4)]
  np.testing.assert_array_equal(first[4], again[0])
  assert sorted(np.concatenate(first)[:8].tolist() + first[2][:2].tolist()) == list(range(10))
  assert not np.array_equal(rollout.step_prompts(10, 4, seed=4, rollout=1), first[0])


# --- config errors ------------------------------------------------------------------------------

def rl_config(objective="grpo", **train):
  c = base_config()
  c.posttrain.objective = objective
  c.data.train_paths, c.tokenizer.path = "records.jsonl", "tok"
  c.train.update(batch_size=16, warmup_steps=0, **train)
  c.posttrain.group_size = 4
  return c


@fast
def test_config_errors():
  c = rl_config(steps=5)
  c.posttrain.updates_per_rollout = 2
  with pytest.raises(ConfigError, match="multiple of posttrain.updates_per_rollout"):
    check_config(validate(c))
  c = rl_config()
  c.lora.rank = 4
  with pytest.raises(ConfigError, match="lora.rank=0"):
    check_config(validate(c))
  c = rl_config()
  c.posttrain.temperature = 0.0
  with pytest.raises(ConfigError, match="must be sampled"):
    check_config(validate(c))
  c = rl_config()
  c.posttrain.group_size = 3
  with pytest.raises(ConfigError, match="multiple of posttrain.group_size"):
    validate(c)
  with pytest.raises(ConfigError, match="raise data.seq_len"):
    rollout.check_lengths([[1, 2, 3], [1] * 10], max_new_tokens=8, seq_len=16)


# --- the objectives on a tiny model -------------------------------------------------------------

TARGET = 5  # the token the toy reward wants


def tiny(objective):
  c = base_config()
  c.model.update(vocab_size=32, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64,
                 max_seq_len=16)
  c.posttrain.objective = objective
  c.train.update(batch_size=32, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
  return c


def toy_rollout(graphdef, params, prompts, group, key, seq_len=8):
  """group completions of each prompt; reward: the fraction of their tokens that are TARGET."""
  ids = [p for p in prompts for _ in range(group)]
  done = generate_batch(graphdef, params, ids, max_new_tokens=3, key=key, temperature=1.0)
  reward = np.asarray([np.mean(t == TARGET) for t in done.tokens], np.float32)
  return rollout.build_rows(ids, done.tokens, done.logprobs, seq_len), reward


def test_grpo_learns_a_toy_preference():
  c = tiny("grpo")
  p = c.posttrain
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  tx = optax.adam(3e-2)
  objective = rl_objectives.grpo_objective(graphdef, epsilon=0.2)
  step = jax.jit(make_train_step(graphdef, tx, c.train, objective=objective))
  scorer = jax.jit(functools.partial(rl_objectives.make_rollout_scorer(graphdef, None, p), reference=None))
  prompts = [[1, 2 + i, 9 + i] for i in range(4)]
  state, mean_rewards = init_state(params, tx, 0), []
  for i in range(12):
    rows, reward = toy_rollout(graphdef, state.params, prompts, 8, jax.random.key(i))
    adv = rollout.group_advantages(reward, 8)
    rows["advantages"] = np.repeat(adv[:, None], rows["inputs"].shape[1], 1)
    extra, stats = scorer(state.params, batch=rows)
    assert float(stats["logprob_gap"]) < 1e-4  # the sampler's log-probs are the learner's
    batch = {k: v for k, v in {**rows, **extra}.items() if k != "sample_logprobs"}
    state, metrics = step(state, batch)
    mean_rewards.append(float(reward.mean()))
  assert metrics["tokens"] == 96 and 0 <= float(metrics["clip_ratio/region"]) <= 1
  assert np.mean(mean_rewards[-3:]) > max(0.3, 3 * np.mean(mean_rewards[:2])), mean_rewards


def test_ppo_step_trains_the_value_head_and_value_loss_falls():
  c = tiny("ppo")
  p = c.posttrain
  p.ppo_kl_coef = 0.1
  model = build_model(c)
  assert model.score[...].shape == (32, 1)
  graphdef, params = nnx.split(model, nnx.Param)
  lm = tiny("lm")
  ref_graphdef, ref_params = nnx.split(build_model(lm), nnx.Param)
  tx = optax.adam(1e-2)
  objective = rl_objectives.ppo_objective(graphdef, epsilon=0.2, value_epsilon=0.2, value_coef=1.0)
  step = jax.jit(make_train_step(graphdef, tx, c.train, objective=objective))
  scorer = jax.jit(rl_objectives.make_rollout_scorer(graphdef, ref_graphdef, p))
  prompts = [[1, 2 + i, 9 + i] for i in range(32)]
  state, value_losses, rewards_seen = init_state(params, tx, 0), [], []
  for i in range(15):
    rows, reward = toy_rollout(graphdef, state.params, prompts, 1, jax.random.key(i))
    rows["rewards"] = np.repeat(1.0 + reward[:, None], rows["inputs"].shape[1], 1)
    extra, stats = scorer(state.params, ref_params, rows)
    batch = {k: v for k, v in {**rows, **extra}.items() if k not in ("sample_logprobs", "rewards")}
    assert set(extra) == {"old_logprobs", "reference_logprobs", "advantages", "old_values", "returns"}
    mask = rows["weights"].astype(bool)
    np.testing.assert_allclose(np.asarray(extra["advantages"])[mask].mean(), 0, atol=1e-5)  # whitened
    state, metrics = step(state, batch)
    value_losses.append(float(metrics["loss/value"]))
    rewards_seen.append(float(reward.mean()))
  assert i == 14 and float(stats["kl"]) >= 0
  assert np.mean(value_losses[-3:]) < 0.25 * value_losses[0], value_losses
  assert np.mean(rewards_seen[-3:]) > np.mean(rewards_seen[:2]), rewards_seen


# --- the loop -----------------------------------------------------------------------------------

def loop_config(tmp_path, objective="grpo", steps=2):
  from jaxlm.posttrain.byte_tokenizer import write_byte_tokenizer
  data = tmp_path / "data"
  write_byte_tokenizer(str(data))
  for name, n in (("train", 24), ("eval", 8)):
    with open(data / f"{name}.jsonl", "w") as f:
      for i in range(n):
        f.write(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n")
  c = base_config()
  c.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64, max_seq_len=32)
  c.compute.scan_layers = False
  c.tokenizer.path = str(data)
  c.data.update(train_paths=str(data / "train.jsonl"), eval_paths=str(data / "eval.jsonl"), seq_len=16)
  c.posttrain.update(objective=objective, rewards="exact_match,format", group_size=4,
                     max_new_tokens=4, stop="\n", ppo_kl_coef=0.05)
  # 2 steps, evaluated after each: the evaluation inside the run and the one at its end; logged
  # every 2, so the whole run's line averages two rollouts
  c.train.update(batch_size=16, steps=steps, warmup_steps=1, learning_rate=3e-3, log_every=2,
                 eval_every=1, progress_bar=False, workdir=str(tmp_path / objective))
  c.checkpoint.async_save = False
  return c


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_loop_logs_evaluates_and_resumes_exactly(tmp_path, objective, module_compile_cache):
  from jaxlm.train.loop import train
  whole = train(loop_config(tmp_path / "a", objective))
  c = loop_config(tmp_path / "b", objective)
  train(c, stop_at_step=1)
  resumed = train(c)
  for a, b in zip(jax.tree.leaves(whole["state"].params), jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(resumed["state"].step) == 2 and "eval_exact_match" in resumed["metrics"]
  lines = [json.loads(x) for x in open(tmp_path / "a" / objective / "metrics.jsonl")]
  keys = set().union(*lines)
  assert {"rollout/reward", "rollout/reward/exact_match", "rollout/reward/format",
          "rollout/response_length", "rollout/rollout_seconds", "rollout/learner_seconds",
          "eval/exact_match", "train/loss"} <= keys
  assert ("train/clip_ratio/region" if objective == "grpo" else "train/clipfrac/policy") in keys
  if objective == "ppo":
    assert "rollout/kl" in keys and "score" in nnx.to_pure_dict(resumed["state"].params)


def test_loop_refuses_an_unknown_reward_at_start(tmp_path):
  from jaxlm.train.loop import train
  c = loop_config(tmp_path)
  c.posttrain.rewards = "exact_match,nope"
  with pytest.raises(ConfigError, match="'nope' is not a registered reward"):
    train(c)
