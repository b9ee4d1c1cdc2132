"""What both launchers share: their error type, checks of the training arguments, running commands."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence


class LaunchError(ValueError):
  """A launcher argument or a launch step is wrong; the message names the fix."""


def _load_chips():
  """jaxlm/chips.py, without importing the jaxlm package: its __init__ imports flax and so jax, which
  a machine that only launches jobs need not have."""
  for name in ("jaxlm.chips", "_jaxlm_chips"):
    if name in sys.modules:
      return sys.modules[name]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("_jaxlm_chips", os.path.join(root, "jaxlm", "chips.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their class's module up while it is created
  spec.loader.exec_module(module)
  return module


chips = _load_chips()


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str = ""


# runner(argv, capture) -> Result. capture=True: the caller reads stdout (a state query); False: the
# output streams to the console (training logs). Tests pass a fake that records argv.
Runner = Callable[[Sequence[str], bool], Result]


def subprocess_runner(argv: Sequence[str], capture: bool = False) -> Result:
  done = subprocess.run(list(argv), stdout=subprocess.PIPE if capture else None, text=True)
  return Result(done.returncode, done.stdout or "")


def shell_line(argv: Sequence[str]) -> str:
  """The command as one shell line; the dry run prints exactly what the runner is given."""
  return shlex.join(argv)


_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,60}[a-z0-9])?$")


def check_name(flag: str, value: str) -> str:
  if not _NAME.match(value):
    raise LaunchError(
        f"{flag}={value!r} is not a valid name; use lowercase letters, digits and '-', starting with "
        "a letter and not ending with '-' (at most 62 characters), e.g. llama3-8b")
  return value


def check_config(path: str) -> str:
  if not path.endswith(".py") or not os.path.isfile(path):
    raise LaunchError(
        f"--config={path!r} is not a config file; give a path relative to the repository root, e.g. "
        "--config=configs/llama3_8b.py, and run the launcher from the repository root")
  return path


def check_workdir(path: str) -> str:
  if path.startswith("gs://"):  # jaxlm writes run directories through etils.epath and orbax
    if len(path) <= len("gs://") or path[len("gs://")] == "/":
      raise LaunchError(f"--workdir={path!r} names no bucket; write gs://BUCKET/PATH")
    return path
  if not os.path.isabs(path):
    raise LaunchError(
        f"--workdir={path!r} must be an absolute path on storage every host shares and that outlives "
        "the job (checkpoints for resuming live there), e.g. gs://my-bucket/runs/llama3-8b or a shared mount")
  return path


def check_overrides(overrides: Sequence[str]) -> list[str]:
  """Extra arguments pass through to `python -m jaxlm.train`: they must be config overrides."""
  for arg in overrides:
    if not (arg.startswith("--config.") and "=" in arg):
      raise LaunchError(
          f"extra argument {arg!r} is not a config override; write it as --config.<section>.<field>=value "
          "after a lone --, e.g. -- --config.train.steps=1000")
    if arg.startswith("--config.train.workdir="):
      raise LaunchError("set the run directory with the launcher's --workdir, not --config.train.workdir")
  return list(overrides)


# `python -m jaxlm.train` exits with this after SIGTERM/SIGINT once the interrupted step is
# checkpointed (jaxlm/train/preemption.py; the launchers must not import jax, tests keep both equal):
# the launchers rerun the same command, which resumes from that checkpoint.
PREEMPTED_EXIT_CODE = 75


def train_argv(python: str, config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
  return [python, "-m", "jaxlm.train", f"--config={config}", f"--config.train.workdir={workdir}",
          *overrides]


def fail(error: Exception, prog: str) -> None:
  print(f"{prog}: {error}", file=sys.stderr)
  sys.exit(2)
