"""Damage a real orbax checkpoint folder (checkpoints/<step>/{state,data}) the way a crash would.

Each function takes the checkpoints directory (a run's train.workdir + "/checkpoints"; local or any
etils.epath path) and returns what it changed. `failing_writes` makes orbax's own file writes fail
with an OSError, as a full disk or a read-only folder does, for as long as the `with` lasts.
"""

from __future__ import annotations

import contextlib
import errno
import os

from etils import epath

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step being written (local paths)
COMMIT_FILE = "commit_success.txt"


def _steps(ckpt_dir) -> list[int]:
  return sorted(int(p.name) for p in epath.Path(ckpt_dir).iterdir() if p.name.isdigit() and p.is_dir())


def _newest(ckpt_dir) -> epath.Path:
  steps = _steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f"no step folder in {ckpt_dir}")
  return epath.Path(ckpt_dir) / str(steps[-1])


def truncate_newest_array(ckpt_dir, keep: float = 0.5) -> epath.Path:
  """Imitates a write cut off mid-file (power loss, full disk): the newest step's largest array
  file keeps only its first `keep` fraction. Returns that file."""
  step_dir = _newest(ckpt_dir)
  state = step_dir / "state"  # arrays: ocdbt.process_<i>/d/<hash> (OCDBT) or d/<hash>
  files = [p for pattern in ("ocdbt.process_*/d/*", "d/*") for p in state.glob(pattern)
           if p.is_file() and p.stat().length > 1]
  if not files:
    raise FileNotFoundError(f"no array file under {step_dir / 'state'}")
  largest = max(files, key=lambda p: p.stat().length)
  data = largest.read_bytes()
  largest.write_bytes(data[: int(len(data) * keep)])
  return largest


def remove_commit_marker(ckpt_dir, step: int) -> epath.Path:
  """Imitates a crash after the step's files were written but before orbax committed it: no
  commit_success.txt, and on a local path the folder keeps its in-progress name
  `<step>.orbax-checkpoint-tmp` (orbax renames it to `<step>` as its last act). Returns the folder."""
  step_dir = epath.Path(ckpt_dir) / str(step)
  (step_dir / COMMIT_FILE).unlink(missing_ok=True)
  if "://" in str(step_dir):  # gs://: orbax marks the commit with the file alone
    return step_dir
  unfinished = step_dir.parent / (step_dir.name + TMP_SUFFIX)
  step_dir.rename(unfinished)
  return unfinished


def remove_metadata(ckpt_dir, step: int) -> epath.Path:
  """Imitates a save cut short before orbax wrote the state's tree metadata (state/_METADATA: every
  array's path, shape and dtype). Returns the removed file's path."""
  path = epath.Path(ckpt_dir) / str(step) / "state" / "_METADATA"
  path.unlink()
  return path


@contextlib.contextmanager
def failing_writes(code: int = errno.ENOSPC, match: str = ""):
  """Imitates a full disk (ENOSPC) or a read-only folder (EACCES): every file written through
  etils.epath (orbax's metadata and commit files, grain's iterator state) whose path contains
  `match` raises OSError(code). In an async save the error is raised in orbax's background thread,
  as a real one is. Local paths only (it patches the class of a local epath.Path)."""
  cls = type(epath.Path("/"))
  names = ("write_text", "write_bytes")
  own = {name: cls.__dict__.get(name) for name in names}  # None: inherited
  originals = {name: getattr(cls, name) for name in names}

  def failing(name):
    def write(self, *args, **kwargs):
      if match in str(self):
        raise OSError(code, os.strerror(code), str(self))
      return originals[name](self, *args, **kwargs)
    return write

  for name in names:
    setattr(cls, name, failing(name))
  try:
    yield
  finally:
    for name in names:
      if own[name] is None:
        delattr(cls, name)
      else:
        setattr(cls, name, own[name])
