"""A run moved between process counts continues the same data: 1 process (8 simulated devices)
trains K steps and checkpoints, 2 processes (4 devices each, gloo) resume it for K more, 1 process
finishes the last K; losses and final parameters are those of an uninterrupted 3K-step run.

jaxlm/train/checkpoint.py saves the data iterator with jaxlm.data.stream's DataSave/DataRestore
(grain's own handler only restores on the process count that wrote it).

The legs share one JAX persistent compilation cache (this process's runs and the two workers), so
each program is compiled once: the last leg loads the first run's train and eval steps.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import small_corpus
from jaxlm import presets
from jaxlm.train.loop import train

K = 2  # steps per leg


def resume_config(workdir):
  c = presets.load("tiny").get_config()
  c.train.update(steps=3 * K, log_every=1, eval_every=0, eval_batches=1, workdir=str(workdir),
                 progress_bar=False)
  c.tokenizer.cache_dir = os.path.join(os.path.dirname(str(workdir)), "tokenizers")
  c.data.update(small_corpus.write(os.path.join(os.path.dirname(str(workdir)), "corpus")))
  c.checkpoint.async_save = False
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, stop_at, cache):
  port = _free_port()
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stream_resume_worker.py")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(workdir), str(stop_at)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)


def _data_state(workdir, step):
  folder = os.path.join(workdir, "checkpoints", str(step), "data")
  files = sorted(f for f in os.listdir(folder) if f.startswith("process_"))
  with open(os.path.join(folder, files[0])) as f:
    return files, json.load(f)


@pytest.mark.heavy
def test_one_two_one_processes_continue_the_uninterrupted_run(tmp_path, compile_cache):
  assert jax.device_count() == 8  # tests/conftest.py
  straight = train(resume_config(tmp_path / "straight"))
  moved = tmp_path / "moved"
  train(resume_config(moved), stop_at_step=K)
  _two_processes(moved, 2 * K, compile_cache)
  resumed = train(resume_config(moved))

  # The data states really crossed process counts, as one global stream.
  assert _data_state(moved, K)[0] == ["process_0-of-1.json"]
  files, state = _data_state(moved, 2 * K)
  assert files == ["process_0-of-2.json", "process_1-of-2.json"]
  assert (state["stream"], state["process_count"], state["batches"]) == ("global", 2, 2 * K)
  assert _data_state(moved, 3 * K)[1]["batches"] == 3 * K

  a, b = _losses(tmp_path / "straight"), _losses(moved)
  assert sorted(a) == sorted(b) == list(range(1, 3 * K + 1))
  # Two processes reduce gradients in another order: equal up to float rounding.
  np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
