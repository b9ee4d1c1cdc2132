"""Fault scenarios against real training subprocesses of configs/tiny.py, each checked against an
uninterrupted run: shared by tests/faults/test_faults.py (which asserts every promise) and
benchmarks/faults.py (which prints them as a table).

Every run has 2 CPU devices in all (one process with 2, or two processes with 1 each), the same
mesh, so runs on different process counts compute bit for bit the same numbers. A scenario returns
a Row: steps lost (checkpointed progress thrown away), seconds from the relaunch to its first new
step, whether any step trained on another batch than the uninterrupted run's (data lost), and
whether the final parameters equal the uninterrupted run's bitwise.

Scenarios(..., compile_cache=True) (the tests) gives every subprocess one JAX persistent compilation
cache in `base`: the trainer's programs are compiled by the first run and loaded by the later
ones (an executable loaded from the cache is the one compiled, so the bitwise comparisons hold).
The benchmark leaves it off, so its seconds to recover include the compile a real relaunch pays.
Scenarios(..., fast_compile=True) (the tests) compiles the trainer's programs at LLVM level 0 like
pytest's own (tests/xla_flags.py): every run of a test alike, so its bitwise comparisons hold.
Scenarios(..., small_data=True) (the tests) trains on tests/small_corpus.py's four plays instead
of all of Shakespeare, which every process would tokenize at start (~30 processes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

import small_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "tests", "faults", "run_train.py")
STEPS, EVERY = 12, 4  # a run's steps, and checkpoint.every
PREEMPTED = 75


@dataclasses.dataclass
class Row:
  fault: str
  injected: str
  steps_lost: int | None = None
  recover_s: float | None = None
  data_lost: str = "none"
  params_equal: bool | None = None
  kept: bool | None = None  # every checkpoint folder there before the relaunch is still there
  notes: str = ""


@dataclasses.dataclass
class Done:
  code: int
  out: str

  @property
  def first_step_s(self) -> float | None:
    for line in self.out.splitlines():
      if line.startswith("first step after start:"):
        return float(line.split(":")[1].split()[0])
    return None


def trainer_flags(workdir, tokenizers, *extra) -> list[str]:
  return ["--config=configs/tiny.py", f"--config.train.workdir={workdir}",
          f"--config.train.steps={STEPS}", f"--config.checkpoint.every={EVERY}",
          "--config.checkpoint.keep=10", "--config.train.log_every=1",
          "--config.train.progress_bar=False", "--config.sample.max_new_tokens=0",
          "--config.train.eval_batches=1", f"--config.tokenizer.cache_dir={tokenizers}", *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, tokenizers, faults=(), processes=1, extra=(), peer_timeout=None, cache=None,
          fast_compile=False):
  """Starts the run's processes (not waiting); returns the Popen list. cache: a folder for JAX's
  persistent compilation cache, shared by every run given it (None: none)."""
  flags = trainer_flags(workdir, tokenizers, *extra)
  if peer_timeout:
    flags.append(f"--config.train.peer_timeout_seconds={peer_timeout}")
  port, procs = _free_port(), []
  for index in range(processes):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JAXLM_", "XLA_"))}
    if processes > 1:
      env.update(JAXLM_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index))
    if cache:  # every program: the default threshold (1 s of compile) would leave small ones out
      env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    argv = [sys.executable, RUNNER, f"--devices={2 // processes}", *faults,
            *(["--fast_compile"] if fast_compile else []), "--", *flags]
    # Output to a file, not a pipe: nobody reads a pipe while the test waits for a step, and a
    # full one would stall the trainer.
    log = tempfile.NamedTemporaryFile("w+", prefix=f"process{index}-", suffix=".log")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    procs.append(proc)
  return procs


def output(proc) -> str:
  proc.log.seek(0)
  return proc.log.read()


def finish(procs, timeout=600) -> list[Done]:
  return [Done(p.wait(timeout), output(p)) for p in procs]


def run(workdir, tokenizers, faults=(), processes=1, extra=(), peer_timeout=None, cache=None) -> list[Done]:
  return finish(start(workdir, tokenizers, faults, processes, extra, peer_timeout, cache))


def logged_losses(workdir) -> dict[int, float]:
  """step -> train loss, the last one logged for the step (a relaunch may log a step again)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        out[row["step"]] = row["train/loss"]
  return out


def metric(workdir, name):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    values = [json.loads(line).get(name) for line in f]
  return [v for v in values if v is not None]


def checkpoint_steps(workdir) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def final_params(workdir) -> list[np.ndarray]:
  from jaxlm import runs  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(runs.load_params(workdir).params)]


def same_params(a, b) -> bool:
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def data_lost(workdir, reference) -> str:
  """'none' when every step 1..STEPS was logged with the uninterrupted run's loss (so trained on its
  batch from its state), else the steps that differ or are missing."""
  got, want = logged_losses(workdir), logged_losses(reference)
  bad = [s for s in range(1, STEPS + 1) if got.get(s) != want[s]]
  return "none" if not bad else f"steps {bad} differ"


def wait_for_step(workdir, step, procs, timeout=300):
  """Blocks until metrics.jsonl logs `step` (or a process ended)."""
  end = time.time() + timeout
  while time.time() < end:
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(logged_losses(workdir) or [0]) >= step:
      return
    if any(p.poll() is not None for p in procs):
      return
    time.sleep(0.1)
  raise TimeoutError(f"{workdir} did not reach step {step}")


def tree_bytes(folder) -> dict[str, bytes]:
  out = {}
  for base, _, files in os.walk(folder):
    for f in files:
      path = os.path.join(base, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, folder)] = fh.read()
  return out


class Scenarios:
  """Each method runs one fault in its own workdir under `base` and returns its Row."""

  def __init__(self, base, tokenizers, compile_cache=False, small_data=False, fast_compile=False):
    self.base, self.tok, self.fast_compile = base, tokenizers, fast_compile
    self.cache = os.path.join(base, "jax_cache") if compile_cache else None
    # Given before each scenario's own flags, so bad_record()'s data flags override them.
    self.data = small_corpus.flags(os.path.join(base, "corpus")) if small_data else []
    self.reference = os.path.join(base, "reference")
    if not os.path.exists(os.path.join(self.reference, "metrics.jsonl")):
      (done,) = self.run(self.reference)
      assert done.code == 0, done.out
    self.want = final_params(self.reference)
    self._stopped_at_8 = None  # damaged(): the run the damage is done to, trained once

  def start(self, workdir, faults=(), processes=1, extra=(), peer_timeout=None):
    return start(workdir, self.tok, faults, processes, [*self.data, *extra], peer_timeout, self.cache,
                 self.fast_compile)

  def run(self, workdir, faults=(), processes=1, extra=(), peer_timeout=None) -> list[Done]:
    return finish(self.start(workdir, faults, processes, extra, peer_timeout))

  def _dir(self, name):
    path = os.path.join(self.base, name)
    shutil.rmtree(path, ignore_errors=True)
    return path

  def _resume(self, row, workdir, processes=1, lost=0):
    """Relaunches the unchanged command; fills recovery time, data lost, params equality and
    whether every checkpoint folder the fault left is still there (a damaged one renamed
    <step>.unreadable counts as kept)."""
    ckpts = os.path.join(workdir, "checkpoints")
    before = sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []
    dones = self.run(workdir, processes=processes)
    assert all(d.code == 0 for d in dones), [d.out[-3000:] for d in dones]
    after = os.listdir(ckpts)
    row.kept = all(n in after or any(a.startswith(n.split(".")[0] + ".unreadable") for a in after)
                   for n in before)
    row.steps_lost = lost
    row.recover_s = dones[0].first_step_s
    row.data_lost = data_lost(workdir, self.reference)
    row.params_equal = same_params(final_params(workdir), self.want)
    return dones

  def sigterm(self, processes=1) -> Row:
    row = Row(f"SIGTERM mid-step, {processes} process(es)",
              f"kill -TERM to process {processes - 1} only, mid-step (steps slowed to 0.3 s)")
    workdir = self._dir(f"sigterm{processes}")
    procs = self.start(workdir, ["--slow=0.3"], processes)
    wait_for_step(workdir, 5, procs)
    procs[-1].send_signal(signal.SIGTERM)  # the last process: the notice reaches one host
    dones = finish(procs)
    row.notes = f"exit codes {[d.code for d in dones]}"
    assert all(d.code == PREEMPTED for d in dones), [d.out[-3000:] for d in dones]
    done_steps = max(logged_losses(workdir))
    saved = checkpoint_steps(workdir)[-1]
    self._resume(row, workdir, processes, lost=done_steps - saved)
    row.notes += f"; stopped at step {done_steps}, checkpoint {saved}"
    return row

  def other_process_count(self) -> Row:
    row = Row("resume on another process count", "1 process to step 4, 2 processes to 8, 1 to 12")
    workdir = self._dir("reshard")
    for processes, at in ((1, 4), (2, 8)):
      dones = self.run(workdir, [f"--sigterm_at={at}"], processes)
      assert all(d.code == PREEMPTED for d in dones), [d.out[-3000:] for d in dones]
    self._resume(row, workdir, 1)
    return row

  def kill_in_save(self) -> Row:
    row = Row("SIGKILL mid-save", "kill -KILL right after the step-8 checkpoint starts writing")
    workdir = self._dir("kill_in_save")
    (done,) = self.run(workdir, ["--kill_in_save_at=8"])
    assert done.code == -signal.SIGKILL, done.out[-3000:]
    steps = checkpoint_steps(workdir)
    trained = max(logged_losses(workdir))
    self._resume(row, workdir, lost=trained - max(s for s in steps if s <= trained))
    row.notes = f"readable checkpoints after the kill: {steps}"
    return row

  def stopped_at_8(self) -> str:
    """A run stopped (SIGTERM) at step 8 with checkpoints 4 and 8, trained once and kept pristine:
    damaged() copies it, so each kind of damage gets the same run for one launch less."""
    if self._stopped_at_8 is None:
      workdir = self._dir("stopped_at_8")
      (done,) = self.run(workdir, ["--sigterm_at=8"])
      assert done.code == PREEMPTED, done.out[-3000:]
      assert checkpoint_steps(workdir) == [4, 8], checkpoint_steps(workdir)
      self._stopped_at_8 = workdir
    return self._stopped_at_8

  def damaged(self, name, damage) -> Row:
    """A copy of stopped_at_8() (checkpoints 4 and 8); `damage(ckpt_dir, 8)` breaks 8."""
    row = Row(name, damage.__doc__.strip().split(":")[0].split(".")[0])
    workdir = self._dir(name.replace(" ", "_"))
    shutil.copytree(self.stopped_at_8(), workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    damage(ckpts, 8)
    (folder,) = [n for n in os.listdir(ckpts) if n.split(".")[0] == "8"]
    before = tree_bytes(os.path.join(ckpts, folder))
    dones = self._resume(row, workdir, lost=4)
    aside = [n for n in os.listdir(ckpts) if n.startswith("8.unreadable")]
    row.notes = f"{folder} set aside as {aside}"
    assert aside and tree_bytes(os.path.join(ckpts, aside[0])) == before, "damaged files changed"
    assert "checkpoint step 8 skipped" in dones[0].out, dones[0].out[-3000:]  # said which and why
    return row

  def full_disk(self) -> Row:
    row = Row("disk full during save", "ENOSPC from every file write of the step-8 checkpoint")
    workdir = self._dir("full_disk")
    (done,) = self.run(workdir, ["--full_disk_at=8"])
    assert done.code == 1 and "free" in done.out and "checkpoints/8" in done.out, done.out[-3000:]
    assert checkpoint_steps(workdir) == [4], checkpoint_steps(workdir)
    trained = max(logged_losses(workdir))
    self._resume(row, workdir, lost=trained - 4)
    line = next(line for line in done.out.splitlines() if "could not be saved" in line)
    free = re.search(r"[\d.]+ GiB free of [\d.]+ GiB", line)
    row.notes = (f"checkpoint.on_save_error=stop: the error names {line.split()[2]} and "
                 f"{free.group(0) if free else 'no free space'}")
    return row

  def full_disk_warn(self) -> Row:
    row = Row("disk full during save, on_save_error=warn", "as above; the run trains on")
    workdir = self._dir("full_disk_warn")
    (done,) = self.run(workdir, ["--full_disk_at=8"], extra=["--config.checkpoint.on_save_error=warn"])
    assert done.code == 0, done.out[-3000:]
    row.steps_lost = 0
    row.data_lost = data_lost(workdir, self.reference)
    row.params_equal = same_params(final_params(workdir), self.want)
    row.notes = f"checkpoints {checkpoint_steps(workdir)}, checkpoint/save_errors {metric(workdir, 'checkpoint/save_errors')}"
    return row

  def nonfinite(self, name, *options) -> Row:
    """options: run_train.py flags --nan_at=K and/or --inf_lr_at=K; each step K must be skipped."""
    row = Row(name, ", ".join(f"{o}: patched into step {o.split('=')[1]}" for o in options))
    workdir = self._dir(name.replace(" ", "_"))
    (done,) = self.run(workdir, list(options))
    assert done.code == 0, done.out[-3000:]
    for option in options:
      assert f"step {option.split('=')[1]}: not applied" in done.out, done.out[-3000:]
    params = final_params(workdir)
    assert all(np.isfinite(p).all() for p in params)
    row.steps_lost = 0
    row.data_lost = f"batch(es) {[int(o.split('=')[1]) for o in options]} not applied (by design), logged"
    row.params_equal = same_params(params, self.want)
    row.notes = f"skipped_steps {metric(workdir, 'train/skipped_steps')[-1]:.0f}"
    return row

  def dead_peer(self, timeout=10) -> Row:
    row = Row("SIGKILLed peer, 2 processes", f"kill -KILL process 1 mid-run, peer timeout {timeout} s")
    workdir = self._dir("dead_peer")
    procs = self.start(workdir, ["--slow=0.3"], 2, peer_timeout=timeout)
    wait_for_step(workdir, 5, procs)
    procs[1].kill()
    killed = time.time()
    code = procs[0].wait(timeout * 6)
    waited, out = time.time() - killed, output(procs[0])
    assert code != 0 and "stopped answering" in out, out[-3000:]
    trained = max(logged_losses(workdir))
    row.notes = f"survivor exited {waited:.0f} s after the kill (code {code}): " + next(
        line for line in out.splitlines() if "stopped answering" in line)[:120]
    self._resume(row, workdir, 2, lost=trained - checkpoint_steps(workdir)[-1])
    return row

  def bad_record(self) -> Row:
    """A JSONL corpus with one line that is not JSON: refused by default, skipped on request."""
    row = Row("bad JSONL line", "line 3 of 6 is not JSON; data.on_bad_record error, then skip")
    from jaxlm.data import sources  # pylint: disable=g-import-not-at-top
    plays = list(sources.shakespeare_plays().values())[:5]
    folder = self._dir("bad_record")
    os.makedirs(folder)
    clean, dirty = os.path.join(folder, "clean.jsonl"), os.path.join(folder, "dirty.jsonl")
    lines = [json.dumps({"text": p}) for p in plays]
    with open(clean, "w") as f:
      f.write("\n".join(lines) + "\n")
    with open(dirty, "w") as f:
      f.write("\n".join(lines[:2] + ['{"text": "no closing quote}'] + lines[2:]) + "\n")
    data = ["--config.data.source=jsonl", "--config.data.eval_paths="]
    (refused,) = self.run(os.path.join(folder, "refused"), extra=[*data, f"--config.data.train_paths={dirty}"])
    assert refused.code != 0 and f"{dirty}:3" in refused.out, refused.out[-3000:]
    assert not checkpoint_steps(os.path.join(folder, "refused"))
    (skipped,) = self.run(os.path.join(folder, "skipped"),
                          extra=[*data, f"--config.data.train_paths={dirty}", "--config.data.on_bad_record=skip"])
    (reference,) = self.run(os.path.join(folder, "clean"), extra=[*data, f"--config.data.train_paths={clean}"])
    assert skipped.code == 0 and reference.code == 0, (skipped.out[-3000:], reference.out[-3000:])
    row.steps_lost = 0
    row.data_lost = "the bad line only (counted: data/skipped_records " + str(
        metric(os.path.join(folder, "skipped"), "data/skipped_records")) + ")"
    row.params_equal = same_params(final_params(os.path.join(folder, "skipped")),
                                   final_params(os.path.join(folder, "clean")))
    row.notes = ("error names the line: " + next(l for l in refused.out.splitlines() if f"{dirty}:3" in l)[:160]
                 + "; params compared with a run on the file without that line")
    return row

