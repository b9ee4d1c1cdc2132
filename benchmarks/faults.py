"""Fault injection, one table row per fault: each fault hits a real training run of configs/tiny.py
(12 steps, a checkpoint every 4, 2 CPU devices in all) and the run is relaunched with the same
command; the row compares it with an uninterrupted run.

  python benchmarks/faults.py [--workdir DIR] [--only NAME ...]

Columns: how the fault is injected; steps lost (checkpointed progress thrown away: the relaunch
starts that many steps before where the faulted run had got to); seconds to recover (the relaunch's
start to its first new step, compile included); data lost (steps that trained on another batch or
from another state than the uninterrupted run's: "none" is the promise); final parameters bitwise
equal to the uninterrupted run's; every checkpoint folder there before the relaunch still there after
it (a damaged one renamed <step>.unreadable). The scenarios live in tests/faults/harness.py, which
tests/faults/test_faults.py runs with the same assertions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from faults import harness, inject  # noqa: E402


def truncated(ckpt_dir, step):
  """A truncated array file (the newest step's largest, cut in half)."""
  return inject.truncate_newest_array(ckpt_dir)


def scenarios(s: harness.Scenarios) -> dict:
  return {
      "sigterm1": lambda: s.sigterm(processes=1),
      "sigterm2": lambda: s.sigterm(processes=2),
      "process_count": s.other_process_count,
      "kill_in_save": s.kill_in_save,
      "truncated": lambda: s.damaged("truncated array file", truncated),
      "commit_marker": lambda: s.damaged("missing commit marker", inject.remove_commit_marker),
      "metadata": lambda: s.damaged("missing tree metadata", inject.remove_metadata),
      "nan": lambda: s.nonfinite("NaN in a batch", "--nan_at=6"),
      "inf_lr": lambda: s.nonfinite("inf learning rate for one step", "--inf_lr_at=6"),
      "full_disk": s.full_disk,
      "full_disk_warn": s.full_disk_warn,
      "dead_peer": lambda: s.dead_peer(timeout=10),
      "bad_record": s.bad_record,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="", help="where the runs go (default: a temporary folder)")
  p.add_argument("--only", nargs="*", default=None, help="scenario names to run (default: all)")
  a = p.parse_args(argv)
  base = a.workdir or tempfile.mkdtemp(prefix="jaxlm-faults-")
  t = time.time()
  s = harness.Scenarios(base, os.path.join(base, "tokenizers"))
  print(f"uninterrupted run: {time.time() - t:.0f} s, in {base}", flush=True)
  rows = []
  for name, scenario in scenarios(s).items():
    if a.only and name not in a.only:
      continue
    t = time.time()
    try:
      rows.append(scenario())
    except AssertionError as e:  # a broken promise is a row too
      rows.append(harness.Row(name, "", notes=f"FAILED: {str(e)[-300:]}"))
    print(f"{name}: {time.time() - t:.0f} s", flush=True)
  cols = ("fault", "injected", "steps lost", "recover s", "data lost", "params equal",
          "checkpoints kept")
  print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
  for r in rows:
    recover = "-" if r.recover_s is None else f"{r.recover_s:.1f}"
    equal = {True: "yes", False: "no", None: "-"}[r.params_equal]
    kept = {True: "yes", False: "NO", None: "-"}[r.kept]
    print(f"| {r.fault} | {r.injected} | {r.steps_lost} | {recover} | {r.data_lost} | {equal} | {kept} |")
  print("\nnotes:")
  for r in rows:
    print(f"- {r.fault}: {r.notes}")


if __name__ == "__main__":
  main()
