"""Multi-head attention with grouped KV heads (MHA / GQA / MQA), RoPE and an optional KV cache.

`dot_product_attention` is the plain XLA reference every kernel is checked against. Masking is by
*slot* (the index of a token in its row or in the KV cache) for causality and sliding windows, and
by segment id for packed documents, so a query never sees a future token or another document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.kernels.masking import MASKED  # finite: a row with every key masked gets uniform weights, never NaN
from jaxlm.models import attention_kernels, rope
from jaxlm.models.compute import Compute
from jaxlm.models.layers import LoraSpec, Norm, adapter, param, project
from jaxlm.parallel.rules import constrain


def dot_product_attention(q, k, v, q_slots, k_slots, q_segments=None, k_segments=None,
                          window: int = 0, softcap: float = 0.0, causal: bool = True,
                          scale: float | None = None, local=None):
  """q, k: [batch, t|s, heads|kv_heads, head_dim]; v: [batch, s, kv_heads, v_dim] (v_dim =
  head_dim but for MLA's expanded values); slots: [batch, t|s].

  causal=False drops the k_slot <= q_slot condition (a window then limits |q_slot - k_slot|).
  scale: of the scores (default head_dim**-0.5). local: None, or a traced bool scalar (a scanned
  layer's kind, see model.layer_pattern): the window then applies only where it is true.
  Query heads are grouped onto their KV head by a reshape, so K/V are never repeated in memory.
  Returns [batch, t, heads, v_dim].
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  q = q.reshape(b, t, kvh, h // kvh, d)
  scale = d**-0.5 if scale is None else scale
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  delta = q_slots[:, :, None] - k_slots[:, None, :]  # [batch, t, s]
  mask = delta >= 0 if causal else jnp.ones(delta.shape, bool)
  if window:
    in_window = (delta < window) if causal else (jnp.abs(delta) < window)
    mask &= in_window if local is None else (in_window | ~local)
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  scores = jnp.where(mask[:, None, None], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, v.shape[-1]).astype(v.dtype)


def causal_blocked_attention(q, k, v, segments=None, blocks: int = 1, window: int = 0,
                             softcap: float = 0.0, scale: float | None = None):
  """Self-attention over whole rows (slot i = position in the row, no cache), in query blocks.

  Query block i attends only to keys up to its own end (and, with a window, not before its first
  query's window), so key blocks the causal mask hides entirely are never computed: with 4 blocks,
  10/16 of the full score matrix. Each block is the reference `dot_product_attention`, so masking
  inside a block is exactly the reference's. q: [batch, t, heads, head_dim]; k, v: [batch, t,
  kv_heads, head_dim]; segments: [batch, t] or None.
  """
  b, t = q.shape[:2]
  bounds = [round(i * t / blocks) for i in range(blocks + 1)]
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  outs = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    if hi == lo:
      continue
    k_lo = max(0, lo - window + 1) if window else 0
    seg_q = None if segments is None else segments[:, lo:hi]
    seg_k = None if segments is None else segments[:, k_lo:hi]
    outs.append(dot_product_attention(
        q[:, lo:hi], k[:, k_lo:hi], v[:, k_lo:hi], slots[:, lo:hi], slots[:, k_lo:hi],
        seg_q, seg_k, window=window, softcap=softcap, scale=scale))
  return jnp.concatenate(outs, axis=1)


def cached_attention(q, k, v, cache_k, cache_v, q_slots, start, window: int = 0,
                     softcap: float = 0.0, scale: float | None = None, local=None):
  """t new queries over a KV cache and over the t new keys themselves (KV-cached decoding).

  q: [batch, t, heads, head_dim]; k, v: [batch, t, kv_heads, head_dim] the new entries, at q_slots
  [batch, t] (consecutive from start [batch]); cache_k: [batch, kv_heads, head_dim, S] and cache_v:
  [batch, kv_heads, S, head_dim], as they were before this call. Cache slot s of row b is seen iff
  s < start[b]: slots at or past it hold padding or a rejected draft's entries, which this call's
  new entries replace. (An unscanned layer writes its new entries into its cache first and passes
  k, v of length 0 with start + t: the same keys, read from the cache.) The cache is only read
  here, and its layout keeps the dimension each product does not contract innermost (S in the
  keys, head_dim in the values): XLA:CPU's dot kernels then stream each row's cache once, vectorized
  along it. At batch 32 attention took twice as long with the contracted dimension innermost, and
  the [batch, S, kv_heads, head_dim] layout costs a transpose of the whole cache per layer and step
  (benchmarks/README.md, "generate.py"). Scores of the cache and of the new keys are joined before
  one softmax, so the result is the reference `dot_product_attention` over [cache, new].
  window, softcap, scale, local: as in `dot_product_attention`. Returns [batch, t, heads, head_dim].
  """
  b, t, h, d = q.shape
  kvh, size = k.shape[2], cache_k.shape[3]
  g = h // kvh
  q = q.reshape(b, t, kvh, g, d)
  scale = d**-0.5 if scale is None else scale
  # Over the cache: one batched [groups * t, head_dim] x [head_dim, S] product per (row, KV head),
  # operands already in that order, so XLA moves only the (small) queries and scores around it.
  rows_q = q.transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
  old = jnp.einsum("bkqd,bkds->bkqs", rows_q, cache_k,
                   preferred_element_type=jnp.float32).reshape(b, kvh, g, t, size)
  new = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = jnp.concatenate([old, new], axis=-1) * scale  # [batch, kv_heads, groups, t, S + t]
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  cache_slots = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (b, size))
  tk = k.shape[1]  # t, or 0 when the cache holds the new entries already
  k_slots = jnp.concatenate([cache_slots, q_slots[:, :tk]], axis=1)  # [batch, S + tk]
  delta = q_slots[:, :, None] - k_slots[:, None, :]  # [batch, t, S + tk]
  filled = jnp.concatenate([cache_slots < start[:, None], jnp.ones((b, tk), bool)], axis=1)
  mask = (delta >= 0) & filled[:, None, :]
  if window:
    in_window = delta < window
    mask &= in_window if local is None else (in_window | ~local)
  scores = jnp.where(mask[:, None, None], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  from_cache = jnp.einsum("bkqs,bksd->bkqd", probs[..., :size].reshape(b, kvh, g * t, size), cache_v,
                          preferred_element_type=jnp.float32)  # [batch, kv_heads, groups * t, head_dim]
  out = (from_cache.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4)
         + jnp.einsum("bkgts,bskd->btkgd", probs[..., size:], v, preferred_element_type=jnp.float32))
  return out.reshape(b, t, h, d).astype(v.dtype)


# Where each cache entry keeps its slots: the axis of S in the cache array. Every entry's layout is
# its new entries' [layers, batch, t, *features] with t moved to that axis (and grown to S).
# Standard attention: "k" [layers, batch, kv_heads, head_dim, S], "v" [layers, batch, kv_heads,
# S, head_dim]; MLA (jaxlm/models/mla.py): "latent", "k_rope" [layers, batch, S, width].
CACHE_SLOT_AXES = {"k": 4, "v": 3, "latent": 2, "k_rope": 2}


def write_cache(cache, new, start):
  """Writes every layer's new entries into the cache, each row at its own slots.

  cache: {name: [layers, batch, ..., S, ...]} (S at CACHE_SLOT_AXES[name]); new: {name: [layers,
  batch, t, *features]}; start: [batch] -> the cache with row b's entries at slots [start[b],
  start[b] + t). Rows have their own start, so rows of a batch may hold prompts of different
  lengths and advance by different amounts (speculative decoding). One scatter per array and step,
  in place inside a decoding loop; slots past S are dropped (decoding checks lengths up front, so
  only finished rows, whose tokens are discarded, can reach them).
  """
  t = next(iter(new.values())).shape[2]
  rows = jnp.arange(start.shape[0])[:, None]  # [batch, 1]
  slots = start[:, None] + jnp.arange(t, dtype=start.dtype)  # [batch, t]

  def put(c, n, axis):
    index = (slice(None), rows) + (slice(None),) * (axis - 2) + (slots,)
    if axis > 2:  # rows and slots apart: the indexed dims come first, [batch, t, layers, *features]
      n = n.transpose(1, 2, 0, *range(3, n.ndim))
    return c.at[index].set(n.astype(c.dtype), mode="drop")  # else in place: [layers, batch, t, ...]

  return {name: put(cache[name], n, CACHE_SLOT_AXES[name]) for name, n in new.items()}


def write_layer_cache(cache, new, start):
  """One layer's cache {name: [batch, ..., S, ...]} (an unscanned model's: see
  Transformer.init_cache) with new {name: [batch, t, *features]} written at row b's slots
  [start[b], start[b] + t); slots past S are dropped, as in `write_cache`."""
  t = next(iter(new.values())).shape[1]
  rows = jnp.arange(start.shape[0])[:, None]  # [batch, 1]
  slots = start[:, None] + jnp.arange(t, dtype=start.dtype)  # [batch, t]

  def put(c, n, axis):  # axis: S's in the layer's array; rows and slots index ahead of the rest
    index = (rows,) + (slice(None),) * (axis - 1) + (slots,)
    return c.at[index].set(n.astype(c.dtype), mode="drop")

  return {name: put(cache[name], n, CACHE_SLOT_AXES[name] - 1) for name, n in new.items()}


class Attention(nnx.Module):
  """lora: which projections get LoRA adapters (drawn from lora_rngs), or None."""

  def __init__(self, cfg, compute: Compute, rngs: nnx.Rngs, out_std: float,
               lora: LoraSpec | None = None, lora_rngs: nnx.Rngs | None = None):
    self.cfg, self.compute = cfg, compute
    d, h, kvh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
    hd = cfg.head_dim or d // h
    p, std = compute.params, cfg.init_std
    self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, p)
    self.k = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), std, p)
    self.v = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), std, p)
    self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std, p)
    self.q_lora = adapter(lora, "q", self.q, compute, lora_rngs)
    self.k_lora = adapter(lora, "k", self.k, compute, lora_rngs)
    self.v_lora = adapter(lora, "v", self.v, compute, lora_rngs)
    self.o_lora = adapter(lora, "o", self.o, compute, lora_rngs, contract=2)
    if cfg.attention_bias:
      self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), 0, p)
      self.k_bias = param(rngs, (kvh, hd), ("kv_heads", "head_dim"), 0, p)
      self.v_bias = param(rngs, (kvh, hd), ("kv_heads", "head_dim"), 0, p)
    if cfg.qk_norm:
      self.q_norm = Norm(cfg, compute, hd, rngs, axis_name="head_dim")
      self.k_norm = Norm(cfg, compute, hd, rngs, axis_name="head_dim")
    if cfg.position_kind == "rope":
      # (global layers' (inv_freq, scale), local layers'): static, hashable, not parameters
      kinds = rope.layer_frequencies(cfg, hd)
      self.rope = tuple((tuple(kinds[local][0].tolist()), kinds[local][1]) for local in (False, True))
    # Score scale: head_dim**-0.5, or query_pre_attn_scalar**-0.5 (Gemma 2/3)
    self.score_scale = (cfg.query_pre_attn_scalar or hd) ** -0.5

  def _rope(self, x, positions, local):
    """RoPE of this layer's kind (model.layer_pattern): local None/False global, True local, or a
    traced bool (a scanned layer) that selects between the two."""
    glob, loc = self.rope
    if isinstance(local, jax.Array) and glob != loc:
      inv_freq = jnp.where(local, jnp.asarray(loc[0], jnp.float32), jnp.asarray(glob[0], jnp.float32))
      return rope.apply_rope(x, positions, inv_freq, jnp.where(local, loc[1], glob[1]))
    inv_freq, scale = loc if local is True else glob
    return rope.apply_rope(x, positions, jnp.asarray(inv_freq, jnp.float32), scale)

  def __call__(self, x, positions, slots, segment_ids=None, cache=None, cache_index=None, local=None):
    """x: [batch, t, embed]; positions, slots: [batch, t]; cache: this layer's {"k": [batch, kv_heads,
    head_dim, S], "v": [batch, kv_heads, S, head_dim]} with cache_index: [batch], where each row's t
    new entries go. Returns (out [batch, t, embed], then: scanned layers (a slice of the stacked
    cache, read only) the new entries {"k","v": [batch, t, kv_heads, head_dim]} in the cache's
    dtype for the model to write after the loop; unscanned layers (their own buffers) the cache
    with the new entries written; None without a cache).

    local: this layer's kind under model.layer_pattern: None (no pattern: model.sliding_window
    applies), a Python bool (an unscanned layer: its window is static), or a traced bool scalar (a
    scanned layer: the xla reference masks by it; blocked and kernel attention, whose window is
    static, run the local or the global variant under lax.cond).
    """
    cfg, cp = self.cfg, self.compute
    c, mdt = cp.activations, cp.matmul
    q = project(x, self.q, self.q_lora, cp)  # [batch, t, heads, head_dim]
    k = project(x, self.k, self.k_lora, cp)  # [batch, t, kv_heads, head_dim]
    v = project(x, self.v, self.v_lora, cp)
    if cfg.attention_bias:
      q, k, v = q + self.q_bias[...].astype(c), k + self.k_bias[...].astype(c), v + self.v_bias[...].astype(c)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.position_kind == "rope":
      q, k = self._rope(q, positions, local), self._rope(k, positions, local)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    # Sequence parallelism: queries stay split along length. Every query shard needs every earlier
    # key: with context_parallel="all_gather" keys and values are whole along length here (XLA
    # all-gathers them); with "ring" they stay split and travel round the ring inside attention.
    ring = cp.context_parallel == "ring" and cp.sequence_shards > 1
    kv_length = "length" if ring else None
    k = constrain(k, ("batch", kv_length, "kv_heads", "head_dim"))
    v = constrain(v, ("batch", kv_length, "kv_heads", "head_dim"))

    traced = isinstance(local, jax.Array) and bool(cfg.sliding_window)
    window = cfg.sliding_window if local is None or local is True or traced else 0
    if cache is not None:  # decoding: attend to the cache and the new entries; return the new ones
      # Operands in the cache's dtype (the activations' by default): converting the cache to
      # matmul_dtype would cost a pass over it a layer and step, more than the products it feeds.
      cdt = cache["k"].dtype
      q, k, v = q.astype(cdt), k.astype(cdt), v.astype(cdt)
      start, new = cache_index, {"k": k, "v": v}
      if not cp.scan_layers:
        # Write first, then read the written buffer: a decode loop then updates it in place, where
        # reading the old value beside the write makes XLA copy the buffer (twice a step on CPU).
        # The new keys are cache slots now: none passed apart, and slots < start + t are filled.
        cache = new = write_layer_cache(cache, new, cache_index)
        k, v, start = k[:, :0], v[:, :0], cache_index + k.shape[1]
      out = cached_attention(
          q, k, v, cache["k"], cache["v"], slots, start, window=window,
          softcap=cfg.attn_logit_softcap, scale=self.score_scale, local=local if traced else None)
      return project(out.astype(c), self.o, self.o_lora, cp, contract=2, out_dtype=c), new
    q, k, v = q.astype(mdt), k.astype(mdt), v.astype(mdt)  # attention matmuls on matmul_dtype operands
    if cp.attention != "xla" or cp.attention_blocks > 1 or ring:
      def attend(window):  # self-attention over whole rows with a static window
        if cp.attention != "xla" or ring:  # a kernel, or the ring
          return attention_kernels.self_attention(cfg, cp, q, k, v, segment_ids, window)
        # slots are 0..t-1: skip the hidden key blocks
        return causal_blocked_attention(q, k, v, segment_ids, cp.attention_blocks, window,
                                        cfg.attn_logit_softcap, self.score_scale)
      if traced:
        out = jax.lax.cond(local, lambda: attend(window), lambda: attend(0))
      else:
        out = attend(window)
    else:
      out = dot_product_attention(
          q, k, v, slots, slots, segment_ids, segment_ids, window=window,
          softcap=cfg.attn_logit_softcap, scale=self.score_scale, local=local if traced else None)
    out = project(out, self.o, self.o_lora, cp, contract=2, out_dtype=c)  # [batch, t, embed]
    return out, cache
