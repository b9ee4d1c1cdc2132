"""The decoder-only transformer: embeddings, a stack of pre-norm blocks, a final norm, logits.

One architecture config (`config.model`) covers the Llama family and its common variants (GQA/MQA,
SwiGLU/GeGLU/GELU, RMSNorm/LayerNorm, RoPE with scalings or learned positions, tied embeddings,
QK-norm, biases, sliding windows, soft-capping) and Gemma's (post-norms, (1 + w) norms, scaled
embeddings, a query scalar, local and global layers by model.layer_pattern). How it is computed
(dtypes, the layer loop, recompute, attention kernels) is a `Compute` (jaxlm/models/compute.py)
fixed at construction, and so are LoRA adapters (a `LoraSpec`, jaxlm/models/layers.py): the
projections it targets compute with W + scale A B. A score head (score_outputs > 0: a reward model,
PPO's value head) is a [embed, n] weight on the final-normed hidden state beside the logits.
With compute.scan_layers the blocks' parameters are stacked along a leading `layers` axis and run
by `lax.scan`, so compile time does not grow with depth.

Mixture-of-experts layers (model.moe_num_experts > 0, which layers by jaxlm.config.moe_layers) have
another parameter structure than dense ones, so the model keeps two stacks: `blocks` (the dense
layers, in depth order; all of them in a dense model, whose parameters are unchanged) and
`moe_blocks` (the MoE layers). The layers run as segments, maximal runs of consecutive layers of one
kind, each scanned over its slice of its stack (DeepSeek-V3's 3 dense + 58 MoE: two segments). The
MoE layers' router statistics go out through jaxlm.models.moe.collect_stats, not the outputs.

The model is a pure function of its parameters, in three parts that callers may compose
differently (the pipeline schedule in jaxlm/parallel/pipeline.py runs the layer stack by stages):
  embed_tokens(tokens, positions) -> x [batch, t, embed]
  layer_stack() -> (layers, run(layers, x, rows, kv) -> (x, new kv, MoE router sums))   (scanned,
      one kind of layer only; layers: the stacked block parameters and each layer's kind, every
      leaf [layers, ...])
  head(x) -> logits [batch, t, padded vocab] (float32)
and their composition:
  model(tokens [batch, t], positions=None, segment_ids=None) -> logits
  model(tokens, positions, segment_ids, head=False) -> x [batch, t, embed] (the head's input; a
      chunked loss runs the head piece by piece, jaxlm/train/chunked_loss.py)
  model(tokens, positions, cache=cache) -> (logits, cache)   # KV-cached decoding, see init_cache
  model.logits_and_scores(tokens, positions, segment_ids) -> (logits, scores [batch, t, n])
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxlm.config import layer_kinds, moe_layers
from jaxlm.kernels.masking import MASKED
from jaxlm.models import mla
from jaxlm.models.attention import Attention, write_cache
from jaxlm.models.compute import Compute
from jaxlm.models import moe as moe_lib
from jaxlm.models.layers import MLP, LoraSpec, Norm, ScoreParam, dense, param
from jaxlm.parallel.rules import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def padded_vocab_size(cfg) -> int:
  """Rows of the embedding table: model.vocab_size rounded up to model.vocab_multiple."""
  if cfg.vocab_size <= 0:
    raise ValueError("model.vocab_size is 0 (take the tokenizer's): a run fills it in at start; to "
                     "build a model directly, set it to the tokenizer's vocabulary size")
  return -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); with model.post_norms each
  sublayer's output is normalized too before it is added (Gemma 2/3: x + norm(attn(norm(x))))).
  moe: the MLP is a mixture of experts (jaxlm/models/moe.py)."""

  def __init__(self, cfg, compute: Compute, rngs: nnx.Rngs, lora: LoraSpec | None = None,
               lora_rngs: nnx.Rngs | None = None, moe: bool = False):
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # keeps the residual stream's scale with depth
    self.attn_norm = Norm(cfg, compute, cfg.d_model, rngs)
    attention = mla.MLA if cfg.attention_kind == "mla" else Attention
    self.attn = attention(cfg, compute, rngs, out_std, lora, lora_rngs)
    self.mlp_norm = Norm(cfg, compute, cfg.d_model, rngs)
    self.moe = moe
    if moe:
      self.mlp = moe_lib.MoE(cfg, compute, rngs, out_std)
    else:
      self.mlp = MLP(cfg, compute, rngs, out_std, lora, lora_rngs)
    self.post_norms = cfg.post_norms
    if cfg.post_norms:
      self.attn_post_norm = Norm(cfg, compute, cfg.d_model, rngs)
      self.mlp_post_norm = Norm(cfg, compute, cfg.d_model, rngs)

  def __call__(self, x, positions, slots, segment_ids, cache=None, cache_index=None, local=None):
    """local: the layer's kind (see Attention.__call__). Returns (x, cache, the MoE statistics
    of this layer, or None for a dense MLP)."""
    h, cache = self.attn(self.attn_norm(x), positions, slots, segment_ids, cache, cache_index, local)
    if self.post_norms:
      h = self.attn_post_norm(h)
    x = constrain(x + h, ("batch", "length", "embed"))
    h, stats = self.mlp(self.mlp_norm(x)) if self.moe else (self.mlp(self.mlp_norm(x)), None)
    if self.post_norms:
      h = self.mlp_post_norm(h)
    x = x + h
    return constrain(x, ("batch", "length", "embed")), cache, stats


def _stack(cfg, compute, rngs, lora, lora_rngs, n: int, moe: bool):
  """n blocks, stacked [n, ...] (compute.scan_layers) or a list."""
  if compute.scan_layers:
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked(rngs, lora_rngs):
      return Block(cfg, compute, rngs, lora, lora_rngs, moe)
    return stacked(rngs, lora_rngs)
  return nnx.List([Block(cfg, compute, rngs, lora, lora_rngs, moe) for _ in range(n)])


class Transformer(nnx.Module):
  """lora: LoRA adapters on the projections it targets (None: none). They draw from their own
  stream (a key folded from rngs'), so the base weights are those of the same seed without them."""

  def __init__(self, cfg, rngs: nnx.Rngs, compute: Compute = Compute(), lora: LoraSpec | None = None,
               score_outputs: int = 0):
    cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: it lives in the static graphdef
    self.cfg, self.compute, self.lora = cfg, compute, lora
    lora_rngs = None if lora is None else nnx.Rngs(lora=jax.random.fold_in(rngs.default.key[...], 1))
    d, p = cfg.d_model, compute.params
    self.vocab = padded_vocab_size(cfg)
    self.embed = param(rngs, (self.vocab, d), ("vocab", "embed"), cfg.init_std, p)
    if cfg.position_kind == "learned":
      self.pos_embed = param(rngs, (cfg.max_seq_len, d), (None, "embed"), cfg.init_std, p)
    self.moe_layers = moe_layers(cfg)  # per layer: True where the MLP is MoE
    n_moe = sum(self.moe_layers)
    if n_moe < cfg.num_layers:
      self.blocks = _stack(cfg, compute, rngs, lora, lora_rngs, cfg.num_layers - n_moe, moe=False)
    if n_moe:
      self.moe_blocks = _stack(cfg, compute, rngs, lora, lora_rngs, n_moe, moe=True)
    self.final_norm = Norm(cfg, compute, d, rngs)
    if not cfg.tie_embeddings:
      self.unembed = param(rngs, (d, self.vocab), ("embed", "vocab"), cfg.init_std, p)
    if score_outputs:  # drawn last, so every other weight is the one the same seed gives without it
      w = jax.random.normal(rngs.params(), (d, score_outputs), p) * cfg.init_std
      self.score = ScoreParam(w, out_sharding=("embed", None))

  def init_cache(self, batch: int, max_len: int, cache_dtype=None) -> dict:
    """An empty KV cache: {"k": [layers, batch, kv_heads, head_dim, max_len], "v": [layers, batch,
    kv_heads, max_len, head_dim], "index": [batch]}, in the activations' dtype by default (decoding
    attention computes in the cache's dtype). The layouts are the ones attention reads without a
    transpose (see attention.cached_attention).

    index[b] is where row b's next tokens go (and how many slots of row b are filled): rows advance
    on their own, so a batch may hold prompts of different lengths. With model.attention_kind
    "mla" the entries are MLA's latent cache instead of "k"/"v" (mla.init_cache); code outside
    the model only ever reads "index".

    Unscanned layers (compute.scan_layers False, the layout decoding uses: jaxlm.inference.layout)
    get each entry as a tuple of per-layer arrays [batch, ...] instead of one [layers, batch, ...]:
    in a decode loop XLA:CPU copies a layer's slice out of a stacked cache every step, and the
    whole stack twice more around the loop-carried write (at batch 32, more bytes a step than the
    weights); a layer's own buffer is read and written in place."""
    cfg = self.cfg
    cdt = cache_dtype or self.compute.activations
    if cfg.attention_kind == "mla":
      entries = mla.init_cache(cfg, batch, max_len, cdt)
    else:
      hd = cfg.head_dim or cfg.d_model // cfg.num_heads
      head = (cfg.num_layers, batch, cfg.num_kv_heads)
      entries = {"k": jnp.zeros((*head, hd, max_len), cdt), "v": jnp.zeros((*head, max_len, hd), cdt)}
    if not self.compute.scan_layers:
      entries = {n: tuple(jnp.zeros(a.shape[1:], a.dtype) for _ in range(cfg.num_layers))
                 for n, a in entries.items()}
    return {**entries, "index": jnp.zeros((batch,), jnp.int32)}

  def embed_tokens(self, tokens, positions):
    """tokens, positions: [batch, t] -> x: [batch, t, embed] in the compute dtype."""
    c = self.compute.activations
    # The lookup reads whole rows: gather the table's embed shards first (ZeRO-3 does this for every
    # weight), so the looked-up rows can be split by batch instead of along embed.
    table = constrain(self.embed[...], ("vocab", None))  # [vocab, embed]
    x = table.astype(c)[tokens]  # [batch, t, embed]
    if self.cfg.scale_embeddings:  # sqrt(d_model) rounded to float32, then to the activations' dtype
      x = x * jnp.asarray(np.float32(math.sqrt(self.cfg.d_model)), c)
    if self.cfg.position_kind == "learned":
      x = x + self.pos_embed[...].astype(c)[positions]
    return constrain(x, ("batch", "length", "embed"))

  def _layer(self, start, static_local=None):
    """One block applied to x, with compute.remat_policy's recompute: f(block, x, kv, rows, local).
    start: [batch], where each row's tokens of this call begin in the KV cache (zeros without one).
    The layer's kind is
    `local` (traced, scanned layers) or else static_local (a Python bool, unscanned layers)."""
    def layer(block, x, layer_cache, rows, local=None):  # rows: (positions, slots, segment_ids) of x's rows
      return block(x, *rows, layer_cache, start, static_local if local is None else local)
    policy = self.compute.remat_policy
    if policy == "none":
      return layer
    return nnx.remat(layer, policy=REMAT_POLICIES[policy], prevent_cse=not self.compute.scan_layers)

  def segments(self) -> tuple[tuple[bool, int, int, int], ...]:
    """Maximal runs of consecutive layers of one kind: (moe, first layer, layers, first index in
    its stack). A dense model is one segment: (False, 0, num_layers, 0)."""
    out, used = [], {False: 0, True: 0}
    for i, moe in enumerate(self.moe_layers):
      if out and out[-1][0] == moe:
        out[-1][2] += 1
      else:
        out.append([moe, i, 1, used[moe]])
      used[moe] += 1
    return tuple(tuple(seg) for seg in out)

  def _stack_of(self, moe: bool):
    return self.moe_blocks if moe else self.blocks

  def _scanned(self, stack, start):
    """(params of the stacked blocks, run(layers, x, rows, kv) -> (x, (new kv, stats)))."""
    graphdef, params = nnx.split(stack)
    layer = self._layer(start)

    def run(layers, x, rows, kv=None):
      def body(x, xs):  # one layer: xs = ((its parameters, its kind), its cache slice)
        (params, local), layer_kv = xs
        x, new_kv, stats = layer(nnx.merge(graphdef, params), x, layer_kv, rows, local)
        return x, (new_kv, stats)
      return jax.lax.scan(body, x, (layers, kv))
    return params, run

  def layer_stack(self, start=0):
    """(layers, run) of the scanned layers: layers = (block parameters, kinds), every leaf [layers, ...];
    kinds: bool, True for model.layer_pattern's local layers (None without a pattern), so any
    slice of the stack (a pipeline stage's) carries its own layers' kinds.
    run(layers, x, rows, kv=None) -> (x, new cache entries, stats) runs them in order (any leading
    slice of layers); stats: the MoE layers' router sums (moe.router_sums plus "dropped", every
    leaf [layers, ...]; finish with moe.finish_stats), None for dense layers.
    Models whose layers are all of one kind only (all dense or all MoE: one stack of alike blocks;
    mixed models keep two, see `segments`)."""
    if not self.compute.scan_layers:
      raise ValueError("layer_stack needs compute.scan_layers=True (layers stacked along one axis)")
    if len(set(self.moe_layers)) > 1:
      raise ValueError("layer_stack runs one stack of alike blocks; this model mixes dense and MoE "
                       "layers")
    params, run_stats = self._scanned(self._stack_of(self.moe_layers[0]), start)
    kinds = layer_kinds(self.cfg)
    kinds = None if kinds is None else jnp.asarray(kinds)

    def run(layers, x, rows, kv=None):
      x, (new_kv, stats) = run_stats(layers, x, rows, kv)
      return x, new_kv, stats
    return (params, kinds), run

  def run_layers(self, x, rows, kv=None, start=0):
    """x: [batch, t, embed] through every block; kv: the cache's entries ({"k","v"}, or MLA's) or
    None. Returns (x, the blocks' new cache entries {name: [layers, batch, t, ...]} (scanned
    layers), the cache with them written (unscanned layers: a tuple of buffers per name), or None).
    MoE layers' statistics are reported to jaxlm.models.moe.collect_stats, in depth order."""
    kinds = layer_kinds(self.cfg)
    kv_of = lambda a, b: None if kv is None else jax.tree.map(lambda c: c[a:b], kv)
    outs, stats = [], []
    for moe, first, n, index in self.segments():
      stack = self._stack_of(moe)
      if self.compute.scan_layers:
        params, run = self._scanned(stack, start)
        if n != jax.tree.leaves(params)[0].shape[0]:  # a slice of its stack
          params = jax.tree.map(lambda a: a[index:index + n], params)
        seg_kinds = None if kinds is None else jnp.asarray(kinds[first:first + n])
        x, (new_kv, seg_stats) = run((params, seg_kinds), x, rows, kv_of(first, first + n))
        outs.append(new_kv)
        stats.append(seg_stats)
        continue
      for i in range(n):
        local = None if kinds is None else kinds[first + i]  # a static kind: each layer's window is fixed
        layer_kv = None if kv is None else {name: a[first + i] for name, a in kv.items()}  # stack or tuple
        x, new_kv, layer_stats = self._layer(start, local)(stack[index + i], x, layer_kv, rows)
        outs.append(new_kv)  # the layer's cache, its new entries written
        stats.append(None if layer_stats is None else jax.tree.map(lambda a: a[None], layer_stats))
    stats = [s for s in stats if s is not None]
    if stats:
      moe_lib.report(moe_lib.finish_stats(jax.tree.map(lambda *a: jnp.concatenate(a), *stats)))
    if kv is None:
      return x, None
    if not self.compute.scan_layers:  # the updated cache, one buffer per layer
      return x, {name: tuple(out[name] for out in outs) for name in kv}
    return x, jax.tree.map(lambda *a: jnp.concatenate(a), *outs)

  def head(self, x):
    """x: [batch, t, embed] -> logits [batch, t, padded vocab] float32; padded ids masked."""
    cfg, cp = self.cfg, self.compute
    x = self.final_norm(x)
    w = self.embed[...] if cfg.tie_embeddings else self.unembed[...]  # [vocab, embed] | [embed, vocab]
    logits = dense(x, w.astype(cp.activations), cp, out_dtype=jnp.float32,
                   transpose_w=cfg.tie_embeddings)  # [batch, t, vocab]
    if cfg.final_logit_softcap:
      logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    if self.vocab != cfg.vocab_size:  # ids past the tokenizer's vocabulary are never predicted
      logits = jnp.where(jnp.arange(self.vocab) < cfg.vocab_size, logits, MASKED)
    return constrain(logits, ("batch", "length", "vocab"))

  def scores(self, x):
    """x: [batch, t, embed] (before the final norm) -> the score head's [batch, t, n] float32.

    Always a float32 matmul: it costs nothing beside the logits, and bfloat16 operands round away
    the small differences between two sequences' final states, making their scores tie exactly."""
    h = self.final_norm(x).astype(jnp.float32)
    return jnp.matmul(h, self.score[...].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

  def logits_and_scores(self, tokens, positions=None, segment_ids=None):
    """(logits [batch, t, vocab], scores [batch, t, n]) of one forward pass (no cache)."""
    b, t = tokens.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = slots if positions is None else positions
    x, _ = self.run_layers(self.embed_tokens(tokens, positions), (positions, slots, segment_ids))
    return self.head(x), self.scores(x)

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, slots=None, head=True):
    """slots: [batch, t] each token's index in its row (default 0..t-1; a permuted order under
    balanced sequence parallelism) or, with a cache, in the cache. head=False (no cache): the final
    hidden state [batch, t, embed] instead of the logits; self.head(x) gives them."""
    b, t = tokens.shape
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache["index"]  # [batch]
    if slots is None:
      slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)  # [batch, t]
    if positions is None:
      positions = slots
    x = self.embed_tokens(tokens, positions)
    kv = None if cache is None else {n: a for n, a in cache.items() if n != "index"}
    # with a cache: scanned layers read it and return their new entries [layers, batch, t, ...];
    # unscanned ones write their own buffers and return the cache (see init_cache)
    x, new = self.run_layers(x, (positions, slots, segment_ids), kv, start)
    if cache is None and not head:
      return x
    logits = self.head(x)
    if cache is None:
      return logits
    written = write_cache(kv, new, start) if self.compute.scan_layers else new
    return logits, {**written, "index": cache["index"] + t}
