"""Expert parallelism: a MoE layer's experts split over the mesh axes the rules give the logical
`experts` dimension (mesh.expert by default), each token's assignments sent to the devices holding
their experts and the results sent back, by all-to-all.

Outside the MoE layers the expert axis is one more data-like axis (default rules: batch over
data+fsdp+expert): expert-parallel ranks hold different tokens, as in DeepSeek-V3 and MaxText.
Routing and its statistics stay in the global view (XLA partitions them; the statistics are sums
over all tokens, so they equal one device's). The dispatch runs per device in jax.shard_map, manual
over the axes that split the tokens (batch, length) and the expert axes; the others (tensor on the
experts' hidden dimension, stage) stay XLA's. On each device, with ep ranks of E / ep consecutive
experts each and T local tokens of k assignments (N = T * k):

  1. the N assignments, sorted by expert, are written to a send buffer [ep, N, d]: slice r holds
     those whose expert lives on rank r, in order, then zero padding;
  2. all_to_all: rank r receives every rank's slice r, [ep, N, d], and the local expert of each row
     (padding marked as expert E / ep, "none");
  3. the rows run through the local experts by jaxlm.models.moe.grouped_ffn, the grouped matmul of
     the single-device dropless dispatch (padding rows form no group);
  4. all_to_all back, and each assignment's result is read from the slot it was sent to and summed
     over the token's k choices with its routing weight.

Dropless needs a static bound: a rank may receive every assignment of every rank, so by default
each slice has room for all N of its sender's assignments, and the buffers hold ep x N rows (memory
and traffic ep times the filled rows). model.moe_exchange_factor f > 0 gives each slice room for
S = ceil(f * N / ep) rows instead (f * N in all, the filled share when routing is balanced): an
assignment past its destination's S is dropped (it adds nothing; first choices are sent before
second ones, in token order) and counted in moe/dropped, as in capacity mode but per device pair.
jax.lax.ragged_all_to_all would send only the filled rows without dropping, but XLA:CPU does not
implement it (jax 0.10.2: "UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by
XLA:CPU"), so it could not be tested here. all_to_all is linear, so the gradients travel back the same way; the
experts' fsdp shards (embed:fsdp) are all-gathered inside (their gradients reduce-scattered).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxlm.parallel.rules import active, mesh_axes, partition_spec

TOKENS = ("batch", "length", "embed")  # x: [batch, length, embed]
WEIGHTS = {"up": ("experts", "embed", "mlp"), "gate": ("experts", "embed", "mlp"),
           "down": ("experts", "mlp", "embed")}


def expert_shards() -> int:
  """Devices the active rules split the experts over (1 without rules, or without an expert axis)."""
  state = active()
  if state is None:
    return 1
  return math.prod(state[1].shape[a] for a in mesh_axes("experts"))


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _keep(spec: PartitionSpec, manual: set) -> PartitionSpec:
  """spec with only the manual mesh axes (a partly manual shard_map names no other)."""
  out = []
  for entry in spec:
    kept = tuple(a for a in _axes(entry) if a in manual)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return PartitionSpec(*out)


def exchange(x, ids, weights, experts, ffn: Callable, axes: tuple[str, ...], ranks: int,
             slots: int | None = None):
  """One device's part of the dispatch (inside shard_map): x [T, d], ids / weights [T, k] (global
  expert ids), experts: this rank's E / ranks experts (moe.Experts) -> (out [T, d], dropped []).
  ffn(rows [M, d], src [M], row_expert [M], experts) -> [M, d] float32: moe.grouped_ffn.
  slots: rows sent to each rank (S); None: N = T * k, room for every assignment (nothing dropped)."""
  t, k = ids.shape
  n, d = t * k, x.shape[-1]
  s = n if slots is None else min(slots, n)
  local = experts.up.shape[0]  # experts per rank
  flat = ids.reshape(-1)  # [N], assignment a = token a // k, choice a % k
  dest = flat // local  # [N] the rank holding each assignment's expert
  priority = (jnp.arange(n) % k) * t + jnp.arange(n) // k  # choice-major: first choices first
  order = jnp.argsort(dest * n + priority)  # [N] assignments by rank, by priority within one
  count = jnp.bincount(dest, length=ranks).astype(jnp.int32)  # [ranks]
  start = jnp.cumsum(count) - count
  slot = jnp.arange(s, dtype=jnp.int32)
  filled = slot[None, :] < count[:, None]  # [ranks, S]
  sent = order[jnp.clip(start[:, None] + slot[None, :], 0, n - 1)]  # [ranks, S] assignment per slot
  send_x = jnp.where(filled[..., None], x[sent // k], 0).astype(x.dtype)  # [ranks, S, d]
  rank_first = (jnp.arange(ranks, dtype=flat.dtype) * local)[:, None]
  send_e = jnp.where(filled, flat[sent] - rank_first, local)  # [ranks, S]; `local`: padding
  recv_x = jax.lax.all_to_all(send_x, axes, 0, 0)  # [ranks, S, d]: slice r from rank r
  recv_e = jax.lax.all_to_all(send_e, axes, 0, 0)
  rows = ranks * s
  y = ffn(recv_x.reshape(rows, d), jnp.arange(rows, dtype=jnp.int32), recv_e.reshape(rows), experts)
  back = jax.lax.all_to_all(y.reshape(ranks, s, d).astype(x.dtype), axes, 0, 0)  # [ranks, S, d]
  position = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))  # sorted index
  within = position - start[dest]  # [N] each assignment's slot at its destination
  kept = within < s
  mine = back[dest, jnp.minimum(within, s - 1)]  # [N, d] each assignment's result
  w = (weights.reshape(-1) * kept).reshape(t, k)
  out = jnp.einsum("tkd,tk->td", mine.reshape(t, k, d).astype(jnp.float32), w).astype(x.dtype)
  return out, jnp.sum(~kept).astype(jnp.float32)


def sharded_dispatch(x, ids, weights, experts, ffn: Callable, factor: float = 0.0):
  """The expert-parallel dispatch under the active rules: x [batch, length, embed],
  ids / weights [batch, length, k], experts: moe.Experts (whole arrays, split by the rules) ->
  (out [batch, length, embed], dropped assignments []). ffn: moe.grouped_ffn with the layer's kind
  and compute. factor: model.moe_exchange_factor (0: dropless; else S = ceil(factor * N / ranks))."""
  rules, mesh = active()
  ep_axes = tuple(a for a in mesh_axes("experts") if mesh.shape[a] > 1)  # as partition_spec keeps them
  ranks = math.prod(mesh.shape[a] for a in ep_axes)
  e = experts.up.shape[0]
  x_spec = partition_spec(TOKENS, rules, x.shape, mesh)
  manual = {a for entry in x_spec for a in _axes(entry)} | set(ep_axes)
  x_spec = _keep(x_spec, manual)
  row_spec = PartitionSpec(*x_spec[:2], None)
  names = [name for name in WEIGHTS if getattr(experts, name) is not None]
  w_specs = [_keep(partition_spec(WEIGHTS[name], rules, getattr(experts, name).shape, mesh), manual)
             for name in names]
  for name, spec in zip(names, w_specs):
    if _axes(spec[0]) != tuple(ep_axes):
      raise ValueError(f"the {e} experts of '{name}' are not split over {ep_axes} (rules give "
                       f"{spec}); model.moe_num_experts must divide by the expert axis")

  def per_device(x, ids, weights, *ws):
    whole = []
    for w, spec in zip(ws, w_specs):  # gather what other manual axes split (fsdp's embed shards)
      for dim, entry in enumerate(spec):
        gather = tuple(a for a in _axes(entry) if a not in ep_axes)
        if gather:
          w = jax.lax.all_gather(w, gather, axis=dim, tiled=True)
      whole.append(w)
    local = dict(zip(names, whole))
    local = type(experts)(local["up"], local.get("gate"), local["down"])
    b, t, d = x.shape
    n = b * t * ids.shape[-1]
    slots = math.ceil(factor * n / ranks) if factor else None
    out, dropped = exchange(x.reshape(b * t, d), ids.reshape(b * t, -1), weights.reshape(b * t, -1),
                            local, ffn, tuple(ep_axes), ranks, slots)
    token_axes = tuple(a for entry in x_spec[:2] for a in _axes(entry))  # the axes splitting tokens
    return out.reshape(b, t, d), jax.lax.psum(dropped, token_axes) if token_axes else dropped

  run = jax.shard_map(per_device, mesh=mesh, in_specs=(x_spec, row_spec, row_spec, *w_specs),
                      out_specs=(x_spec, PartitionSpec()), axis_names=frozenset(manual),
                      check_vma=False)
  return run(x, ids, weights, *(getattr(experts, name) for name in names))
