"""Which of a run's checkpoints can be read, and what to do with one that cannot.

Shared by training's resume (jaxlm/train/checkpoint.py) and inference's load_params (jaxlm/runs.py),
so it imports nothing from jaxlm.train. Every filesystem operation goes through etils.epath, so a
checkpoint directory may be local or remote (gs://); only the free-space figure needs a local path.

How orbax (0.11+, this venv's 0.12) marks a finished save, and so what a crash leaves behind:
  * local paths (atomic rename): a step is written as `<step>.orbax-checkpoint-tmp` (its items as
    `state.orbax-checkpoint-tmp`, ...), `commit_success.txt` is written into it, and it is renamed
    to `<step>`. CheckpointManager lists every directory named `<step>` (no suffix) and never looks
    for commit_success.txt; a crash mid-save leaves the `.orbax-checkpoint-tmp` folder, which it
    does not list, and deletes (rmtree) when that step is saved again.
  * gs:// (commit file): a step is written in place as `<step>` and finished by writing
    `<step>/commit_success.txt`; a folder without it is not listed, and is deleted when that step
    is saved again.
A listed step can still be unreadable (a truncated array file, a missing tree metadata file), and
orbax has no checksums: flipped bytes inside an array file read back without an error.

A step that cannot be read is set aside, renamed `<step>.unreadable` (`.unreadable.1`, ... if taken):
never deleted or overwritten, not listed by orbax (so keep-N never counts it), and a later save of
that step number writes a fresh folder.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

UNREADABLE = ".unreadable"
# orbax's suffix for a save in progress (orbax.checkpoint._src.path.atomicity_types.TMP_DIR_SUFFIX)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"
TREE_METADATA = "_METADATA"  # an item's tree: every array's path, shape and dtype


class CheckpointError(RuntimeError):
  """A run directory or checkpoint is missing or unreadable; the message says what to do.
  (jaxlm.runs.CheckpointError: defined here so this module needs nothing from jaxlm.runs.)"""


class Damaged(Exception):
  """A checkpoint's files cannot be read (the message says which and why)."""


class Mismatch(CheckpointError):
  """An intact checkpoint that holds other arrays than the config builds: a config change, not damage."""


def step_path(directory, step: int) -> epath.Path:
  return epath.Path(directory) / str(step)


def describe(e: BaseException) -> str:
  """The error's type and first line, without tensorstore's spec dump."""
  text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:300]}"


def _is_transient(e: BaseException) -> bool:
  """Errors of this process, not of the files (out of memory): never a reason to set a step aside."""
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def check_tree(item_dir, template, partial: bool = False) -> None:
  """Compares an item's saved tree metadata with `template` (a pytree of ShapeDtypeStructs).

  Raises Damaged when the metadata cannot be read (without it nothing tells a damaged checkpoint
  from one of another config), Mismatch naming the first differences when the saved tree differs
  (partial: the template may be a subtree of the saved one, as load_params reads params alone).
  """
  item_dir = epath.Path(item_dir)
  if not (item_dir / TREE_METADATA).exists():
    raise Damaged(f"its tree metadata {item_dir / TREE_METADATA} is missing")
  try:
    saved = ocp.tree.to_flat_dict(ocp.StandardCheckpointHandler().metadata(item_dir).tree)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise Damaged(f"its tree metadata in {item_dir} cannot be read ({describe(e)})") from e
  wanted = ocp.tree.to_flat_dict(template)
  name = lambda key: ".".join(str(k) for k in key)
  differ = [f"{name(k)} missing there" for k in wanted if k not in saved]
  if not partial:
    differ += [f"{name(k)} not in the config's tree" for k in saved if k not in wanted]
  shape = lambda leaf: tuple(getattr(leaf, "shape", None) or ())
  differ += [f"{name(k)} {shape(saved[k])} there, {shape(wanted[k])} here"
             for k in wanted if k in saved and shape(saved[k]) != shape(wanted[k])]
  if differ:
    raise Mismatch(f"{len(differ)} difference(s) in the saved arrays: " + "; ".join(differ[:6]))


def check_json_item(item_dir) -> None:
  """Raises Damaged unless `item_dir` (grain's data iterator item: process_<i>-of-<n>.json) holds
  JSON files that all parse: then a failure to restore it is a config change, not damage."""
  item_dir = epath.Path(item_dir)
  files = [p for p in item_dir.iterdir() if p.name.endswith(".json")] if item_dir.exists() else []
  if not files:
    raise Damaged(f"its data iterator state ({item_dir}/*.json) is missing")
  for path in files:
    try:
      json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise Damaged(f"its data iterator state {path} cannot be read ({describe(e)})") from e


def unfinished_saves(directory, listed) -> dict[int, list[epath.Path]]:
  """Step folders orbax does not list as finished: `<step>.orbax-checkpoint-tmp` (a local save cut
  short) and `<step>` without commit_success.txt (a gs:// one), by step. listed: orbax's steps."""
  directory = epath.Path(directory)
  if not directory.exists():
    return {}
  found: dict[int, list[epath.Path]] = {}
  for path in directory.iterdir():
    m = re.fullmatch(r"(\d+)(" + re.escape(TMP_SUFFIX) + r".*)?", path.name)
    if m and path.is_dir() and (m.group(2) or int(m.group(1)) not in listed):
      found.setdefault(int(m.group(1)), []).append(path)
  return found


def set_aside(path) -> epath.Path:
  """Renames a step folder to `<step>.unreadable` (or .unreadable.1, ...): kept, no longer listed."""
  path = epath.Path(path)
  base = path.parent / (path.name.split(".")[0] + UNREADABLE)
  target, n = base, 0
  while target.exists():
    n += 1
    target = base.parent / f"{base.name}.{n}"
  path.rename(target)
  return target


def free_space(path) -> str:
  """Free space on the filesystem holding `path`, as text; "unknown" for a remote path or when the
  filesystem cannot be asked."""
  text = str(path)
  if "://" in text:
    return "unknown"
  p = epath.Path(text)
  try:
    while not p.exists() and p != p.parent:  # the nearest folder that exists
      p = p.parent
    usage = shutil.disk_usage(str(p))
  except OSError:
    return "unknown"
  gib = 1024 ** 3
  return f"{usage.free / gib:.2f} GiB free of {usage.total / gib:.2f} GiB"


def _all_processes_ok(ok: bool) -> bool:
  """Whether every process read its shards: a step one process cannot read is skipped by all."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


def newest_readable(steps, attempt: Callable[[int], Any], on_skip: Callable[[int, str], None]):
  """Tries `steps` newest first; returns (step, attempt(step)) of the first that reads, and the
  [(step, why)] skipped before it. attempt raises Mismatch (passed on: the config is wrong, no
  other step would fit either) or any other error (that step is damaged: on_skip(step, why), then
  the next older one). Returns (None, None, skipped) when no step reads."""
  skipped = []
  for step in sorted(steps, reverse=True):
    error = None
    try:
      value = attempt(step)
    except Mismatch:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      if _is_transient(e):
        raise
      error, value = e, None
      # orbax's reads of the damaged files leave coroutines that were never awaited: end them here,
      # not at some later, arbitrary allocation.
      gc.collect()
    if _all_processes_ok(error is None):
      return step, value, skipped
    why = str(error) if isinstance(error, Damaged) else (
        describe(error) if error else "another process could not read it")
    skipped.append((step, why))
    on_skip(step, why)
  return None, None, skipped
