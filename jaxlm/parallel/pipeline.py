"""Pipeline parallelism: the layer stack split into stages over the mesh's `stage` axis (GPipe).

The stacked layer parameters [layers, ...] are viewed as [stages, layers / stages, ...]; with the
rule "layers:stage" each stage's slice already lives on its own devices. A step's rows are split
into m micro-batches. At iteration i (of m + p - 1), stage s runs its layers on micro-batch i - s:
every stage computes at once (a vmap over the stage dimension, which sharding over `stage` turns
into each device group running only its own stage), then the activations shift one stage down
(a roll along the stage dimension: a collective permute between neighbouring stage groups).

Schedule: GPipe, all forwards then (by autodiff of the scan) all backwards. Bubble, the fraction
of stage-iterations that do no useful work, is (p - 1) / (m + p - 1): 3/7 for p=4, m=4; 3/11 for
m=8. Those idle iterations still compute on padding here (a vmap cannot skip one stage), so the
bubble costs time, not correctness. Activation memory grows with m (autodiff keeps every
iteration's stage inputs); remat policies apply inside each layer as without pipelining.

Micro-batch j holds rows j, j + m, j + 2m, ... of the step's rows, so every micro-batch is spread
over all data-parallel shards instead of living on a few of them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm.parallel.rules import constrain


def pipeline_microbatches(compute_cfg, stages: int) -> int:
  """compute.pipeline_microbatches, or 2 x stages when it is 0."""
  return compute_cfg.pipeline_microbatches or 2 * stages


def bubble_fraction(stages: int, microbatches: int) -> float:
  """Idle share of the GPipe schedule: (p - 1) / (m + p - 1)."""
  return (stages - 1) / (microbatches + stages - 1)


def gpipe(stage_fn: Callable, stage_params, x, extras, microbatches: int, aux: bool = False):
  """Runs `stage_fn` stage after stage over `microbatches` micro-batches, stages in parallel.

  stage_fn(params, x, extras) -> x: one stage's layers on one micro-batch, where params are one
  stage's slice of `stage_params` (leaves [stages, ...]), x: [rows / m, length, embed] and extras
  the matching rows of `extras` (a pytree of per-row arrays such as positions and segment ids).
  x: [rows, length, embed]. Returns stage_fn^stages(x): [rows, length, embed].
  aux: stage_fn returns (x, a pytree of per-micro-batch sums, e.g. MoE router statistics), and
  gpipe returns (x, those sums added over the micro-batches, leaves [stages, ...]); the bubble's
  iterations, which run on padding, add nothing.
  """
  stages = jax.tree.leaves(stage_params)[0].shape[0]
  rows, m = x.shape[0], microbatches
  if rows % m:
    raise ValueError(f"{rows} rows do not split into {m} pipeline micro-batches")
  if not aux:
    x, _ = gpipe(lambda p, x, e: (stage_fn(p, x, e), ()), stage_params, x, extras, m, aux=True)
    return x

  def split(a):  # [rows, ...] -> [m, rows / m, ...]; micro-batch j = rows j, j + m, ...
    return a.reshape(rows // m, m, *a.shape[1:]).swapaxes(0, 1)

  xs, es = split(x), jax.tree.map(split, extras)
  stage_ids = jnp.arange(stages)
  first_stage = (stage_ids == 0).reshape(stages, *([1] * (x.ndim)))
  axes = ("stage", "batch", "length", "embed")

  def iteration(carry, i):
    state, outputs, sums = carry  # state: [stages, rows / m, length, embed], each stage's last output
    incoming = jnp.where(first_stage, xs[jnp.minimum(i, m - 1)][None], jnp.roll(state, 1, axis=0))
    incoming = constrain(incoming, axes)
    micro = jnp.clip(i - stage_ids, 0, m - 1)  # [stages]: the micro-batch each stage works on
    out, extra = jax.vmap(stage_fn)(stage_params, incoming, jax.tree.map(lambda a: a[micro], es))
    out = constrain(out, axes)
    real = (i - stage_ids >= 0) & (i - stage_ids < m)  # [stages]: not a bubble iteration
    sums = jax.tree.map(
        lambda s, a: s + jnp.where(real.reshape(stages, *([1] * (a.ndim - 1))), a, 0), sums, extra)
    # The last stage finished micro-batch i - (p - 1). Before that index exists (i < p - 1) this
    # writes padding into slot 0, which iteration p - 1 overwrites with the real micro-batch 0.
    done = jnp.maximum(i - (stages - 1), 0)
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, out[stages - 1], done, 0)
    return (out, outputs, sums), None

  state0 = jnp.zeros((stages, *xs.shape[1:]), x.dtype)
  extra_shape = jax.eval_shape(jax.vmap(stage_fn), stage_params, state0,
                               jax.tree.map(lambda a: a[jnp.zeros((stages,), jnp.int32)], es))[1]
  sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), extra_shape)
  (_, outputs, sums), _ = jax.lax.scan(iteration, (state0, jnp.zeros_like(xs), sums0),
                                       jnp.arange(m + stages - 1))
  return outputs.swapaxes(0, 1).reshape(x.shape), sums  # back to row order


def pipelined_forward(model, tokens, positions, segment_ids, slots, stages: int, microbatches: int,
                      head: bool = True):
  """The model's logits with its scanned layer stack run as `stages` pipeline stages.

  model: a jaxlm Transformer (compute.scan_layers; layers all dense or all MoE); tokens, positions,
  segment_ids, slots: [rows, length] (slots None: 0..length-1). Embedding and head run outside the
  schedule. MoE layers' router sums come out of the schedule added over the micro-batches, so the
  statistics reported to jaxlm.models.moe.collect_stats are those of the whole batch, as without
  stages.
  head=False: the final hidden state [rows, length, embed] instead (a chunked loss's input).
  """
  from jaxlm.models import moe  # noqa: PLC0415  (the models import this package's rules)
  if slots is None:
    slots = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  x = model.embed_tokens(tokens, positions)
  layers, run = model.layer_stack()  # block parameters and layer kinds, every leaf [layers, ...]
  # [stages, layers / stages, ...]: each stage gets its own layers' parameters and kinds
  staged = jax.tree.map(lambda a: a.reshape(stages, -1, *a.shape[1:]), layers)

  def stage_fn(p, x, rows):
    x, _, stats = run(p, x, rows)
    return x, stats

  x, stats = gpipe(stage_fn, staged, x, (positions, slots, segment_ids), microbatches, aux=True)
  if stats is not None:  # [stages, layers / stages, ...] -> [layers, ...], depth order
    moe.report(moe.finish_stats(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stats)))
  return model.head(x) if head else x
