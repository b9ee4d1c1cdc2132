"""Logical axis names and the rules table that maps them to mesh axes.

Model code names every parameter and activation dimension with a logical name (`batch`, `length`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`). Which mesh axis (if any) a
logical name is sharded over is decided in one place: the rules table active in `axis_rules(...)`.
With no rules active (one device) every name maps to None, i.e. replicated, and `constrain` is a
no-op, so the model runs unchanged on a laptop.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
from jax.sharding import PartitionSpec

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
_ACTIVE: contextvars.ContextVar[tuple[Rules, jax.sharding.Mesh] | None] = contextvars.ContextVar(
    "jaxlm_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Rules, mesh: jax.sharding.Mesh):
  """Activates a rules table (logical name -> mesh axis or axes) for `constrain` and `spec`."""
  token = _ACTIVE.set((tuple(rules), mesh))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def spec(logical: Sequence[str | None], rules: Rules | None = None) -> PartitionSpec:
  """PartitionSpec for a tuple of logical names under `rules` (default: the active table)."""
  if rules is None:
    active = _ACTIVE.get()
    rules = active[0] if active else ()
  table = dict(rules)
  return PartitionSpec(*(table.get(name) if name else None for name in logical))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding to its logical axes; a no-op when no rules are active."""
  active = _ACTIVE.get()
  if active is None:
    return x
  rules, mesh = active
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec(logical, rules)))
