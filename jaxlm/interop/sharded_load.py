"""jaxlm parameters built straight from Hugging Face tensors, each device's shard read on its own.

A `Layout` says how one HF tensor holds one jaxlm parameter, in the parameter's logical axis names:
q_proj.weight is [heads * head_dim, embed] in HF and [embed, heads, head_dim] in jaxlm, written
`(("heads", "head_dim"), "embed")`: the HF tensor's dimensions outermost first, a tuple for one HF
dimension that holds several jaxlm axes flattened row-major. The conversion is then a reshape
(splitting those dimensions) and a transpose, and an index into the jaxlm parameter maps to an index
into the HF tensor: that is what lets a device's shard be read as a slice of the file.

`read_param` builds one parameter as a jax.Array with the given sharding: for every addressable
device it reads the device's slice (of every tensor, for parameters that stack several HF tensors
along leading axes: layers, and experts, which HF keeps one tensor each), casts it to the
parameter's dtype and places it on the device before reading the
next, so host memory holds one shard beyond what is already placed, and a process of a
multi-process run reads only the slices of its own devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import numpy as np

from jaxlm.interop.safetensors_reader import Checkpoint

Dims = Sequence[str | Sequence[str]]  # HF dimensions in jaxlm logical axis names, see Layout
# The name a table gives a parameter's axis that has no logical name (out_sharding None: the
# router's experts axis, which stays whole).
UNNAMED = "unnamed"


@dataclasses.dataclass(frozen=True)
class Layout:
  """How an HF tensor lays out a jaxlm parameter (one layer's, for stacked layers).

  groups: per HF dimension, the jaxlm axes it holds (row-major, outermost first).
  axes, shape: the jaxlm parameter's logical axes and shape.
  """
  groups: tuple[tuple[str, ...], ...]
  axes: tuple[str, ...]
  shape: tuple[int, ...]

  @classmethod
  def of(cls, dims: Dims, axes: Sequence[str], shape: Sequence[int]) -> "Layout":
    groups = tuple((d,) if isinstance(d, str) else tuple(d) for d in dims)
    flat = [n for g in groups for n in g]
    if sorted(flat) != sorted(axes) or len(set(axes)) != len(axes):
      raise ValueError(f"HF dims {dims} do not name the parameter's axes {tuple(axes)} once each")
    return cls(groups, tuple(axes), tuple(shape))

  def size(self, name: str) -> int:
    return self.shape[self.axes.index(name)]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(self.size(n) for n in g) for g in self.groups)

  def _perm(self) -> tuple[int, ...]:  # jaxlm axis k = axis perm[k] of the split HF tensor
    flat = [n for g in self.groups for n in g]
    return tuple(flat.index(n) for n in self.axes)

  def from_hf(self, block: np.ndarray) -> np.ndarray:
    """An HF block (each dimension's first axis sliced, the rest whole) -> jaxlm axis order."""
    split = []
    for g, n in zip(self.groups, block.shape):
      inner = [self.size(a) for a in g[1:]]
      split += [n // math.prod(inner), *inner]
    return block.reshape(split).transpose(self._perm())

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    """The whole parameter -> the HF tensor."""
    return value.transpose(np.argsort(self._perm())).reshape(self.hf_shape)

  def hf_index(self, index: Sequence[tuple[int, int]]):
    """A jaxlm index ((start, stop) per axis) -> (the HF slices to read, the slices of
    from_hf(read block) that give it). An HF dimension holding several axes is read over the range
    of its first axis with the others whole (exact when only the first is split, as heads over
    tensor is; head_dim split too would read whole heads and cut them after)."""
    at = dict(zip(self.axes, index))
    hf, after = [], {}
    for g in self.groups:
      start, stop = at[g[0]]
      inner = math.prod(self.size(a) for a in g[1:])
      hf.append(slice(start * inner, stop * inner))
      after[g[0]] = slice(None)
      after.update({a: slice(*at[a]) for a in g[1:]})
    return tuple(hf), tuple(after[a] for a in self.axes)


def _bounds(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def read_param(checkpoint: Checkpoint, names: Sequence, layout: Layout, shape: Sequence[int],
               dtype, sharding: jax.sharding.Sharding,
               from_hf: Callable[[np.ndarray], np.ndarray] | None = None) -> jax.Array:
  """The parameter of `shape` ([*lead, *layout.shape]) held by HF tensor(s) `names`, as a
  jax.Array of `dtype` placed with `sharding`. names: nested lists of shape `lead` (one tensor per
  layer, or per layer and expert), or [name] for a parameter that is one tensor.

  from_hf: a function of one tensor's block (jaxlm axis order, after the cast), for weights HF
  stores under another formula or order; it must commute with slicing (elementwise, or acting
  along an axis it checks is whole).
  """
  lead = len(shape) - len(layout.shape)
  grid = np.array(names if lead else names[0], object)
  if grid.shape != tuple(shape[:lead]):
    raise ValueError(f"{grid.size} tensor names for a parameter of shape {tuple(shape)} "
                     f"({tuple(shape[:lead])} tensors of {layout.shape})")
  for name in grid.ravel():
    checkpoint.expect(name, layout.hf_shape)

  def block(name, index):  # one tensor's slice, in the parameter's dtype
    hf, after = layout.hf_index(index)
    value = layout.from_hf(checkpoint.read(name, hf))[after].astype(dtype)
    return from_hf(value) if from_hf is not None else value

  def shard(index):
    bounds = _bounds(index, shape)
    outer, rest = bounds[:lead], bounds[lead:]
    out = np.empty([b - a for a, b in bounds], dtype)
    for i in np.ndindex(*(b - a for a, b in outer)):
      out[i] = block(grid[tuple(a + j for (a, _), j in zip(outer, i))], rest)
    return out

  # Devices holding the same slice (replicated axes) share one read.
  devices = {}
  for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
    devices.setdefault(_bounds(index, shape), []).append((device, index))
  arrays = []
  for devs in devices.values():
    value = shard(devs[0][1])
    arrays += [jax.device_put(value, d) for d, _ in devs]
    del value  # placed: the next shard is read into freed memory
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)
