"""SLURM launcher for GPU clusters: writes a batch script that trains on N nodes and submits it.

  python launch/slurm.py --nodes=4 --job_name=llama3-8b --config=configs/llama3_8b.py \\
      --workdir=/shared/runs/llama3-8b [--partition=gpu] [--venv=/shared/venvs/jaxlm] [-- --config.x=y]

One process per GPU (`--ntasks-per-node` = GPUs per node), as JAX expects under SLURM: each
process's jax.distributed.initialize() (JAXLM_DISTRIBUTED=1) reads the process count and id from
SLURM_NTASKS / SLURM_PROCID and takes GPU SLURM_LOCALID; the script names the coordinator, the
first node of the allocation, in JAX_COORDINATOR_ADDRESS. `--requeue` puts a preempted job back in
the queue, and the same command resumes from the latest checkpoint in --workdir. The trainer's
preemption exit code (75: SIGTERM or SIGINT, the step checkpointed) requeues the job too, and
`--signal=TERM@180` sends that SIGTERM 3 minutes before the time limit, so no work is lost there.

--dry_run prints the exact shell commands instead of running them: the script written with a
here-document, then `sbatch`. Run it from the repository root (the job starts where sbatch ran).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import (PREEMPTED_EXIT_CODE, LaunchError, Runner, check_config, check_name, check_overrides, check_workdir,
                           fail, shell_line, subprocess_runner, train_argv)

_TIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$|^\d+$")  # [D-]HH:MM:SS or minutes


def batch_script(a: argparse.Namespace) -> str:
  directives = [f"--job-name={a.job_name}", f"--nodes={a.nodes}", f"--ntasks-per-node={a.gpus_per_node}",
                f"--gpus-per-node={a.gpus_per_node}", "--exclusive", f"--time={a.time}"]
  if a.partition:
    directives.append(f"--partition={a.partition}")
  # SIGTERM 3 minutes before the time limit: the trainer checkpoints that step and exits 75
  directives += [f"--output={a.workdir}/slurm-%j.out", "--requeue", "--signal=TERM@180"]
  lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -eo pipefail"]
  if a.venv:
    lines.append(f"source {shlex.quote(a.venv)}/bin/activate")
  lines += [
      "# jax.distributed: process count and id from SLURM_NTASKS / SLURM_PROCID, coordinator = first node",
      'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
      f'{a.port}"',
      "export JAXLM_DISTRIBUTED=1",
      "srun --kill-on-bad-exit=1 " + shell_line(train_argv("python", a.config, a.workdir, a.overrides))
      + " && status=0 || status=$?",
      f"# {PREEMPTED_EXIT_CODE}: stopped by SIGTERM/SIGINT after checkpointing; back in the queue, resumes",
      f'if [ "$status" -eq {PREEMPTED_EXIT_CODE} ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
      'exit "$status"',
  ]
  return "\n".join(lines) + "\n"


def script_path(a: argparse.Namespace) -> str:
  return a.script or f"{a.workdir}/{a.job_name}.sbatch"


def dry_run_text(a: argparse.Namespace) -> str:
  """The launcher's actions as the shell commands that do the same."""
  path = script_path(a)
  return (f"mkdir -p {shlex.quote(a.workdir)}\n"
          f"cat > {shlex.quote(path)} <<'EOF'\n{batch_script(a)}EOF\n"
          f"{shell_line(['sbatch', path])}\n")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
  p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs a node (one process each)")
  p.add_argument("--job_name", required=True, help="e.g. llama3-8b")
  p.add_argument("--config", default="configs/llama3_8b.py", help="config file, from the repository root")
  p.add_argument("--workdir", required=True, help="run directory on the shared filesystem")
  p.add_argument("--partition", default="", help="SLURM partition; default: the cluster's")
  p.add_argument("--time", default="48:00:00", help="wall-clock limit, [D-]HH:MM:SS or minutes")
  p.add_argument("--venv", default="", help="virtualenv (on the shared filesystem) with jaxlm installed")
  p.add_argument("--port", type=int, default=12345, help="coordinator port on the first node")
  p.add_argument("--script", default="", help="where to write the batch script; default: in --workdir")
  p.add_argument("--dry_run", action="store_true", help="print the commands; write and submit nothing")
  return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  argv = list(argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  a = build_parser().parse_args(argv[:cut])
  a.overrides = check_overrides(argv[cut + 1:])
  if a.nodes < 1:
    raise LaunchError(f"--nodes={a.nodes} must be >= 1")
  if not 1 <= a.gpus_per_node <= 16:
    raise LaunchError(f"--gpus_per_node={a.gpus_per_node} must be between 1 and 16 (8 on H100/A100 nodes)")
  if not _TIME.match(a.time):
    raise LaunchError(f"--time={a.time!r} is not a SLURM time; write [D-]HH:MM:SS or minutes, e.g. 2-00:00:00")
  if not 1024 <= a.port <= 65535:
    raise LaunchError(f"--port={a.port} must be an unprivileged port, 1024..65535")
  check_name("--job_name", a.job_name)
  check_workdir(a.workdir)
  check_config(a.config)
  return a


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner) -> int:
  try:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.dry_run:
      print(dry_run_text(a), end="")
      return 0
    os.makedirs(a.workdir, exist_ok=True)
    with open(script_path(a), "w") as f:
      f.write(batch_script(a))
    result = runner(["sbatch", script_path(a)], False)
    if result.returncode:
      raise LaunchError(f"sbatch failed with exit status {result.returncode}: {script_path(a)}")
  except LaunchError as e:
    fail(e, "slurm")
  return 0


if __name__ == "__main__":
  sys.exit(main())
