"""Cloud TPU VM launcher: create a slice, install jaxlm on every worker, train on all workers at
once, retry after preemption, tear down. Every step is a `gcloud` command; `--dry_run` prints them.

  python launch/tpu_vm.py job --name=llama3-8b --zone=us-east5-a --accelerator_type=v5p-64 \\
      --config=configs/llama3_8b.py --workdir=/gcs/my-bucket/runs/llama3-8b --spot [-- --config.x=y]

Subcommands: job (create, install, train with retries, delete), create, install, train (with
retries), logs (follow one worker's log), delete. See launch/README.md.

Preemption: when training fails and the slice is no longer healthy (a spot/preemptible slice was
reclaimed), the slice is deleted, created again, jaxlm reinstalled and the same command rerun; it
resumes from the latest checkpoint in --workdir (checkpoint.resume=auto). Training that exits with
the trainer's preemption code (75: a SIGTERM, e.g. a maintenance event, after checkpointing the
step) on a slice that is still healthy is rerun in place. Any other failure on a healthy slice is
a bug, not a preemption: it is reported, not retried.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import (PREEMPTED_EXIT_CODE, LaunchError, Result, Runner, check_config, check_name, check_overrides,
                           check_workdir, chips, fail, shell_line, subprocess_runner, train_argv)


# The default TPU VM runtime (software) version of each generation.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}


def parse_topology(accelerator_type: str):
  """'v5p-64' -> jaxlm.chips.TpuSlice; an unknown generation or size is a LaunchError naming the
  valid ones."""
  try:
    return chips.parse_slice_name(accelerator_type)
  except chips.HardwareError as e:
    raise LaunchError(f"--accelerator_type: {e}") from None


@dataclasses.dataclass(frozen=True)
class Step:
  argv: tuple[str, ...]
  capture: bool = False  # read its stdout (a state query)
  may_fail: bool = False  # e.g. deleting a slice that preemption already removed
  until: str = ""  # poll: rerun every `interval` seconds until stdout is this


@dataclasses.dataclass(frozen=True)
class TpuVmCommands:
  """Every command of a job, in order, built once from the arguments."""
  create: tuple[Step, ...]
  install: tuple[Step, ...]
  train: Step
  state: Step  # prints the slice's state
  healthy: tuple[str, ...]  # states in which a failed run was not a preemption
  delete: Step
  logs: Step


def _gcloud(*args: str, zone: str, project: str) -> tuple[str, ...]:
  return ("gcloud", "compute", "tpus", *args, f"--zone={zone}") + ((f"--project={project}",) if project else ())


def make_commands(a: argparse.Namespace) -> TpuVmCommands:
  topo = parse_topology(a.accelerator_type)
  version = a.version or RUNTIMES[topo.generation]
  g = lambda *args: _gcloud(*args, zone=a.zone, project=a.project)  # noqa: E731
  spot = ("--spot",) if a.spot else ()
  ssh = lambda command, worker="all": Step(g("tpu-vm", "ssh", a.name, f"--worker={worker}",  # noqa: E731
                                              "--command", command))
  if a.queued:  # a queued resource waits for capacity, then holds the slice as node `name`
    create = (Step(g("queued-resources", "create", a.name, f"--node-id={a.name}",
                     f"--accelerator-type={topo.accelerator_type}", f"--runtime-version={version}", *spot)),
              Step(g("queued-resources", "describe", a.name, "--format=value(state.state)"),
                   capture=True, until="ACTIVE"))
    state = Step(g("queued-resources", "describe", a.name, "--format=value(state.state)"), capture=True)
    healthy = ("ACTIVE",)
    delete = Step(g("queued-resources", "delete", a.name, "--force", "--quiet"), may_fail=True)
  else:
    create = (Step(g("tpu-vm", "create", a.name, f"--accelerator-type={topo.accelerator_type}",
                     f"--version={version}", *spot)),)
    state = Step(g("tpu-vm", "describe", a.name, "--format=value(state)"), capture=True)
    healthy = ("READY",)
    delete = Step(g("tpu-vm", "delete", a.name, "--quiet"), may_fail=True)

  # Install the committed tree (HEAD), not the working copy: what runs is a commit you can name.
  archive = f"/tmp/jaxlm-{a.name}.tar.gz"
  install = (
      Step(("git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD")),
      Step(g("tpu-vm", "scp", archive, f"{a.name}:jaxlm.tar.gz", "--worker=all")),
      ssh('rm -rf jaxlm && mkdir jaxlm && tar -xzf jaxlm.tar.gz -C jaxlm && '
          'python3 -m pip install -q -e "./jaxlm[gcs]" "jax[tpu]"'),  # [gcs]: gs:// workdirs
  )
  # Each worker appends to its own ~/jaxlm-train.log and streams the lines, tagged with its hostname
  # (…-w-<worker>), back through gcloud; pipefail keeps the trainer's exit status.
  train = ssh("set -o pipefail; cd jaxlm && JAXLM_DISTRIBUTED=1 "
              + shell_line(train_argv("python3", a.config, a.workdir, a.overrides))
              + ' 2>&1 | tee -a ~/jaxlm-train.log | sed -u "s/^/[$(hostname)] /"')
  logs = ssh("tail -n 200 -f ~/jaxlm-train.log", worker=str(a.worker))
  return TpuVmCommands(create, install, train, state, healthy, delete, logs)


def execute(step: Step, runner: Runner, sleep: Callable[[float], None] = time.sleep,
            interval: float = 60.0) -> Result:
  """Runs one step (polling it if it has `until`); a failure raises LaunchError unless may_fail."""
  while True:
    result = runner(step.argv, step.capture)
    if step.until and result.returncode == 0 and result.stdout.strip() != step.until:
      sleep(interval)
      continue
    if result.returncode != 0 and not step.may_fail:
      raise LaunchError(f"command failed with exit status {result.returncode}: {shell_line(step.argv)}")
    return result


def train_with_retries(commands: TpuVmCommands, runner: Runner, max_retries: int, log=print,
                       sleep: Callable[[float], None] = time.sleep) -> int:
  """Trains; after each preemption recreates the slice and trains again. Returns the preemptions
  survived. Training resumes from the latest checkpoint because the command is the same."""
  preemptions = 0
  while True:
    code = runner(commands.train.argv, False).returncode
    if code == 0:
      return preemptions
    state = runner(commands.state.argv, True).stdout.strip() or "gone"
    if state in commands.healthy and code == PREEMPTED_EXIT_CODE:
      # SIGTERM on a slice that is still up (a maintenance event): the step is checkpointed, rerun
      if preemptions == max_retries:
        raise LaunchError(f"training was stopped by SIGTERM {preemptions + 1} times; giving up. Run "
                          "`train` again: it resumes from the latest checkpoint")
      preemptions += 1
      log(f"tpu_vm: training stopped by SIGTERM (exit {code}) on a {state} slice: rerunning it "
          f"(retry {preemptions} of {max_retries}) from the checkpoint it saved")
      continue
    if state in commands.healthy:
      raise LaunchError(f"training failed on a healthy slice (state {state}): not a preemption, so not "
                        "retried; read the workers' logs (the `logs` subcommand), fix, and run `train` again")
    if preemptions == max_retries:
      raise LaunchError(f"slice {state} after {preemptions} retries; giving up. Raise --max_retries, or run "
                        "`job` again later: training resumes from the latest checkpoint")
    preemptions += 1
    log(f"tpu_vm: slice {state}: recreating it (retry {preemptions} of {max_retries}); training resumes "
        "from the latest checkpoint")
    for step in (commands.delete, *commands.create, *commands.install):
      execute(step, runner, sleep)


def job_steps(commands: TpuVmCommands, command: str, keep: bool = False) -> list[Step]:
  """The steps a subcommand runs when nothing fails (what --dry_run prints)."""
  return {
      "job": [*commands.create, *commands.install, commands.train] + ([] if keep else [commands.delete]),
      "create": list(commands.create),
      "install": list(commands.install),
      "train": [commands.train],
      "logs": [commands.logs],
      "delete": [commands.delete],
  }[command]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/tpu_vm.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=["job", "create", "install", "train", "logs", "delete"])
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name, e.g. llama3-8b")
  p.add_argument("--zone", required=True, help="e.g. us-east5-a (where your slice quota is)")
  p.add_argument("--project", default="", help="GCP project; default: gcloud's configured one")
  p.add_argument("--accelerator_type", default="v5p-8",
                 help="v4-N, v5e-N (= v5litepod-N), v5p-N or v6e-N, e.g. v5p-64")
  p.add_argument("--version", default="", help="TPU VM runtime version; default: per generation")
  p.add_argument("--spot", action="store_true", help="spot capacity: cheaper, may be preempted")
  p.add_argument("--queued", action="store_true", help="create through a queued resource")
  p.add_argument("--config", default="configs/llama3_8b.py", help="config file, from the repository root")
  p.add_argument("--workdir", default="", help="run directory on storage all workers share (required "
                 "for job/train): checkpoints for resuming live there")
  p.add_argument("--max_retries", type=int, default=5, help="recreations after preemption")
  p.add_argument("--keep", action="store_true", help="job: keep the slice after training")
  p.add_argument("--worker", type=int, default=0, help="logs: which worker's log to follow")
  p.add_argument("--dry_run", action="store_true", help="print the commands, one a line; run nothing")
  return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """argv after the program name; config overrides come after a lone `--`."""
  argv = list(argv)
  overrides = argv[argv.index("--") + 1:] if "--" in argv else []
  a = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  a.overrides = check_overrides(overrides)
  check_name("--name", a.name)
  topo = parse_topology(a.accelerator_type)
  if a.max_retries < 0:
    raise LaunchError(f"--max_retries={a.max_retries} must be >= 0 (0: never retry)")
  if a.command in ("job", "train"):
    if not a.workdir:
      raise LaunchError("--workdir is required for job/train: e.g. --workdir=/gcs/my-bucket/runs/llama3-8b")
    check_workdir(a.workdir)
    check_config(a.config)
  if not 0 <= a.worker < topo.hosts:
    raise LaunchError(f"--worker={a.worker}: a {a.accelerator_type} slice has workers 0..{topo.hosts - 1}")
  return a


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner) -> int:
  try:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    commands = make_commands(a)
    if a.dry_run:
      for step in job_steps(commands, a.command, a.keep):
        print(shell_line(step.argv))
      return 0
    if a.command == "job":
      try:
        for step in (*commands.create, *commands.install):
          execute(step, runner)
        train_with_retries(commands, runner, a.max_retries)
      finally:  # an idle slice still bills: tear it down however training ended, unless --keep
        if not a.keep:
          execute(commands.delete, runner)
    elif a.command == "train":
      train_with_retries(commands, runner, a.max_retries)
    else:
      for step in job_steps(commands, a.command):
        execute(step, runner)
  except LaunchError as e:
    fail(e, "tpu_vm")
  return 0


if __name__ == "__main__":
  sys.exit(main())
