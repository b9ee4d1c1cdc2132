"""Pipeline parallelism: the layer stack split into stages over the mesh's `stage` axis.

The stacked layer parameters [layers, ...] are viewed as [stages, layers / stages, ...]; with the
rule "layers:stage" each stage's slice already lives on its own devices. A step's rows are split
into m micro-batches. At iteration i (of m + p - 1), stage s runs its layers on micro-batch i - s:
every stage computes at once (a vmap over the stage dimension, which sharding over `stage` turns
into each device group running only its own stage), then the activations shift one stage down
(a roll along the stage dimension: a collective permute between neighbouring stage groups).

Two schedules (compute.pipeline_schedule):

  gpipe     all forwards then (by autodiff of the scan) all backwards. Bubble, the fraction of
            stage-iterations that do no useful work, is (p - 1) / (m + p - 1): 3/7 for p=4, m=4;
            3/11 for m=8. Autodiff keeps every iteration's layer activations, the bubble's
            padding included.
  circular  the layers cut into p x v chunks (v = compute.pipeline_repeats); stage s holds chunks
            s, s + p, ..., and every micro-batch goes round the ring v times, each pass through a
            stage running 1/v of its layers. Bubble 1 - v m / ((v - 1) max(m, p) + m + p - 1),
            which is (p - 1) / (v m + p - 1) for m >= p: 3/11 for p=4, m=4, v=2. Each iteration's
            stage computation is rematerialised (only its input is kept for the backward pass,
            see `_chunk_of_repeat`), so activation memory is one [rows / m, length, embed] per
            stage-iteration instead of every layer's insides, at the price of a second forward.

Idle iterations still compute on padding here (a vmap cannot skip one stage), so the bubble costs
time, not correctness. Layer remat policies apply inside each layer as without pipelining.

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


def schedule_length(stages: int, microbatches: int, repeats: int = 1) -> int:
  """Iterations of the scan: (v - 1) x max(m, p) + m + p - 1 (GPipe, v = 1: m + p - 1).

  Stage s works on its k-th task at iteration k + s, task k = r x max(m, p) + j being micro-batch
  j in repeat r; a micro-batch re-enters stage 0 no earlier than max(m, p) iterations after it
  entered the repeat before, so the last stage has finished it (m >= p: right on time)."""
  return (repeats - 1) * max(microbatches, stages) + microbatches + stages - 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Idle share of the schedule: 1 - v m / schedule_length. GPipe (v = 1): (p - 1) / (m + p - 1);
  circular with m >= p: (p - 1) / (v m + p - 1)."""
  return 1 - repeats * microbatches / schedule_length(stages, microbatches, repeats)


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


def _chunk_of_repeat(stage_fn: Callable) -> Callable:
  """f(params [repeats, ...], r, x, extras) = stage_fn(params[r], x, extras), rematerialised whole:
  the backward pass keeps only its inputs (the stage input x, r, the extras' rows) and recomputes
  the stage. Saving its insides instead (as GPipe does) would also save params[r] at every scan
  iteration: the layers' matmuls keep their weights for the backward pass, and unlike GPipe's fixed
  stage weights these change with r, so autodiff cannot hoist them out of the loop: a copy of the
  chunk's weights per iteration (seen in jax.linearize's residuals). Costs one more forward pass
  of the layers; layer remat policies still apply inside."""
  def run(params, r, x, extras):
    return stage_fn(jax.tree.map(lambda a: a[r], params), x, extras)
  return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)


def circular(stage_fn: Callable, chunk_params, x, extras, microbatches: int):
  """The circular (interleaved) schedule: every micro-batch goes round the stage ring `repeats` times.

  chunk_params: leaves [repeats, stages, ...]; [r, s] is chunk r x stages + s of the layer stack
  (sequential order: chunk 0, 1, ..., repeats x stages - 1), so stage s holds chunks s, s + p, ...
  stage_fn, x, extras and the result as in `gpipe`; with repeats = 1 this is GPipe's schedule.

  Stage s at iteration t works on task k = t - s (valid when 0 <= k, r = k // P < v and
  j = k % P < m, P = max(m, p)): micro-batch j in repeat r. Stage 0 takes micro-batch j fresh in
  repeat 0 and, in later repeats, the last stage's output for j from repeat r - 1, kept in `loop`
  (written at iteration (r - 1) P + j + p - 1 <= r P + j - 1, read at r P + j, rewritten no sooner).
  Bubble: 1 - v m / ((v - 1) P + m + p - 1), i.e. (p - 1) / (v m + p - 1) when m >= p.
  """
  leaf = jax.tree.leaves(chunk_params)[0]
  repeats, stages = leaf.shape[0], leaf.shape[1]
  rows, m = x.shape[0], microbatches
  if rows % m:
    raise ValueError(f"{rows} rows do not split into {m} pipeline micro-batches")
  period = max(m, stages)

  def split(a):  # [rows, ...] -> [m, rows / m, ...]; micro-batch j = rows j, j + m, ...
    return a.reshape(rows // m, m, *a.shape[1:]).swapaxes(0, 1)

  xs, es = split(x), jax.tree.map(split, extras)
  by_stage = jax.tree.map(lambda a: a.swapaxes(0, 1), chunk_params)  # [stages, repeats, ...]
  stage_ids = jnp.arange(stages)
  first_stage = (stage_ids == 0).reshape(stages, *([1] * (x.ndim)))
  axes = ("stage", "batch", "length", "embed")
  step = jax.vmap(_chunk_of_repeat(stage_fn))

  def iteration(carry, t):
    # state: [stages, rows / m, length, embed], each stage's last output; loop: [m + 1, rows / m,
    # length, embed], the last stage's latest output for each micro-batch (slot m: bubble output)
    state, loop = carry
    k = t - stage_ids  # [stages]: each stage's task
    r, j = k // period, k % period
    valid = (k >= 0) & (r < repeats) & (j < m)
    r, micro = jnp.clip(r, 0, repeats - 1), jnp.minimum(j, m - 1)
    fresh = jnp.where(r[0] == 0, xs[micro[0]], loop[micro[0]])
    incoming = constrain(jnp.where(first_stage, fresh[None], jnp.roll(state, 1, axis=0)), axes)
    out = constrain(step(by_stage, r, incoming, jax.tree.map(lambda a: a[micro], es)), axes)
    slot = jnp.where(valid[stages - 1], j[stages - 1], m)
    loop = jax.lax.dynamic_update_index_in_dim(loop, out[stages - 1], slot, 0)
    return (out, loop), None

  init = (jnp.zeros((stages, *xs.shape[1:]), x.dtype), jnp.zeros((m + 1, *xs.shape[1:]), x.dtype))
  (_, loop), _ = jax.lax.scan(iteration, init, jnp.arange(schedule_length(stages, m, repeats)))
  return loop[:m].swapaxes(0, 1).reshape(x.shape)  # back to row order


def pipelined_forward(model, tokens, positions, segment_ids, slots, stages: int, microbatches: int,
                      head: bool = True, schedule: str = "gpipe", repeats: int = 1):
  """The model's logits with its scanned layer stack run as `stages` pipeline stages.

  model: a jaxlm Transformer (compute.scan_layers; layers all dense or all MoE); tokens, positions,
  segment_ids, slots: [rows, length] (slots None: 0..length-1). schedule: "gpipe" or "circular"
  (with `repeats` chunks per stage; dense layers only). Embedding and head run outside the
  schedule. MoE layers' router sums come out of the GPipe schedule added over the micro-batches,
  so the statistics reported to jaxlm.models.moe.collect_stats are those of the whole batch, as
  without stages. head=False: the final hidden state [rows, length, embed] instead (a chunked
  loss's input).
  """
  from jaxlm.models import moe  # noqa: PLC0415  (the models import this package's rules)
  if slots is None:
    slots = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  x = model.embed_tokens(tokens, positions)
  layers, run = model.layer_stack()  # block parameters and layer kinds, every leaf [layers, ...]
  extras = (positions, slots, segment_ids)
  if schedule == "circular":
    # [repeats, stages, layers / (stages x repeats), ...]: [r, s] is chunk r x stages + s. The
    # stored stack is split over `stage` in contiguous blocks, so this view moves weights between
    # stage groups (XLA inserts the exchange; its gradient goes back the same way).
    chunks = jax.tree.map(lambda a: a.reshape(repeats, stages, -1, *a.shape[1:]), layers)
    x = circular(lambda p, x, rows: run(p, x, rows)[0], chunks, x, extras, microbatches)
    return model.head(x) if head else x
  # [stages, layers / stages, ...]: each stage gets its own layers' parameters and kinds
  staged = jax.tree.map(lambda a: a.reshape(stages, -1, *a.shape[1:]), layers)

  def stage_fn(p, x, rows):
    x, _, stats = run(p, x, rows)
    return x, stats

  x, stats = gpipe(stage_fn, staged, x, extras, microbatches, aux=True)
  if stats is not None:  # [stages, layers / stages, ...] -> [layers, ...], depth order
    moe.report(moe.finish_stats(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stats)))
  return model.head(x) if head else x
