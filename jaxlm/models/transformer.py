"""The decoder-only transformer: embeddings, a stack of pre-norm blocks, a final norm, logits.

One config covers the Llama family and its common variants (GQA/MQA, SwiGLU/GeGLU/GELU,
RMSNorm/LayerNorm, RoPE with scalings or learned positions, tied embeddings, QK-norm, biases,
sliding windows, soft-capping). With `scan_layers` the blocks' parameters are stacked along a
leading `layers` axis and run by `lax.scan`, so compile time does not grow with depth.

Call signature (pure given the parameters, used through nnx.split / nnx.merge):
  model(tokens [batch, t], positions=None, segment_ids=None) -> logits [batch, t, vocab] (float32)
  model(tokens, positions, cache=cache) -> (logits, cache)   # KV-cached decoding, see init_cache
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.models.attention import Attention
from jaxlm.models.layers import MLP, Norm, dense, dtype, matmul_dtype, param
from jaxlm.parallel.pipeline import gpipe, pipeline_microbatches
from jaxlm.parallel.rules import constrain, mesh_axis_size

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # keeps the residual stream's scale with depth
    self.attn_norm = Norm(cfg, cfg.d_model, rngs)
    self.attn = Attention(cfg, rngs, out_std)
    self.mlp_norm = Norm(cfg, cfg.d_model, rngs)
    self.mlp = MLP(cfg, rngs, out_std)

  def __call__(self, x, positions, slots, segment_ids, cache=None, cache_index=None):
    h, cache = self.attn(self.attn_norm(x), positions, slots, segment_ids, cache, cache_index)
    x = constrain(x + h, ("batch", "length", "embed"))
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("batch", "length", "embed")), cache


class Transformer(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: it lives in the static graphdef
    self.cfg = cfg
    d, p = cfg.d_model, cfg.param_dtype
    self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), cfg.init_std, p)
    if cfg.position_kind == "learned":
      self.pos_embed = param(rngs, (cfg.max_seq_len, d), (None, "embed"), cfg.init_std, p)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(rngs):
        return Block(cfg, rngs)
      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = Norm(cfg, d, rngs)
    if not cfg.tie_embeddings:
      self.unembed = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, p)

  def init_cache(self, batch: int, max_len: int, cache_dtype=None) -> dict:
    """An empty KV cache: {"k","v": [layers, batch, max_len, kv_heads, head_dim], "index": 0}."""
    cfg = self.cfg
    hd = cfg.head_dim or cfg.d_model // cfg.num_heads
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, hd)
    cdt = cache_dtype or dtype(cfg.compute_dtype)
    return {"k": jnp.zeros(shape, cdt), "v": jnp.zeros(shape, cdt), "index": jnp.zeros((), jnp.int32)}

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None):
    cfg, c = self.cfg, dtype(self.cfg.compute_dtype)
    b, t = tokens.shape
    start = 0 if cache is None else cache["index"]
    slots = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))  # index in row or cache
    if positions is None:
      positions = slots
    # The lookup reads whole rows: gather the table's embed shards first (ZeRO-3 does this for every
    # weight), so the looked-up rows can be split by batch instead of along embed.
    table = constrain(self.embed[...], ("vocab", None))  # [vocab, embed]
    x = table.astype(c)[tokens]  # [batch, t, embed]
    if cfg.position_kind == "learned":
      x = x + self.pos_embed[...].astype(c)[positions]
    x = constrain(x, ("batch", "length", "embed"))

    def layer(block, x, layer_cache, rows):  # rows: (positions, slots, segment_ids) of x's rows
      return block(x, *rows, layer_cache, start)

    if cfg.remat_policy != "none":
      layer = nnx.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    rows = (positions, slots, segment_ids)
    stages = mesh_axis_size("stage")
    if cfg.scan_layers:
      graphdef, layer_params = nnx.split(self.blocks)

      def run_layers(params, x, kv, rows):  # params, kv: leaves [layers, ...]
        def body(x, xs):  # one layer: xs = (this layer's parameters, this layer's cache slice)
          return layer(nnx.merge(graphdef, xs[0]), x, xs[1], rows)
        return jax.lax.scan(body, x, (params, kv))

      if stages > 1 and cache is None:  # pipeline: [layers] -> [stages, layers / stages]
        staged = jax.tree.map(lambda a: a.reshape(stages, -1, *a.shape[1:]), layer_params)
        x = gpipe(lambda p, x, rows: run_layers(p, x, None, rows)[0], staged, x, rows,
                  pipeline_microbatches(cfg, stages))
      else:
        x, kv = run_layers(layer_params, x, kv, rows)
    else:
      outs = []
      for i, block in enumerate(self.blocks):
        x, layer_kv = layer(block, x, None if kv is None else jax.tree.map(lambda a: a[i], kv), rows)
        outs.append(layer_kv)
      kv = None if kv is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

    x = self.final_norm(x)
    w = self.embed[...] if cfg.tie_embeddings else self.unembed[...]  # [vocab, embed] | [embed, vocab]
    logits = dense(x, w.astype(c), out_dtype=jnp.float32, dot_dtype=matmul_dtype(cfg),
                   transpose_w=cfg.tie_embeddings)  # [batch, t, vocab]
    if cfg.final_logit_softcap:
      logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    logits = constrain(logits, ("batch", "length", "vocab"))
    if cache is None:
      return logits
    return logits, {"k": kv["k"], "v": kv["v"], "index": cache["index"] + t}
