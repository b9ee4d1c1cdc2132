"""The safetensors files of a Hugging Face model directory, read a slice at a time.

    checkpoint = Checkpoint("path/to/hf_dir")        # index and every header checked, no data read
    checkpoint.expect("model.norm.weight", (2048,))  # InteropError naming the tensor if it differs
    block = checkpoint.read("model.norm.weight", (slice(0, 256),))  # numpy, stored dtype

Why a file is opened per read: safetensors memory-maps a file, and every page a read touches stays
in the process's resident set until the file is closed. Kept open for a whole load, the mapped
checkpoint (its size again) would sit beside the parameters built from it; opened and closed around
each slice, only that slice's pages are mapped at a time. `get_slice(...)[index]` reads just the
pages the slice covers and copies them out, so a process reads only what its devices own.

Every header is read when the Checkpoint is made, so a missing shard, a corrupt or truncated file,
or a tensor the index promises but no file holds is reported before anything is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxlm.interop.errors import InteropError

# Stored dtypes a floating-point weight may come in (safetensors' names). numpy reads bfloat16
# through ml_dtypes; float8 and integer tensors are quantized weights, which jaxlm does not dequantize.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

# A read as (tensor name, ((start, stop) per dimension)); see Checkpoint(recorder=...).
Recorder = Callable[[str, tuple[tuple[int, int], ...]], None]


def _names(names: Sequence[str], limit: int = 6) -> str:
  shown = ", ".join(repr(n) for n in sorted(names)[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _weight_map(path: str) -> dict[str, str]:
  """Tensor name -> file name (inside `path`), from the index or the single model.safetensors."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        return dict(json.load(f)["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
      raise InteropError(f"{index} is not a safetensors index (JSON with a 'weight_map' of tensor "
                         f"-> file): {e}; download it again") from e
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    raise InteropError(f"no model.safetensors or model.safetensors.index.json in {path}: is it a "
                       "Hugging Face model directory saved with safe_serialization?")
  return {}  # every tensor of the single file, read from its header below


def _header(file: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """Tensor name -> (shape, safetensors dtype) from `file`'s header; no tensor data is read."""
  try:
    with safe_open(file, framework="numpy") as f:
      return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
              for name in f.keys()}
  except (SafetensorError, OSError) as e:
    raise InteropError(f"{file} is not a readable safetensors file ({e}): it is truncated or "
                       "corrupt; download it again") from e


class Checkpoint:
  """Which file holds each tensor of a Hugging Face directory, every tensor's shape and stored dtype
  (from the headers), and reads of slices of them.

  recorder: called as recorder(name, ((start, stop), ...)) for every slice read, e.g. to check
  that a process of a multi-process load reads only what its devices hold.
  """

  def __init__(self, path: str, recorder: Recorder | None = None):
    self.path, self.recorder = path, recorder
    weight_map = _weight_map(path)
    files = sorted(set(weight_map.values())) or ["model.safetensors"]
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
      file = missing[0]
      held = [n for n, f in weight_map.items() if f == file]
      raise InteropError(
          f"{os.path.join(path, file)} is missing: model.safetensors.index.json puts {len(held)} "
          f"tensors in it ({_names(held)}); download that file into {path}"
          + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    self.file, self.info = {}, {}  # name -> file path; name -> (shape, dtype)
    for file in files:
      for name, info in _header(os.path.join(path, file)).items():
        if weight_map.get(name, file) == file:  # the index decides which file holds a name
          self.file[name], self.info[name] = os.path.join(path, file), info
    promised = [n for n, f in weight_map.items() if n not in self.file]
    if promised:
      raise InteropError(f"model.safetensors.index.json in {path} names tensors that are not in "
                         f"the file it gives: {_names(promised)} ({weight_map[promised[0]]}); the "
                         "index and the shards disagree, download them again")

  def missing(self, names: Sequence[str]) -> list[str]:
    """The names in `names` no file of the checkpoint holds."""
    return [n for n in names if n not in self.file]

  def expect(self, name: str, shape: Sequence[int]) -> None:
    """InteropError unless tensor `name` exists, has `shape` and a floating-point dtype."""
    if name not in self.file:
      raise InteropError(f"tensor {name!r} is missing from the checkpoint in {self.path}; the "
                         "architecture config.json describes needs it")
    stored, dtype = self.info[name]
    if dtype not in FLOAT_DTYPES:
      raise InteropError(f"tensor {name!r} is stored as {dtype} in {self.file[name]}, not as a "
                         f"floating-point weight ({', '.join(FLOAT_DTYPES)}): quantized checkpoints "
                         "are not supported; load an unquantized (bf16, float16 or float32) one")
    if stored != tuple(shape):
      raise InteropError(f"tensor {name!r} has shape {list(stored)} in {self.file[name]}, but the "
                         f"config.json beside it implies {list(shape)}; the checkpoint and its "
                         "config.json disagree")

  def read(self, name: str, index: Sequence[slice]) -> np.ndarray:
    """tensor[index] in its stored dtype (contiguous slices, one per dimension), reading only the
    pages it covers; the file is mapped only for the duration of the read (see the module doc)."""
    if self.recorder is not None:
      shape = self.info[name][0]
      self.recorder(name, tuple(s.indices(n)[:2] for s, n in zip(index, shape)))
    with safe_open(self.file[name], framework="numpy") as f:
      return f.get_slice(name)[tuple(index)]
