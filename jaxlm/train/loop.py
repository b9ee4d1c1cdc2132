"""The training loop: every side effect of a run (data, logging, eval, checkpoints, the sample).

The math it calls is pure: `train_step(state, batch)` and `eval_step(params, batch)`, each jitted
once. Resume restores params, optimizer state, step, RNG and the data iterator, so a run stopped at
step k and resumed produces exactly the losses and parameters of an uninterrupted run. With LoRA
(lora.rank > 0) the state's params are the adapters and both steps also take the frozen base
weights, read from checkpoint.init_from at every start (jaxlm/posttrain/lora.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import jax

from jaxlm.config import rows_per_example, validate, with_vocab_size
from jaxlm.data.pipeline import eval_batches, make_train_iterator
from jaxlm.data.hf_tokenizer import HFTokenizer
from jaxlm.data.tokenizer import get_tokenizer
from jaxlm.models import moe
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import global_batch
from jaxlm.posttrain import lora, offline
from jaxlm.posttrain.sft import make_sft_iterator, sft_eval_batches
from jaxlm.train import flops
from jaxlm.runs import write_run_files
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.guard import StepWatch
from jaxlm.train.preemption import Preempted, stopping_cleanly
from jaxlm.train.metrics import MetricsLogger
from jaxlm.train.init_from import start_from
from jaxlm.train.setup import (abstract_state, init_sharded_state, jit_eval_step, jit_train_step,
                               make_setup)
from jaxlm.train.step import summarize_eval
from jaxlm.workdir import as_path


def _mesh_text(mesh) -> str:
  sizes = [f"{name}={n}" for name, n in mesh.shape.items() if n > 1]
  return " x ".join(sizes) if sizes else "1 device"


def train_batches(config, tokenizer):
  """(this process's training batch iterator, {data stat: value} to log or {}). data.source "chat"
  is supervised fine-tuning: conversations packed with the assistant's tokens as the only targets.
  Both report the bad records skipped (data.on_bad_record='skip') as skipped_* stats."""
  if config.data.source == "chat":
    batches, stats = make_sft_iterator(config, tokenizer, jax.process_index(), jax.process_count())
    return batches, {k: float(v) for k, v in {**dataclasses.asdict(stats), **batches.stats}.items()}
  batches = make_train_iterator(config, tokenizer, jax.process_index(), jax.process_count())
  return batches, {k: float(v) for k, v in batches.stats.items()}


def held_out_batches(config, tokenizer) -> list | None:
  """This process's rows of every evaluation batch (train.eval_batches of them; 0: all), read and
  tokenized once per run; None if there is no held-out split."""
  if config.data.source == "chat":
    made = sft_eval_batches(config, tokenizer, jax.process_index(), jax.process_count())
    batches = None if made is None else made[0]
  else:
    batches = eval_batches(config, tokenizer, jax.process_index(), jax.process_count())
  if batches is None:
    return None
  return list(itertools.islice(batches, config.train.eval_batches or None))


def evaluate(eval_step, params, batches, sharding, frozen=None) -> dict | None:
  """Loss, perplexity and bits per byte over the held-out batches (None if there are none)."""
  if batches is None:
    return None
  sums = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
  frozen_args = () if frozen is None else (frozen,)
  for batch in batches:
    out = jax.device_get(eval_step(params, global_batch(batch, sharding), *frozen_args))
    sums = {k: sums[k] + float(out[k]) for k in sums}
  return summarize_eval(sums)


def log_train_metrics(log, step, metrics, watch, window_tokens, window_start, flops_per_token,
                      peak, window_load=None) -> dict:
  """Writes one metrics line: the step's metrics, the skipped-step count and the window's speed
  (and a MoE model's expert balance over the window, from window_load: its summed tokens per
  expert [moe layers, experts])."""
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k not in ("skipped", moe.EXPERT_LOAD)}
  if window_load is not None:
    metrics.update({k: float(v) for k, v in jax.device_get(moe.window_load_metrics(window_load)).items()})
  tokens_per_sec = window_tokens / (time.perf_counter() - window_start)
  metrics.update(tokens_per_sec=tokens_per_sec,
                 tokens_per_sec_per_device=tokens_per_sec / jax.device_count(),
                 tflops_per_sec=tokens_per_sec * flops_per_token / 1e12,
                 mfu=tokens_per_sec * flops_per_token / 1e12 / peak)
  if watch.guard:
    metrics["skipped_steps"] = float(watch.skipped)
  if watch.spike_factor:
    metrics["loss_spikes"] = float(watch.spikes)
  log.write(step, metrics)
  return metrics


def train(config, stop_at_step: int | None = None) -> dict:
  """Runs config.train.steps updates (resuming if a checkpoint exists).

  stop_at_step ends the run early, as a preemption would, after checkpointing that step; the
  schedule is still the one for train.steps, so resuming continues the same run.
  Returns {"state", "frozen", "graphdef", "tokenizer", "metrics", "config"}: metrics holds the last
  train and eval values; config is the one the run used (model.vocab_size filled in); frozen is
  LoRA's base weights (None without LoRA): the model is nnx.merge(graphdef, state.params[, frozen]).
  """
  validate(config)
  as_path(config.train.workdir)  # a gs:// run without its clients installed: ConfigError, now
  if config.posttrain.objective in ("grpo", "ppo"):  # rollouts from the policy between updates
    from jaxlm.posttrain.rl_loop import train_rl  # pylint: disable=g-import-not-at-top
    return train_rl(config, stop_at_step)
  t = config.train
  make_mesh(config)  # a config that does not fit the devices fails here, before the tokenizer
  tokenizer = get_tokenizer(config)
  # config.json records the number; a published model may have rows its HF tokenizer never uses
  config = with_vocab_size(config, tokenizer.vocab_size, extra_rows_ok=isinstance(tokenizer, HFTokenizer))
  config = lora.with_recorded_base(config)  # LoRA: the base's path, as the run recorded it

  setup = make_setup(config)
  graphdef = setup.graphdef
  # dpo/ipo/kto/reward: records, their objective and a frozen reference (jaxlm/posttrain/offline.py)
  post = offline.prepare(config, setup, tokenizer) if config.posttrain.objective != "lm" else None
  train_iter, data_stats = (post.train_iter, post.data_stats) if post else train_batches(config, tokenizer)

  checkpointer = Checkpointer(t.workdir, config.checkpoint)
  resume = config.checkpoint.resume
  if resume == "always" or (resume == "auto" and checkpointer.latest_step() is not None):
    try:
      # An abstract template: the restored arrays are the only copy ever allocated.
      state = checkpointer.restore(abstract_state(setup), train_iter)
    except Exception:
      checkpointer.close()  # let orbax's background threads end before the error surfaces
      raise
  elif config.checkpoint.init_from and not config.lora.rank:  # (LoRA: init_from is the frozen base)
    state = start_from(setup, config.checkpoint.init_from)
  else:
    state = init_sharded_state(setup)
  # The steps' frozen argument: LoRA's base weights, or a post-training objective's reference model.
  frozen = post.frozen if post and post.frozen_shardings else lora.frozen_base(setup)
  frozen_shardings = post.frozen_shardings if post else setup.frozen_shardings
  frozen_args = () if frozen is None else (frozen,)
  start = int(state.step)
  write_run_files(t.workdir, config, tokenizer)  # after a restore, so a failed one keeps the old files

  train_step = jit_train_step(setup, post.objective if post else None, frozen_shardings)
  eval_step = jit_eval_step(setup, tokenizer.token_bytes)
  held_out = None  # read at the first evaluation, then kept
  flops_per_token = flops.train_flops_per_token(config.model, config.data.seq_len)
  peak = flops.peak_tflops_per_device(t.peak_tflops, str(setup.compute.matmul)) * jax.device_count()
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen)) if config.lora.rank else 0
  trains = f", {lora.describe(config, n_params, n_frozen)}" if config.lora.rank else ""
  if post:
    trains += f", objective {config.posttrain.objective}"

  log = MetricsLogger(t.workdir, t.steps, start, t.progress_bar)
  log.print(f"jaxlm: {(n_params + n_frozen) / 1e6:.2f}M parameters{trains}, {config.data.seq_len} x {t.batch_size} tokens "
            f"per step, {flops_per_token / 1e6:.1f} MFLOP per token, peak {peak:.3f} TFLOP/s over "
            f"{jax.device_count()} device(s); starting at step {start} of {t.steps}; "
            f"mesh {_mesh_text(setup.mesh)}")
  if data_stats:  # how many examples were truncated or dropped, in metrics.jsonl from the start
    log.print("data: " + ", ".join(f"{k} {v:,.0f}" for k, v in data_stats.items()))
    log.write(start, data_stats, prefix="data")
  # Tokens of the global batch: every process loads batch_size / process_count rows, and MFU divides
  # by the peak of all devices, so throughput must count all processes' rows.
  tokens_per_step = t.batch_size * rows_per_example(config) * config.data.seq_len
  last, window_tokens, window_start, window_load = {}, 0.0, time.perf_counter(), None
  end = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
  watch = StepWatch(t, t.batch_size * rows_per_example(config), log)
  # SIGTERM/SIGINT: checkpoint at the next step boundary and stop (jaxlm/train/preemption.py)
  with stopping_cleanly(log, checkpointer) as preemption:
    for step in range(start + 1, end + 1):
      batch = global_batch(next(train_iter), setup.batch_sharding)  # this process's rows -> global arrays
      state, metrics = train_step(state, batch, *frozen_args)
      log.advance()
      watch.after(step, metrics)
      window_tokens += tokens_per_step
      if moe.EXPERT_LOAD in metrics:  # summed on device: no step waits for it
        load = metrics[moe.EXPERT_LOAD]
        window_load = load if window_load is None else window_load + load
      if step % t.log_every == 0 or step == t.steps:
        watch.flush()
        last = log_train_metrics(log, step, metrics, watch, window_tokens, window_start,
                                 flops_per_token, peak, window_load)
        window_tokens, window_start, window_load = 0.0, time.perf_counter(), None
      if t.eval_every and step % t.eval_every == 0 and step != t.steps:
        if post:
          result = post.evaluate(state.params)
        else:
          held_out = held_out if held_out is not None else held_out_batches(config, tokenizer)
          result = evaluate(eval_step, state.params, held_out, setup.batch_sharding, frozen)
        if result:
          log.write(step, result, prefix="eval")
      if config.checkpoint.every and step % config.checkpoint.every == 0:
        errors = checkpointer.save_errors
        checkpointer.save(step, state, train_iter)
        if checkpointer.save_errors != errors:  # checkpoint.on_save_error=warn: the run goes on
          log.write(step, {"save_errors": checkpointer.save_errors}, prefix="checkpoint")
        log.sync()  # a gs:// run's metrics reach the bucket with each checkpoint
      if preemption.reached(step):
        watch.flush()
        if checkpointer.latest_step() != step:
          checkpointer.save(step, state, train_iter)
        raise Preempted(step, preemption.received)
    watch.flush()

  final_step = int(state.step)
  errors = checkpointer.save_errors
  if checkpointer.latest_step() != final_step:
    checkpointer.save(final_step, state, train_iter)
  result = None
  if final_step == t.steps and post:
    result = post.evaluate(state.params)
  elif final_step == t.steps:
    held_out = held_out if held_out is not None else held_out_batches(config, tokenizer)
    result = evaluate(eval_step, state.params, held_out, setup.batch_sharding, frozen)
  if result:
    log.write(final_step, result, prefix="eval")
    last = {**last, **{f"eval_{k}": v for k, v in result.items()}}
  checkpointer.wait()  # the last async save's failure, if any, surfaces here
  if checkpointer.save_errors != errors:
    log.write(final_step, {"save_errors": checkpointer.save_errors}, prefix="checkpoint")
  log.close()
  checkpointer.close()
  return {"state": state, "frozen": frozen if config.lora.rank else None, "graphdef": graphdef, "tokenizer": tokenizer, "metrics": last,
          "config": config}
