"""Optimizer state in host memory (compute.offload_optimizer): where it lives and how a step updates it.

The state's array leaves carry JAX memory kind "pinned_host" in their shardings (`host_shardings`),
so between steps HBM holds none of Adam's moments. `offloaded_update` is the step's optimizer
update for such a state: gradient clipping on device over the whole gradient (it needs the global
norm), then the elementwise AdamW part in two passes:

  * the parameters outside the layer stack (embeddings, final norm): their moments are copied to
    the device, updated, and copied back, at once;
  * the stacked layers (every leaf [layers, ...] under `blocks` with compute.scan_layers): a
    lax.scan over the layer axis, so each iteration brings one layer's moments to the device,
    updates them and writes them back; HBM holds one layer's moments at a time.

Each pass calls the same optax transformation on a tree whose other pass's leaves are cut to
empty arrays ([:0], no work), so the arithmetic is the optimizer's own, leaf for leaf. Its scalar
state (Adam's step count) is the same in every call and is taken from the first pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

HOST = "pinned_host"


def host_shardings(shapes, shardings):
  """shardings with memory kind pinned_host for every array leaf of rank >= 1 (the moments); the
  scalars (step counts) stay in device memory, where every pass reads them."""
  return jax.tree.map(lambda s, sh: sh.with_memory_kind(HOST) if len(s.shape) else sh, shapes, shardings)


def stacked_mask(params, scan_layers: bool):
  """params-shaped bools: True for leaves of the layer stack (leading axis = layer)."""
  def stacked(path, _):
    first = path[0]
    return scan_layers and getattr(first, "key", None) == "blocks"
  return jax.tree_util.tree_map_with_path(stacked, params)


def _to(space, tree):
  return jax.tree.map(lambda x: jax.device_put(x, space) if x.ndim else x, tree)


def offloaded_update(parts, grads, opt_state, params, stacked, finite=None):
  """(updates, new opt_state) of optax.chain(*parts) for an opt_state whose moments live in host
  memory; parts = (clip_by_global_norm, adamw) or (adamw,) as jaxlm.train.optimizer builds them.

  finite: a traced bool, or None. When False the moments are left as they were (the step guard,
  train.skip_nonfinite: decided before the update, from the gradient, the metrics and the learning
  rate, since the moments go back to host memory layer by layer)."""
  *clip, adam = parts
  new_states = []
  if clip:
    grads, clip_state = clip[0].update(grads, opt_state[0], params)
    new_states.append(clip_state)
  state = opt_state[-1]
  kinds = optax.tree_map_params(adam, lambda _, s: "S" if s else "R", state, stacked,
                                transform_non_params=lambda _: "N")
  kind_leaves, treedef = jax.tree.flatten(kinds)
  state_leaves = treedef.flatten_up_to(state)
  flags, ptree = jax.tree.flatten(stacked)
  g_leaves, p_leaves = ptree.flatten_up_to(grads), ptree.flatten_up_to(params)

  def cut(leaves, keep):  # leaves of the other pass become empty arrays
    return [x if k else x[:0] for x, k in zip(leaves, keep)]

  def call(g, s, p):
    updates, new = adam.update(ptree.unflatten(g), treedef.unflatten(s), ptree.unflatten(p))
    return ptree.flatten_up_to(updates), treedef.flatten_up_to(new)

  def keep_old(new, old):
    return new if finite is None else [jnp.where(finite, n, o) for n, o in zip(new, old)]

  # Pass 1: everything outside the layer stack, on device at once.
  rest = [not f for f in flags]
  s_rest = [x if k == "N" else jax.device_put(x if k == "R" else x[:0], jax.memory.Space.Device)
            for x, k in zip(state_leaves, kind_leaves)]
  u_rest, new_rest = call(cut(g_leaves, rest), s_rest, cut(p_leaves, rest))
  new_rest = keep_old(new_rest, s_rest)

  # Pass 2: the layer stack, one layer per scan iteration.
  s_idx = [i for i, k in enumerate(kind_leaves) if k == "S"]
  f_idx = [i for i, f in enumerate(flags) if f]
  if f_idx:
    def body(_, xs):
      g_i, p_i, s_i = xs
      g = [x[:0] for x in g_leaves]
      p = [x[:0] for x in p_leaves]
      for j, i in enumerate(f_idx):
        g[i], p[i] = g_i[j], p_i[j]
      s = [x if k == "N" else x[:0] for x, k in zip(s_rest, kind_leaves)]
      old = [jax.device_put(x, jax.memory.Space.Device) for x in s_i]
      for j, i in enumerate(s_idx):
        s[i] = old[j]
      u, new = call(g, s, p)
      new = keep_old([new[i] for i in s_idx], old)
      return None, ([u[i] for i in f_idx], [jax.device_put(x, jax.memory.Space.Host) for x in new])

    xs = ([g_leaves[i] for i in f_idx], [p_leaves[i] for i in f_idx], [state_leaves[i] for i in s_idx])
    _, (u_stack, s_stack) = jax.lax.scan(body, None, xs)
  updates = list(u_rest)
  for j, i in enumerate(f_idx):
    updates[i] = u_stack[j]
  new_state = [n if k == "N" else jax.device_put(n, jax.memory.Space.Host) for n, k in zip(new_rest, kind_leaves)]
  for j, i in enumerate(s_idx):
    new_state[i] = s_stack[j]
  new_states.append(treedef.unflatten(new_state))
  return ptree.unflatten(updates), tuple(new_states)
