"""Logical axis names and the rules table that maps them to mesh axes.

Model code names every parameter and activation dimension with a logical name (`batch`, `length`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`, `experts`, ...). Which mesh axes
(if any) a logical name is sharded over is decided in one place: the rules table (`config.mesh.rules`, parsed
by `jaxlm.config.parse_rules`) active in `axis_rules(...)`. With no rules active (one device) every
name maps to None, i.e. replicated, and `constrain` is a no-op, so the model runs unchanged on a
laptop.

Two rules make one table serve parameters and activations alike:
  * within one array a mesh axis is used once, by the first dimension that asks for it: with
    "batch:data+fsdp, embed:fsdp", a parameter [vocab, embed] is sharded over fsdp along embed
    (ZeRO-3), while an activation [batch, length, embed] spends fsdp on batch and keeps embed whole;
  * given the array's shape, a dimension the mesh axes do not divide is replicated (e.g. a vocab of
    100 over tensor=8). Dimensions where that would silently waste the mesh (heads, kv_heads, layers,
    batch, length) are rejected up front by `jaxlm.parallel.mesh.resolve_mesh` instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxlm.config import LOGICAL_AXES  # noqa: F401  (re-exported: the names models may use)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
_ACTIVE: contextvars.ContextVar[tuple[Rules, jax.sharding.Mesh] | None] = contextvars.ContextVar(
    "jaxlm_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Rules, mesh: jax.sharding.Mesh):
  """Activates a rules table (logical name -> mesh axis or axes) for `constrain` and `partition_spec`."""
  token = _ACTIVE.set((tuple(rules), mesh))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def partition_spec(logical: Sequence[str | None], rules: Rules | None = None, shape: Sequence[int] | None = None,
         mesh: jax.sharding.Mesh | None = None) -> PartitionSpec:
  """PartitionSpec for a tuple of logical names under `rules` (default: the active table).

  A mesh axis already taken by an earlier dimension is skipped. With `mesh`, axes of size 1 are
  left out; with `shape` and `mesh`, a dimension whose size the product of its mesh axes does not
  divide is replicated.
  """
  if rules is None:
    active = _ACTIVE.get()
    rules, mesh = (active if active else ((), mesh))
  table = {name: (axes,) if isinstance(axes, str) else axes for name, axes in rules}
  used, out = set(), []
  for i, name in enumerate(logical):
    axes = tuple(a for a in (table.get(name) or ()) if a not in used)
    if mesh is not None:  # a size-1 axis splits nothing: leaving it out keeps programs as without it
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if axes and shape is not None and mesh is not None:
      if shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding to its logical axes; a no-op when no rules are active."""
  active = _ACTIVE.get()
  if active is None:
    return x
  rules, mesh = active
  sharding = jax.sharding.NamedSharding(mesh, partition_spec(logical, rules, x.shape, mesh))
  return jax.lax.with_sharding_constraint(x, sharding)


def shard_map(fn, in_logical, out_logical):
  """fn run per device (jax.shard_map) with specs from logical names; fn itself when no rules are active.

  in_logical: one tuple of logical names (or None: an argument that is None) per argument;
  out_logical: one tuple for the single output. For per-device programs such as Pallas kernels,
  which cannot be partitioned by XLA. Inside fn, `axis_position` tells a shard where it is.
  """
  active = _ACTIVE.get()
  if active is None:
    return fn
  rules, mesh = active
  in_specs = tuple(None if names is None else partition_spec(names, rules) for names in in_logical)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=partition_spec(out_logical, rules),
                       check_vma=False)


def active() -> tuple[Rules, jax.sharding.Mesh] | None:
  """(rules, mesh) of the innermost `axis_rules` block, or None outside any."""
  return _ACTIVE.get()


def mesh_axes(logical: str) -> tuple[str, ...]:
  """The mesh axes the active rules map `logical` to (() without active rules)."""
  active = _ACTIVE.get()
  if active is None:
    return ()
  axes = dict(active[0]).get(logical) or ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def axis_position(logical: str):
  """Inside `shard_map`: this shard's index along the mesh axes `logical` maps to (traced int32)."""
  index = jnp.zeros((), jnp.int32)
  for axis in mesh_axes(logical):
    index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
  return index
