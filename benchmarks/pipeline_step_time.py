"""Pipeline step time and memory on simulated CPU devices: GPipe and the circular schedule
(stage x data) against data parallel alone.

  python benchmarks/pipeline_step_time.py                  # 8 simulated devices, ~4 min on 2 cores
  python benchmarks/pipeline_step_time.py --stages 2 4 --microbatches 4 8 --repeats 2

Every row trains the same small model on the same global batch over 8 simulated devices. Simulated
devices share the host's cores, so a step's time is the total work of all devices: the pipeline's
overhead shows as the bubble's padded iterations (GPipe: (p - 1) / (m + p - 1) of the
stage-iterations compute on padding; circular: (p - 1) / (v m + p - 1) for m >= p) plus the
stage-to-stage copies, and the circular schedule's second forward (it rematerialises each
stage-iteration). Rows are timed interleaved (median of --steps). On real accelerators the stages
run concurrently and the bubble is idle time instead. "temp MB" is XLA's compiled
memory_analysis().temp_size_in_bytes of the train step per device: activations kept for the
backward pass plus other scratch. Each circular row also shows its time and temp as ratios to the
GPipe row of the same stages and micro-batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.config import base_config, validate  # noqa: E402
from jaxlm.parallel.pipeline import bubble_fraction  # noqa: E402
from jaxlm.parallel.sharding import global_batch  # noqa: E402
from jaxlm.train.setup import init_sharded_state, jit_train_step, make_setup  # noqa: E402


def config(stage: int, microbatches: int, a, schedule: str = "gpipe") -> object:
  c = base_config()
  c.model.update(vocab_size=512, d_model=a.d_model, num_layers=a.layers, num_heads=4, num_kv_heads=4,
                 mlp_dim=4 * a.d_model, max_seq_len=a.seq)
  c.compute.update(pipeline_microbatches=microbatches, pipeline_schedule=schedule,
                   pipeline_repeats=a.repeats)
  c.tokenizer.vocab_size = 512
  c.data.seq_len = a.seq
  c.train.update(batch_size=a.batch, warmup_steps=0)
  c.mesh.update(data=8 // stage, stage=stage)
  return validate(c)


class Row:
  def __init__(self, c):
    setup = make_setup(c)
    self.state = init_sharded_state(setup)
    rng = np.random.default_rng(0)
    b, t = c.train.batch_size, c.data.seq_len
    tokens = rng.integers(0, c.model.vocab_size, (b, t)).astype(np.int32)
    local = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones((b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "weights": np.ones((b, t), np.int32)}
    self.batch = global_batch(local, setup.batch_sharding)
    self.step_fn = jit_train_step(setup).lower(self.state, self.batch).compile()
    self.temp = self.step_fn.memory_analysis().temp_size_in_bytes

  def step(self) -> float:
    t = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - t


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--stages", type=int, nargs="+", default=[2, 4])
  p.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
  p.add_argument("--repeats", type=int, default=2, help="circular: chunks per stage (v)")
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=6)
  a = p.parse_args(argv)
  rows = {"dp8 (no pipeline)": (Row(config(1, 0, a)), 1, 0, "-")}
  for s in a.stages:
    for m in a.microbatches:
      for schedule in ("gpipe", "circular"):
        name = f"pp{s} x dp{8 // s}, m={m}, {schedule}"
        rows[name] = (Row(config(s, m, a, schedule)), s, m, schedule)
  times = {k: [] for k in rows}
  for r in rows.values():  # warm-up
    r[0].step()
  for _ in range(a.steps):
    for k, r in rows.items():
      times[k].append(r[0].step())
  med = {k: statistics.median(t) for k, t in times.items()}
  base = med["dp8 (no pipeline)"]
  print(f"\n8 simulated CPU devices on {os.cpu_count()} cores; {a.layers} layers, d_model {a.d_model}, "
        f"seq {a.seq}, batch {a.batch}, circular v={a.repeats}; median of {a.steps} interleaved steps")
  print(f"{'layout':36s} {'ms/step':>8s} {'vs dp8':>7s} {'bubble':>7s} {'temp MB':>8s} "
        f"{'time vs gpipe':>14s} {'temp vs gpipe':>14s}")
  for k, (row, s, m, schedule) in rows.items():
    bubble = "-" if schedule == "-" else f"{bubble_fraction(s, m, a.repeats if schedule == 'circular' else 1):.0%}"
    vs = ("", "")
    if schedule == "circular":
      g = k.replace("circular", "gpipe")
      vs = (f"{med[k] / med[g]:.2f}x", f"{row.temp / rows[g][0].temp:.2f}x")
    print(f"{k:36s} {med[k] * 1e3:8.1f} {med[k] / base:6.2f}x {bubble:>7s} {row.temp / 1e6:8.1f} "
          f"{vs[0]:>14s} {vs[1]:>14s}")


if __name__ == "__main__":
  sys.exit(main())
