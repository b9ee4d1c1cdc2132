"""The rollout loop of GRPO and PPO (posttrain.objective grpo | ppo): sample, grade, update.

Each rollout r takes prompts_per_step = train.batch_size / posttrain.group_size records (a
permutation of data.train_paths redrawn per epoch from train.seed; rollout.step_prompts), samples
group_size completions of each from the policy's current parameters (generate_batch at
posttrain.temperature, a row ending at eos, at posttrain.stop or after max_new_tokens), grades them
with posttrain.rewards (jaxlm/posttrain/rewards.py), lays them out one a row (rollout.build_rows),
scores the rows once (rl_objectives.score_rollout: the policy's log-probs, the reference's, PPO's
values, rewards with the KL penalty, GAE and whitened advantages) and takes
posttrain.updates_per_rollout optimizer steps on the whole rollout batch with the ordinary jitted
train step. train.steps counts optimizer updates (the learning-rate schedule's steps), so a run
makes train.steps / updates_per_rollout rollouts.

State is the train state alone: the prompts and the sampling key of rollout r derive from
(train.seed, r), so a run stopped after any rollout and resumed from its checkpoint samples and
updates exactly as an uninterrupted one. The reference model (grpo with kl_beta > 0, ppo with
ppo_kl_coef > 0) is checkpoint.init_from read again at every start, without a score head.

Evaluation (every train.eval_every updates and at the end, when data.eval_paths is set): greedy
completions of the held-out records, graded by the same rewards: eval/<reward> is e.g. held-out
exact match.

Not implemented (refused at start-up): LoRA adapters, pipeline stages, several processes.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from jaxlm.config import ConfigError, validate, with_vocab_size
from jaxlm.data.hf_tokenizer import HFTokenizer
from jaxlm.data.tokenizer import get_tokenizer
from jaxlm.inference.decode import generate_batch
from jaxlm.models import moe
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.rules import axis_rules
from jaxlm.parallel.sharding import global_batch, tree_shardings
from jaxlm.posttrain import datasets, rewards as rewards_lib, rl_objectives, rollout as rollout_lib
from jaxlm.runs import write_run_files
from jaxlm.train import flops
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.guard import StepWatch
from jaxlm.train.init_from import read_source, start_from
from jaxlm.train.metrics import MetricsLogger
from jaxlm.train.preemption import Preempted, stopping_cleanly
from jaxlm.train.setup import (abstract_model, abstract_state, forward_fn, init_sharded_state,
                               jit_train_step, make_setup, new_model)

EVAL_CHUNK = 256  # held-out prompts per greedy decoding call


def check_config(config) -> None:
  """What the rollout loop refuses beyond config.validate; ConfigError naming the field."""
  p = config.posttrain
  if config.lora.rank:
    raise ConfigError(f"posttrain.objective '{p.objective}' does not train LoRA adapters yet; set "
                      "lora.rank=0")
  if config.mesh.stage != 1:
    raise ConfigError(f"posttrain.objective '{p.objective}' runs without pipeline stages; set mesh.stage=1")
  if jax.process_count() > 1:
    raise ConfigError(f"posttrain.objective '{p.objective}' runs in one process; {jax.process_count()} "
                      "were started")
  if config.train.steps % p.updates_per_rollout:
    raise ConfigError(f"train.steps ({config.train.steps}) counts optimizer updates and must be a "
                      f"multiple of posttrain.updates_per_rollout ({p.updates_per_rollout})")
  if not p.temperature > 0:
    raise ConfigError(f"posttrain.temperature is {p.temperature}, but rollouts must be sampled "
                      "(greedy completions of a prompt are all alike); set it > 0, e.g. 1.0")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ConfigError("train.batch_size must be divisible by train.grad_accum_steps")


def read_rl_records(paths: str) -> list[dict]:
  """The RL records of comma-separated JSONL files, in order."""
  out = []
  for path in (x.strip() for x in paths.split(",")):
    if path:
      out.extend(datasets.read_records(path, "rl"))
  return out


def uses_reference(p) -> bool:
  return (p.objective == "grpo" and p.kl_beta > 0) or (p.objective == "ppo" and p.ppo_kl_coef > 0)


def reference_model(config, setup):
  """(graphdef, params) of the frozen reference: checkpoint.init_from as a plain language model (no
  score head), sharded like the policy; without init_from the train.seed initialization. (None,
  None) when the objective keeps no reference."""
  if not uses_reference(config.posttrain):
    return None, None
  lm = config.copy_and_resolve_references()
  lm.posttrain.objective = "lm"  # the model without a score head
  abstract = abstract_model(lm, setup.compute)
  graphdef, shapes = nnx.split(abstract, nnx.Param)
  shardings = tree_shardings(shapes, setup.mesh, setup.rules)
  if config.checkpoint.init_from:
    return graphdef, read_source(config.checkpoint.init_from, lm, setup.compute, setup.mesh, shardings)
  init = jax.jit(lambda: nnx.state(new_model(lm, setup.compute), nnx.Param), out_shardings=shardings)
  return graphdef, init()


class Sampler:
  """Prompts, decoding settings and rewards of a run: rollout batches and greedy evaluations."""

  def __init__(self, config, setup, tokenizer, records, eval_records, rewards):
    p = config.posttrain
    self.config, self.setup, self.tokenizer, self.rewards = config, setup, tokenizer, rewards
    self.records, self.eval_records = records, eval_records
    template = config.data.chat_template
    self.prompt_ids = datasets.rl_prompts(tokenizer, records, template).prompt_ids
    self.eval_ids = (None if eval_records is None
                     else datasets.rl_prompts(tokenizer, eval_records, template).prompt_ids)
    for ids in (self.prompt_ids, self.eval_ids or [[0]]):
      rollout_lib.check_lengths(ids, p.max_new_tokens, config.data.seq_len)
    eos = tokenizer.eos_id
    self.eos = None if eos is None or eos < 0 else int(eos)
    self.stops = [list(tokenizer.encode(p.stop))] if p.stop else []
    self.per_step = config.train.batch_size // p.group_size

  def _generate(self, params, ids, key, temperature):
    return generate_batch(self.setup.graphdef, params, ids, max_new_tokens=self.config.posttrain.max_new_tokens,
                          key=key, temperature=temperature, eos_id=self.eos, stop_sequences=self.stops,
                          mesh=self.setup.mesh, rules=self.setup.rules)

  def sample(self, params, rollout: int):
    """(rollout rows [batch_size, seq_len] as numpy, summed rewards [rows], {reward: [rows]},
    completion lengths [rows]) of rollout `rollout` (1-based)."""
    c, p = self.config, self.config.posttrain
    picked = rollout_lib.step_prompts(len(self.records), self.per_step, c.train.seed, rollout)
    rows = np.repeat(picked, p.group_size)  # each prompt's group adjacent
    ids = [self.prompt_ids[i] for i in rows]
    key = jax.random.fold_in(jax.random.PRNGKey(c.train.seed), rollout)
    done = self._generate(params, ids, key, p.temperature)
    texts = rollout_lib.completion_texts(self.tokenizer, ids, done.tokens, done.finish)
    total, each = rewards_lib.score(self.rewards, texts, [self.records[i] for i in rows])
    batch = rollout_lib.build_rows(ids, done.tokens, done.logprobs, c.data.seq_len)
    lengths = np.asarray([len(t) for t in done.tokens], np.float32)
    return batch, np.asarray(total, np.float32), each, lengths

  def evaluate(self, params) -> dict | None:
    """Mean of each reward (and their sum, "reward") over the held-out records, greedy."""
    if self.eval_ids is None:
      return None
    texts, lengths = [], []
    for start in range(0, len(self.eval_ids), EVAL_CHUNK):
      ids = self.eval_ids[start:start + EVAL_CHUNK]
      done = self._generate(params, ids, None, 0.0)
      texts += rollout_lib.completion_texts(self.tokenizer, ids, done.tokens, done.finish)
      lengths += [len(t) for t in done.tokens]
    total, each = rewards_lib.score(self.rewards, texts, self.eval_records)
    return {"reward": float(np.mean(total)), **{k: float(np.mean(v)) for k, v in each.items()},
            "response_length": float(np.mean(lengths))}


def rollout_features(config, batch, total) -> dict:
  """The per-row features the scorer reads: GRPO's group advantages, PPO's rewards; [rows, seq_len]."""
  p = config.posttrain
  width = batch["inputs"].shape[1]
  if p.objective == "grpo":
    adv = rollout_lib.group_advantages(total, p.group_size)
    return {"advantages": np.repeat(adv[:, None], width, axis=1)}
  return {"rewards": np.repeat(total[:, None], width, axis=1).astype(np.float32)}


def make_objective(config, setup):
  p = config.posttrain
  if p.objective == "grpo":
    return rl_objectives.grpo_objective(setup.graphdef, forward_fn(setup), epsilon=p.epsilon,
                                        beta=p.kl_beta, aggregation=p.loss_aggregation,
                                        temperature=p.temperature)
  return rl_objectives.ppo_objective(setup.graphdef, epsilon=p.epsilon, value_epsilon=p.value_epsilon,
                                     value_coef=p.value_coef, temperature=p.temperature)


def _crossed(before: int, after: int, every: int) -> bool:
  """Whether (before, after] holds a multiple of every (every 0: never)."""
  return bool(every) and before // every != after // every


def train_rl(config, stop_at_step: int | None = None) -> dict:
  """Runs train.steps optimizer updates of GRPO or PPO (resuming if the workdir holds a checkpoint);
  returns what jaxlm.train.loop.train does: {"state", "frozen" (None), "graphdef", "tokenizer",
  "metrics" (the last train, rollout and eval values), "config"}."""
  check_config(validate(config))
  p, t = config.posttrain, config.train
  rewards = rewards_lib.resolve(p.rewards)
  make_mesh(config)
  tokenizer = get_tokenizer(config)
  config = with_vocab_size(config, tokenizer.vocab_size, extra_rows_ok=isinstance(tokenizer, HFTokenizer))
  records = read_rl_records(config.data.train_paths)
  eval_records = read_rl_records(config.data.eval_paths) if config.data.eval_paths else None
  rewards_lib.check_records(rewards, records, config.data.train_paths)
  if eval_records is not None:
    rewards_lib.check_records(rewards, eval_records, config.data.eval_paths)

  setup = make_setup(config)
  if p.objective == "ppo" and setup.compute.sequence_shards > 1:
    raise ConfigError("posttrain.objective 'ppo' runs without sequence-sharded attention; set "
                      "mesh.sequence=1")
  sampler = Sampler(config, setup, tokenizer, records, eval_records, rewards)
  checkpointer = Checkpointer(t.workdir, config.checkpoint)
  resume = config.checkpoint.resume
  if resume == "always" or (resume == "auto" and checkpointer.latest_step() is not None):
    try:
      state = checkpointer.restore(abstract_state(setup))
    except Exception:
      checkpointer.close()
      raise
  elif config.checkpoint.init_from:
    state = start_from(setup, config.checkpoint.init_from)
  else:
    state = init_sharded_state(setup)
  ref_graphdef, reference = reference_model(config, setup)
  write_run_files(t.workdir, config, tokenizer)

  train_step = jit_train_step(setup, make_objective(config, setup))
  scorer = rl_objectives.make_rollout_scorer(setup.graphdef, ref_graphdef, p)

  def score_with_rules(params, ref, batch):
    with axis_rules(setup.rules, setup.mesh):
      return scorer(params, ref, batch)
  score_rollout = jax.jit(score_with_rules)

  seq_len = config.data.seq_len
  flops_per_token = flops.train_flops_per_token(config.model, seq_len)
  peak = flops.peak_tflops_per_device(t.peak_tflops, str(setup.compute.matmul)) * jax.device_count()
  start = int(state.step)
  if start % p.updates_per_rollout:
    raise ConfigError(f"the checkpoint is at step {start}, not a multiple of posttrain.updates_per_rollout "
                      f"({p.updates_per_rollout}); resume with the updates_per_rollout it was saved with")
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log = MetricsLogger(t.workdir, t.steps, start, t.progress_bar)
  log.print(f"jaxlm {p.objective}: {n_params / 1e6:.2f}M parameters, {len(records):,} prompts, "
            f"{sampler.per_step} prompts x {p.group_size} completions per rollout, "
            f"{p.updates_per_rollout} update(s) per rollout; starting at step {start} of {t.steps}"
            + ("" if reference is None else "; reference: " + (config.checkpoint.init_from or "the initialization")))

  last, window = {}, {}
  end = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
  step = start
  watch = StepWatch(t, t.batch_size, log)  # skipped (non-finite) updates, as in pretraining
  # SIGTERM/SIGINT: checkpoint at the next step boundary and stop (jaxlm/train/preemption.py)
  with stopping_cleanly(log, checkpointer) as preemption:
    while step < end:
      rollout = step // p.updates_per_rollout + 1
      t0 = time.perf_counter()
      rows, total, each, lengths = sampler.sample(state.params, rollout)
      rows.update(rollout_features(config, rows, total))
      batch = global_batch(rows, setup.batch_sharding)
      extra, stats = score_rollout(state.params, reference, batch)
      batch = {k: v for k, v in {**batch, **extra}.items() if k not in ("sample_logprobs", "rewards")}
      stats = {k: float(v) for k, v in jax.device_get(stats).items()}
      t1 = time.perf_counter()
      for _ in range(p.updates_per_rollout):
        state, metrics = train_step(state, batch)
        log.advance()
        watch.after(int(state.step), metrics)
      watch.flush()
      # a MoE policy's per-expert counts stay out: its balance is in the step's moe/ scalars
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k not in ("skipped", moe.EXPERT_LOAD)}
      t2 = time.perf_counter()
      before, step = step, int(state.step)
      groups = total.reshape(-1, p.group_size)
      sums = {"reward": float(total.mean()), "reward_std": float(total.std()),
              **{f"reward/{k}": float(np.mean(v)) for k, v in each.items()},
              "response_length": float(lengths.mean()),
              **({"groups_all_equal": float(np.mean(groups.max(1) == groups.min(1)))}
                 if p.group_size > 1 else {}),  # groups without GRPO signal
              **stats, "rollout_seconds": t1 - t0, "learner_seconds": t2 - t1, "rollouts": 1.0}
      window = {k: window.get(k, 0.0) + v for k, v in sums.items()}
      if _crossed(before, step, t.log_every) or step == t.steps:
        n = window.pop("rollouts")
        secs = window["rollout_seconds"] + window["learner_seconds"]
        means = {k: v / n for k, v in window.items() if not k.endswith("_seconds")}
        means.update(rollout_seconds=window["rollout_seconds"], learner_seconds=window["learner_seconds"])
        tokens_per_sec = n * p.updates_per_rollout * t.batch_size * seq_len / max(secs, 1e-9)
        metrics.update(tokens_per_sec=tokens_per_sec, tokens_per_sec_per_device=tokens_per_sec / jax.device_count(),
                       tflops_per_sec=tokens_per_sec * flops_per_token / 1e12,
                       mfu=tokens_per_sec * flops_per_token / 1e12 / peak)
        log.write(step, metrics)
        log.write(step, means, prefix="rollout")
        last = {**last, **metrics, **{f"rollout_{k}": v for k, v in means.items()}}
        window = {}
      if _crossed(before, step, t.eval_every) and step != t.steps:
        result = sampler.evaluate(state.params)
        if result:
          log.write(step, result, prefix="eval")
      if _crossed(before, step, config.checkpoint.every):
        checkpointer.save(step, state)
        log.sync()  # a gs:// run's metrics reach the bucket with each checkpoint
      if preemption.reached(step):
        if checkpointer.latest_step() != step:
          checkpointer.save(step, state)
        raise Preempted(step, preemption.received)

  final_step = int(state.step)
  if checkpointer.latest_step() != final_step:
    checkpointer.save(final_step, state)
  if final_step == t.steps:
    result = sampler.evaluate(state.params)
    if result:
      log.write(final_step, result, prefix="eval")
      last = {**last, **{f"eval_{k}": v for k, v in result.items()}}
  log.close()
  checkpointer.wait()
  checkpointer.close()
  return {"state": state, "frozen": None, "graphdef": setup.graphdef, "tokenizer": tokenizer,
          "metrics": last, "config": config}
