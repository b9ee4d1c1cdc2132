"""NamedShardings for the train state and the batch, from the parameters' logical axis names.

Every nnx.Param carries its logical axes as `out_sharding` metadata (["layers"] is prepended for
scanned layers). Optax keeps the Param wrappers (and so the metadata) in its param-shaped state
(Adam's mu and nu), so one walk over any tree gives parameters, gradients-shaped optimizer state
and everything else (step counts, the RNG key: replicated) their shardings. With "embed:fsdp" in
the rules, that is ZeRO-3: parameters and optimizer state are split over fsdp, and the jitted step
all-gathers a layer's weights where they are used and reduce-scatters their gradients.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.parallel.rules import Rules, partition_spec

BATCH_LOGICAL = ("batch", "length")  # every batch feature is int32 [rows, seq_len]


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: jax.sharding.Mesh, rules: Rules):
  """A tree like `tree` (arrays or ShapeDtypeStructs) of NamedShardings.

  nnx.Variables with `out_sharding` metadata get the spec of their logical axes (dimensions the
  mesh does not divide replicated, see rules.partition_spec); every other leaf is replicated.
  """
  def one(x):
    if _is_variable(x):
      value = x.get_value()
      axes = x.get_metadata().get("out_sharding")
      logical = axes if axes else (None,) * value.ndim
      return x.replace(NamedSharding(mesh, partition_spec(logical, rules, value.shape, mesh)))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, tree, is_leaf=_is_variable)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
  """Rows over the data-like axes, positions over sequence (int32 [rows, seq_len])."""
  return NamedSharding(mesh, partition_spec(BATCH_LOGICAL, rules, mesh=mesh))


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop): the batch rows (dimension 0 of a global `shape`) this process's devices hold.

  The data pipelines give process p of P rows [p * B/P, (p+1) * B/P) of every global batch of B;
  make_array_from_process_local_data places a process's rows on the rows its devices hold, so the
  two must agree (`global_batch` checks, once per sharding and shape).
  """
  held = sharding.addressable_devices_indices_map(tuple(shape))
  starts = {idx[0].start or 0 for idx in held.values()}
  stops = {shape[0] if idx[0].stop is None else idx[0].stop for idx in held.values()}
  return min(starts), max(stops)


@functools.cache
def _check_process_rows(sharding: NamedSharding, local_shape: tuple[int, ...]) -> None:
  index, count = jax.process_index(), jax.process_count()
  rows = local_shape[0]
  shape = (rows * count, *local_shape[1:])
  start, stop = process_rows(sharding, shape)
  if (start, stop) != (index * rows, (index + 1) * rows):
    raise ValueError(
        f"process {index} of {count} holds batch rows [{start}, {stop}) of {shape[0]} under the batch "
        f"sharding {sharding.spec}, but the data pipelines give it rows [{index * rows}, "
        f"{(index + 1) * rows}); split the batch over the processes (mesh.dcn_data or mesh.data "
        "spanning them) so each process's devices hold one contiguous block of rows in process order")


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """This process's rows (numpy [rows / processes, seq_len]) -> global jax.Arrays [rows, seq_len]."""
  if jax.process_count() > 1:
    for v in local.values():
      _check_process_rows(sharding, tuple(v.shape))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
