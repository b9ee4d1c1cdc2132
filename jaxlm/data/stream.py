"""The training stream of batches, this process's rows of it, and its checkpointed position.

Two kinds of stream (`StreamIterator.kind`):

  "global"       every process builds the same pipeline (same documents, shuffles and packing)
                 and keeps rows [p * B/P, (p+1) * B/P) of each batch of B = train.batch_size rows:
                 the sequence of global batches is the same for any process count P, so its
                 position (the grain state, identical on every process) continues on any P.
  "per_process"  process p reads only its own share of the documents and batches B/P rows of
                 them (tfds: a corpus too large for every process to read); the global batch
                 depends on P, so a position written on P processes only continues on P.

get_state() wraps the grain state with what it was written by:

    {"stream": kind, "process_count": P, "batches": global batches taken so far,
     "reshard_at": None or the batch a re-sharded stream began at, "grain": grain's state}

set_state() continues a state whose stream it can continue; otherwise it raises a CheckpointError
naming data.allow_reshard, or, with data.allow_reshard=True, restarts its stream from an order
drawn anew for that batch count (recorded as reshard_at, so a later resume rebuilds the same one).
A bare grain state (a checkpoint written before the wrapper existed) counts as a per-process
stream of the run's own process count; on one process that is the global stream too.

grain's own CheckpointHandler (grain.checkpoint.CheckpointSave) writes process_<i>-of-<P>.json and
restores only from the file of the current i and P, so a run on another P finds no file.
`DataSave`/`DataRestore` here write the same files and restore from whichever process count wrote
them; set_state then decides, as above.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np

GLOBAL, PER_PROCESS = "global", "per_process"


def continues(written_kind: str, written_count: int, kind: str, count: int) -> bool:
  """Whether a position in a `written_kind` stream of `written_count` processes is a position in
  this `kind` stream of `count` processes (one process: every kind is the same stream)."""
  if written_kind == GLOBAL and kind == GLOBAL:
    return True
  if written_count == 1 and (count == 1 or kind == GLOBAL):
    return True
  return written_kind == kind == PER_PROCESS and written_count == count


class StreamIterator(grain.DatasetIterator):
  """This process's training batches [B / P, seq_len] of a global or per-process stream.

  build(reshard_at) makes the iterator of whole batches: global batches [B, seq_len] (kind
  GLOBAL) or this process's [B / P, seq_len] (PER_PROCESS); reshard_at (None, or a batch count)
  selects the order of a re-sharded stream. stats: what reading the data found, to log once.
  """

  def __init__(self, build: Callable[[int | None], grain.DatasetIterator], kind: str,
               process_index: int, process_count: int, batch_size: int, *, allow_reshard: bool,
               describe: str, stats: dict[str, float] | None = None):
    if kind not in (GLOBAL, PER_PROCESS):
      raise ValueError(f"stream kind must be {GLOBAL!r} or {PER_PROCESS!r}, got {kind!r}")
    self._build, self.kind, self.describe = build, kind, describe
    self.process_index, self.process_count = process_index, process_count
    self.rows = batch_size // process_count
    self.allow_reshard = allow_reshard
    self._batches, self._reshard_at = 0, None
    super().__init__(build(None))
    self.stats = dict(stats or {})  # after build, which may fill it

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    self._batches += 1
    if self.kind == PER_PROCESS:
      return batch
    start = self.process_index * self.rows
    return {k: v[start:start + self.rows] for k, v in batch.items()}  # [B / P, seq_len]

  def get_state(self) -> dict[str, Any]:
    return {"stream": self.kind, "process_count": self.process_count, "batches": self._batches,
            "reshard_at": self._reshard_at, "grain": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if "grain" not in state:  # a bare grain state, written before the wrapper
      state = {"stream": PER_PROCESS, "process_count": self.process_count, "batches": None,
               "reshard_at": None, "grain": state}
    kind, count = state["stream"], int(state["process_count"])
    if continues(kind, count, self.kind, self.process_count):
      self._rebuild(state.get("reshard_at"))
      self._parent.set_state(state["grain"])
      self._batches = state.get("batches") or 0
      return
    if not self.allow_reshard:
      from jaxlm.runs import CheckpointError  # pylint: disable=g-import-not-at-top  (import cycle)
      raise CheckpointError(
          f"the checkpoint's data position belongs to a {kind} stream of {count} process(es); this "
          f"run has {self.process_count}, and {self.describe} gives a {self.kind} stream, so that "
          f"position cannot continue here. Resume on {count} process(es), or set "
          "data.allow_reshard=True to go on with a re-sharded stream (an order drawn anew from "
          "this step, not the batches an uninterrupted run would have seen)")
    batches = int(state.get("batches") or 0)  # a bare grain state does not know: from 0
    self._rebuild(batches)
    self._batches = batches

  def _rebuild(self, reshard_at: int | None) -> None:
    if reshard_at != self._reshard_at:
      self._parents = (self._build(reshard_at),)
      self._reshard_at = reshard_at

  def __str__(self) -> str:
    return f"StreamIterator({self.kind}, process {self.process_index} of {self.process_count})"


# ---------------------------------------------------------------------------------------------
# checkpointing with Orbax: the same files as grain's handler, restored from any process count

_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _state_file(directory, process_index: int, process_count: int):
  """The file to restore this process from: its own if the checkpoint was written on the same
  number of processes, else process 0's of the count that wrote it."""
  own = directory / f"process_{process_index}-of-{process_count}.json"
  if own.exists():
    return own
  counts = {int(m.group(2)) for f in directory.iterdir() if (m := _STATE_FILE.fullmatch(f.name))}
  if len(counts) != 1:
    raise ValueError(f"{directory} holds data states of {sorted(counts) or 'no'} process counts; "
                     "expected the files process_<i>-of-<P>.json of one P")
  return directory / f"process_0-of-{counts.pop()}.json"


class DataCheckpointHandler(grain.checkpoint.CheckpointHandler):
  """grain's Orbax handler, except that restore reads a state written on another process count
  (the iterator's set_state decides whether it can continue it)."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    if not isinstance(item, StreamIterator):  # another iterator (SFT, post-training): grain's way
      return super().restore(directory, item)
    index, count = jax.process_index(), jax.process_count()  # the names grain's handler wrote
    path = _state_file(directory, index, count)
    state = json.loads(path.read_text())
    match = _STATE_FILE.fullmatch(path.name)
    if "grain" not in state:  # a bare grain state: record the process count its file names
      state = {"stream": PER_PROCESS, "process_count": int(match.group(2)), "batches": None,
               "reshard_at": None, "grain": state}
    item.set_state(state)
    item.start_prefetch()
    return item


try:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  @ocp.args.register_with_handler(DataCheckpointHandler, for_save=True)
  @dataclasses.dataclass
  class DataSave(ocp.args.CheckpointArgs):
    """Orbax args saving a data iterator: use in place of grain.checkpoint.CheckpointSave."""
    item: Any

  @ocp.args.register_with_handler(DataCheckpointHandler, for_restore=True)
  @dataclasses.dataclass
  class DataRestore(ocp.args.CheckpointArgs):
    """Orbax args restoring a data iterator written on any process count."""
    item: Any

except ImportError:  # orbax is a dependency of training only
  pass
