"""Mixture-of-experts MLP: a router picks `moe_experts_per_token` of `moe_num_experts` expert MLPs
per token and adds their outputs, weighted by its scores; `moe_shared_experts` more see every token.

Three parts, each replaceable on its own:
  route(logits [T, E], ...) -> Routing(weights [T, k], ids [T, k], probs [T, E])
      softmax top-k (Mixtral, Qwen3-MoE) or sigmoid scores whose top-k is picked with a learned
      bias added (DeepSeek-V3's auxiliary-loss-free balancing; the bias changes which experts are
      picked, never the weights), optionally limited to the best `moe_topk_groups` expert groups.
  dispatch: tokens [T, d], ids/weights [T, k], the experts' weights -> (out [T, d], dropped [])
      `dropless` (default): the T*k (token, expert) assignments sorted by expert and run as grouped
      matmuls (jax.lax.ragged_dot), nothing dropped. `capacity`: each expert takes at most
      ceil(factor * T * k / E) assignments, first choices before second ones, the rest dropped
      (counted; a dropped assignment adds nothing, the others keep their weights). `reference`:
      every expert on every token, combined with the routing weights (the tests' oracle). The
      expert-parallel dispatch (jaxlm/parallel/experts.py: experts split over the `expert` mesh
      axis, all-to-all in shard_map) runs the same grouped matmul per device.
  MoE: the nnx module holding router and expert weights (logical axis `experts` on the expert
      dimension) that routes, dispatches and reports its router statistics.

Statistics (per layer: load-balancing loss, router z-loss, tokens per expert, dropped assignments)
leave the model through `collect_stats()` (below), so the model's outputs stay what they are. A
layer returns them as sums (router_sums), which add up over micro-batches; finish_stats makes the
losses once a whole batch's sums are in.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.compute import Compute
from jaxlm.models.layers import MLP, param
from jaxlm.parallel import experts as expert_parallel


class RouterBias(nnx.Param):
  """DeepSeek-V3's expert bias [experts]: added to the sigmoid scores when picking the top-k only,
  so it gets no gradient. The train step moves it toward balanced load instead
  (`update_router_bias`); its `_bias` name keeps weight decay off it."""


class Routing(NamedTuple):
  weights: jax.Array  # [T, k] float32: what each chosen expert's output is multiplied by
  ids: jax.Array  # [T, k] int32: the chosen experts, best first
  probs: jax.Array  # [T, E] float32: scores normalized per token (load-balancing loss)


class Experts(NamedTuple):
  """The routed experts' weights: up, gate [E, d, f] (gate None for gelu), down [E, f, d]."""
  up: jax.Array
  gate: jax.Array | None
  down: jax.Array


def route(logits, k: int, kind: str = "softmax", bias=None, groups: int = 0, topk_groups: int = 0,
          norm_topk: bool = True, scale: float = 1.0) -> Routing:
  """logits: [T, E] float32 -> Routing.

  softmax: probabilities softmax(logits), the top-k picked by them. sigmoid: scores
  sigmoid(logits), picked by scores + bias (bias [E] or None). norm_topk: the k weights are divided
  by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3); scale multiplies them after (DeepSeek-V3's
  routed_scaling_factor). groups > 0: experts form `groups` equal groups, a group scores the sum of
  its best two selection scores (DeepSeek-V3), and only the best `topk_groups` groups are eligible.
  Ties go to the lower expert id (lax.top_k)."""
  t, e = logits.shape
  scores = jax.nn.softmax(logits, -1) if kind == "softmax" else jax.nn.sigmoid(logits)
  select = scores if bias is None else scores + bias.astype(scores.dtype)
  select = jax.lax.stop_gradient(select)
  if groups:
    per = select.reshape(t, groups, e // groups)
    group_score = jax.lax.top_k(per, min(2, e // groups))[0].sum(-1)  # [T, groups]
    _, best = jax.lax.top_k(group_score, topk_groups)  # [T, topk_groups]
    allowed = jnp.zeros((t, groups), bool).at[jnp.arange(t)[:, None], best].set(True)
    allowed = jnp.repeat(allowed, e // groups, axis=1)  # [T, E]
    select = jnp.where(allowed, select, -jnp.inf)
  _, ids = jax.lax.top_k(select, k)  # [T, k]
  weights = jnp.take_along_axis(scores, ids, -1)
  if norm_topk:
    weights = weights / (weights.sum(-1, keepdims=True) + (1e-20 if kind == "sigmoid" else 0.0))
  probs = scores if kind == "softmax" else scores / scores.sum(-1, keepdims=True)
  return Routing(weights * scale, ids.astype(jnp.int32), probs)


def _activate(kind: str, up, gate):
  if kind == "gelu":
    return jax.nn.gelu(up)
  return (jax.nn.silu if kind == "swiglu" else jax.nn.gelu)(gate) * up


def reference(x, ids, weights, experts: Experts, kind: str, compute: Compute = Compute()):
  """Every expert on every token, then the top-k combined: x [T, d] -> ([T, d], dropped 0).
  E times the routed FLOPs: the oracle the dispatches are tested against."""
  mm, f32 = compute.matmul, jnp.float32
  e = experts.up.shape[0]
  xm = x.astype(mm)
  up = jnp.einsum("td,edf->etf", xm, experts.up.astype(mm), preferred_element_type=f32)
  gate = None if experts.gate is None else jnp.einsum(
      "td,edf->etf", xm, experts.gate.astype(mm), preferred_element_type=f32)
  h = _activate(kind, up, gate).astype(mm)
  y = jnp.einsum("etf,efd->etd", h, experts.down.astype(mm), preferred_element_type=f32)
  combine = jnp.zeros((x.shape[0], e), f32).at[jnp.arange(x.shape[0])[:, None], ids].add(weights)
  out = jnp.einsum("te,etd->td", combine, y)
  return out.astype(x.dtype), jnp.zeros((), f32)


def _ragged_ffn(xs, group_sizes, experts: Experts, kind: str, compute: Compute):
  """xs: [N, d] rows sorted by expert, group_sizes: [E] -> [N, d] float32 (jax.lax.ragged_dot)."""
  mm, f32 = compute.matmul, jnp.float32
  xs = xs.astype(mm)
  up = jax.lax.ragged_dot(xs, experts.up.astype(mm), group_sizes, preferred_element_type=f32)
  gate = None if experts.gate is None else jax.lax.ragged_dot(
      xs, experts.gate.astype(mm), group_sizes, preferred_element_type=f32)
  h = _activate(kind, up, gate).astype(mm)
  return jax.lax.ragged_dot(h, experts.down.astype(mm), group_sizes, preferred_element_type=f32)


def _blocks_ffn(xs, block_expert, experts: Experts, kind: str, compute: Compute):
  """xs: [blocks, B, d], every block's rows for one expert (block_expert [blocks]) -> [blocks, B, d]
  float32: one batched matmul, each block with its expert's weights gathered."""
  mm, f32 = compute.matmul, jnp.float32
  xs = xs.astype(mm)
  w = lambda a: a.astype(mm)[block_expert]  # [blocks, in, out]
  up = jnp.einsum("bnd,bdf->bnf", xs, w(experts.up), preferred_element_type=f32)
  gate = None if experts.gate is None else jnp.einsum(
      "bnd,bdf->bnf", xs, w(experts.gate), preferred_element_type=f32)
  h = _activate(kind, up, gate).astype(mm)
  return jnp.einsum("bnf,bfd->bnd", h, w(experts.down), preferred_element_type=f32)


def block_rows(num_assignments: int, num_experts: int) -> int:
  """Rows per block of the `blocks` grouped matmul: about half an expert's mean share (padding
  costs under one block per expert: ~E/2 blocks, a quarter of the work on average), a multiple of 8."""
  return max(8, -(-num_assignments // (2 * num_experts) // 8) * 8)


def grouped_ffn(x, src, row_expert, experts: Experts, kind: str, compute: Compute = Compute()):
  """Rows x[src] (src: [N] indices into x [T, d]), row i through expert row_expert[i] (int [N]) ->
  [N, d] float32 in row order. row_expert == E (no expert) marks a padding row: it gives zeros and
  costs no group (the expert-parallel receive buffers have such rows).

  The rows are sorted by expert (stable: rows keep their order inside a group) and run as grouped
  matmuls, by compute.moe_grouped_matmul: "ragged" (jax.lax.ragged_dot over the sorted rows; native
  on GPU/TPU, while XLA:CPU computes every group over all rows, E times the work) or "blocks" (each
  group padded to whole blocks of block_rows() rows, at most N/B + E blocks, run as one batched
  matmul with each block's expert weights gathered). Results are gathered back to row order (no
  scatter-add)."""
  n = src.shape[0]
  e = experts.up.shape[0]
  order = jnp.argsort(row_expert, stable=True)  # [N] rows grouped by expert, padding last
  sizes = jnp.bincount(row_expert, length=e).astype(jnp.int32)  # [E]; padding rows not counted
  if compute.moe_grouped_matmul == "ragged":
    y = _ragged_ffn(x[src[order]], sizes, experts, kind, compute)  # [N, d]
    row_of = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))  # [N]
  else:
    b = block_rows(n, e)
    blocks = -(-n // b) + e  # sum_e ceil(size_e / b) never exceeds this
    padded = (sizes + b - 1) // b * b
    pad_start, start = jnp.cumsum(padded) - padded, jnp.cumsum(sizes) - sizes  # [E] each
    block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(blocks) * b,
                                                side="right"), e - 1)  # [blocks]
    row_expert_b = jnp.repeat(block_expert, b)  # [blocks * B]
    offset = jnp.arange(blocks * b) - pad_start[row_expert_b]
    valid = offset < sizes[row_expert_b]  # padding rows and unused blocks: False
    held = order[jnp.clip(start[row_expert_b] + offset, 0, n - 1)]  # the row each block row holds
    xs = jnp.where(valid[:, None], x[src[held]], 0).reshape(blocks, b, -1)
    y = _blocks_ffn(xs, block_expert, experts, kind, compute).reshape(blocks * b, -1)
    sorted_expert = jnp.minimum(row_expert[order], e - 1)
    rows = pad_start[sorted_expert] + jnp.arange(n) - start[sorted_expert]  # [N] by sorted position
    row_of = jnp.zeros_like(order).at[order].set(jnp.clip(rows, 0, blocks * b - 1))
  y = y[row_of]  # back in row order: a gather, no scatter-add
  return jnp.where((row_expert < e)[:, None], y, 0.0)


def dropless(x, ids, weights, experts: Experts, kind: str, compute: Compute = Compute()):
  """x: [T, d], ids/weights: [T, k] -> (out [T, d], dropped 0). Exact: no assignment is dropped.

  The T*k assignments run through their experts by grouped_ffn (sorted by expert, grouped
  matmuls) and are summed over k with the weights."""
  t, k = ids.shape
  n = t * k
  src = jnp.arange(n, dtype=jnp.int32) // k  # assignment a = token a // k, choice a % k
  y = grouped_ffn(x, src, ids.reshape(-1), experts, kind, compute).reshape(t, k, -1)
  out = jnp.einsum("tkd,tk->td", y, weights)
  return out.astype(x.dtype), jnp.zeros((), jnp.float32)


def capacity(x, ids, weights, experts: Experts, kind: str, compute: Compute = Compute(),
             factor: float = 1.25):
  """x: [T, d], ids/weights: [T, k] -> (out [T, d], dropped assignments []).

  Expert e takes at most C = ceil(factor * T * k / E) assignments: all first choices (in token
  order) before any second choice, and so on. The others are dropped: they add nothing and the
  token's other weights are not renormalized. Experts run as one batched matmul over [E, C, d]."""
  t, k = ids.shape
  e = experts.up.shape[0]
  cap = max(1, math.ceil(factor * t * k / e))
  mm, f32 = compute.matmul, jnp.float32
  by_rank = ids.T.reshape(-1)  # [k*T]: priority order, choice-major
  onehot = jax.nn.one_hot(by_rank, e, dtype=jnp.int32)  # [k*T, E]
  slot = jnp.sum((jnp.cumsum(onehot, 0) - 1) * onehot, -1)  # [k*T] position in its expert's queue
  kept = slot < cap
  dest = jnp.where(kept, by_rank * cap + slot, e * cap)  # row of the buffer; e*cap: the bin
  token = jnp.tile(jnp.arange(t), k)  # [k*T]
  buf = jnp.zeros((e * cap + 1, x.shape[1]), mm).at[dest].set(x[token].astype(mm))
  buf = buf[:-1].reshape(e, cap, -1)  # [E, C, d]
  up = jnp.einsum("ecd,edf->ecf", buf, experts.up.astype(mm), preferred_element_type=f32)
  gate = None if experts.gate is None else jnp.einsum(
      "ecd,edf->ecf", buf, experts.gate.astype(mm), preferred_element_type=f32)
  h = _activate(kind, up, gate).astype(mm)
  y = jnp.einsum("ecf,efd->ecd", h, experts.down.astype(mm), preferred_element_type=f32)
  y = jnp.concatenate([y.reshape(e * cap, -1), jnp.zeros((1, y.shape[-1]), f32)])[dest]  # [k*T, d]
  w = (weights.T.reshape(-1) * kept)[:, None]
  out = (y * w).reshape(k, t, -1).sum(0)
  return out.astype(x.dtype), jnp.sum(~kept).astype(f32)


DISPATCHES = {"dropless": dropless, "capacity": capacity, "reference": reference}


def router_sums(logits, routing: Routing, num_experts: int) -> dict:
  """One layer's router statistics over its T tokens as sums, which add up exactly over token
  shards and pipeline micro-batches: load [E] (assignments per expert), probs [E] (normalized scores
  summed over tokens), z (logsumexp(logits)^2 summed), tokens (T). finish_stats turns them into the
  losses."""
  load = jnp.bincount(routing.ids.reshape(-1), length=num_experts).astype(jnp.float32)
  return {"load": load, "probs": routing.probs.sum(0),
          "z": jnp.sum(jnp.square(jax.nn.logsumexp(logits, -1))),
          "tokens": jnp.asarray(logits.shape[0], jnp.float32)}


def finish_stats(sums: dict) -> dict:
  """router_sums (leaves [..., E] / [...], e.g. one row per layer) -> {"balance", "z", "load", and
  whatever else they carry ("dropped")}: balance = E * sum_e f_e P_e (f_e: share of the T*k
  assignments expert e got, P_e: its mean normalized score; 1 when perfectly balanced, E when one
  expert takes all), z = mean logsumexp(logits)^2 (ST-MoE)."""
  load, tokens = sums["load"], sums["tokens"]
  share = load / load.sum(-1, keepdims=True)
  balance = load.shape[-1] * jnp.sum(share * sums["probs"] / tokens[..., None], -1)
  rest = {k: v for k, v in sums.items() if k not in ("probs", "z", "tokens")}
  return {**rest, "balance": balance, "z": sums["z"] / tokens}


def router_stats(logits, routing: Routing, num_experts: int) -> dict:
  """One layer's router terms over its T tokens: {"balance", "z", "load" [E]} (see finish_stats)."""
  return finish_stats(router_sums(logits, routing, num_experts))


class MoE(nnx.Module):
  """The MoE MLP of one layer: x [batch, length, embed] -> (out [batch, length, embed], stats).

  Parameters: router [embed, experts] (float32 math), router_bias [experts] (sigmoid router),
  up/gate [experts, embed, mlp], down [experts, mlp, embed], and `shared`, a plain MLP of width
  moe_shared_experts * moe_mlp_dim that every token passes through (DeepSeek, Qwen2-MoE).
  stats: router_sums plus "dropped" [] (finish_stats makes the losses of them, once every token
  shard and micro-batch has added its sums).

  With an expert mesh axis > 1 (the rules map `experts` to mesh axes of more than one device) the
  dropless dispatch runs expert-parallel (jaxlm/parallel/experts.py); capacity dispatch stays in
  the global view (XLA partitions it: the same numbers, without the all-to-all plan).
  """

  def __init__(self, cfg, compute: Compute, rngs: nnx.Rngs, out_std: float):
    self.compute, self.kind = compute, cfg.mlp_kind
    self.router_kind, self.k = cfg.moe_router, cfg.moe_experts_per_token
    self.groups, self.topk_groups = cfg.moe_groups, cfg.moe_topk_groups
    self.norm_topk, self.scale = cfg.moe_norm_topk, cfg.moe_routed_scale
    self.capacity_factor = cfg.moe_capacity_factor
    self.exchange_factor = cfg.moe_exchange_factor
    e, d, p = cfg.moe_num_experts, cfg.d_model, compute.params
    f = cfg.moe_mlp_dim or cfg.mlp_dim
    self.num_experts = e
    self.router = param(rngs, (d, e), ("embed", None), cfg.init_std, jnp.float32)
    if self.router_kind == "sigmoid":
      self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,))
    self.up = param(rngs, (e, d, f), ("experts", "embed", "mlp"), cfg.init_std, p)
    if self.kind != "gelu":
      self.gate = param(rngs, (e, d, f), ("experts", "embed", "mlp"), cfg.init_std, p)
    self.down = param(rngs, (e, f, d), ("experts", "mlp", "embed"), out_std, p)
    if cfg.moe_shared_experts:
      self.shared = MLP(cfg, compute, rngs, out_std, mlp_dim=cfg.moe_shared_experts * f)

  def experts(self) -> Experts:
    return Experts(self.up[...], self.gate[...] if self.kind != "gelu" else None, self.down[...])

  def routing(self, x):
    """x: [T, embed] -> (router logits [T, E] float32, Routing)."""
    logits = jnp.matmul(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
    bias = self.router_bias[...] if self.router_kind == "sigmoid" else None
    return logits, route(logits, self.k, self.router_kind, bias, self.groups, self.topk_groups,
                         self.norm_topk, self.scale)

  def __call__(self, x, dispatch: str | None = None):
    """dispatch: "dropless" | "capacity" | "reference"; default by moe_capacity_factor."""
    b, t, d = x.shape
    tokens = x.reshape(b * t, d)
    logits, r = self.routing(tokens)
    if dispatch is None:
      dispatch = "capacity" if self.capacity_factor else "dropless"
    if dispatch == "dropless" and expert_parallel.expert_shards() > 1:
      ffn = functools.partial(grouped_ffn, kind=self.kind, compute=self.compute)
      out, dropped = expert_parallel.sharded_dispatch(
          x, r.ids.reshape(b, t, -1), r.weights.reshape(b, t, -1), self.experts(), ffn,
          self.exchange_factor)
    else:
      extra = {"factor": self.capacity_factor} if dispatch == "capacity" else {}
      out, dropped = DISPATCHES[dispatch](tokens, r.ids, r.weights, self.experts(), self.kind,
                                          self.compute, **extra)
      out = out.reshape(b, t, d)
    if getattr(self, "shared", None) is not None:
      out = out + self.shared(x)
    return out, {**router_sums(logits, r, self.num_experts), "dropped": dropped}


# --- Statistics out of the model --------------------------------------------------------------

_SINKS = threading.local()


@contextlib.contextmanager
def collect_stats():
  """Within this block, each forward pass of a model with MoE layers adds its per-layer router
  statistics to the yielded dict: {"balance", "z", "dropped": [moe layers], "load": [moe layers,
  experts]}, MoE layers in depth order (two passes add up). A pass outside any such block computes
  them for nobody (XLA drops them). Open it inside the traced function that uses the values."""
  stack = _SINKS.__dict__.setdefault("stack", [])
  sink: dict = {}
  stack.append(sink)
  try:
    yield sink
  finally:
    stack.pop()


def report(stats: dict) -> None:
  """Adds one forward pass's MoE statistics to the innermost collect_stats() block, if any."""
  stack = getattr(_SINKS, "stack", None)
  if stack:
    sink = stack[-1]
    for name, value in stats.items():
      sink[name] = sink[name] + value if name in sink else value


def load_metrics(load, dropped) -> dict:
  """Scalar metrics of summed loads [moe layers, experts] and dropped assignments [moe layers]:
  per layer the busiest expert's tokens, its and the idlest one's over the mean, the dropped
  fraction; overall the worst layer's max/mean, the dropped fraction and mean tokens per expert.
  moe/layer{i} is the i-th MoE layer in depth order (layer i + moe_first_dense_layers when every
  layer after the dense ones is MoE), not the model's layer index."""
  mean = load.mean(-1)  # [layers]
  max_over_mean = load.max(-1) / jnp.maximum(mean, 1e-9)
  dropped_frac = dropped / jnp.maximum(load.sum(-1), 1e-9)
  out = {"moe/max_over_mean": max_over_mean.max(), "moe/tokens_per_expert": mean.mean(),
         "moe/dropped": dropped.sum() / jnp.maximum(load.sum(), 1e-9)}
  for i in range(load.shape[0]):
    out[f"moe/layer{i}/max_over_mean"] = max_over_mean[i]
    out[f"moe/layer{i}/min_over_mean"] = load[i].min() / jnp.maximum(mean[i], 1e-9)
    out[f"moe/layer{i}/max_tokens"] = load[i].max()
    out[f"moe/layer{i}/dropped"] = dropped_frac[i]
  return out


EXPERT_LOAD = "moe/expert_load"  # a train step's metric: its tokens per expert [moe layers, experts]


def window_load_metrics(load) -> dict:
  """max/mean tokens per expert of the load [moe layers, experts] summed over a log window: per
  layer moe/layer{i}/window_max_over_mean, and the worst layer's moe/window_max_over_mean. One
  batch's load is noisy (a few thousand tokens, neighbouring tokens routed alike); the window's
  shows the balance the router holds, as the window's tokens/s shows the speed."""
  ratio = load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)  # [layers]
  out = {"moe/window_max_over_mean": ratio.max()}
  out.update({f"moe/layer{i}/window_max_over_mean": ratio[i] for i in range(load.shape[0])})
  return out


def update_router_bias(params, load, rate: float):
  """DeepSeek-V3's auxiliary-loss-free balancing, outside the gradient: each MoE layer's
  router_bias += rate * sign(mean load - load), so overloaded experts get picked less.
  params: the model's parameter state; load: [moe layers, experts] in depth order. Stacked MoE
  layers hold router_bias [moe layers, experts]; unstacked ones [experts] under their index."""
  delta = rate * jnp.sign(load.mean(-1, keepdims=True) - load)  # [moe layers, experts]

  def step(path, leaf):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if "router_bias" not in keys:
      return leaf
    if leaf.ndim == 2:
      return leaf + delta.astype(leaf.dtype)
    index = [key for key in keys if isinstance(key, int)][0]
    return leaf + delta[index].astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(step, params)
