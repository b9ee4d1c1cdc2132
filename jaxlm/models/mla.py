"""Multi-head latent attention (MLA, DeepSeek-V2/V3): keys and values from one small latent a token.

Per token, one projection kv_a [embed, kv_lora_rank + rope] gives a latent c (RMS-normalised) and
one RoPE key k_rope shared by every head; kv_b [kv_lora_rank, heads, nope + v] expands c into each
head's key features without RoPE (k_nope) and its value. Queries come from x directly ([embed,
heads, nope + rope]) or, with q_lora_rank, through a bottleneck q_a [embed, q_lora_rank] ->
RMSNorm -> q_b [q_lora_rank, heads, nope + rope]. A head's key is [k_nope, k_rope], its query
[q_nope, RoPE(q_rope)], and scores are scaled by (nope + rope)**-0.5 (times DeepSeek's YaRN factor,
rope.yarn_score_scale). The output projection o reads [heads, v].

Two forms of the same function:
  expanded (training, prefill-free forward): K/V expanded per head from the latent, then ordinary
    attention (the xla reference or a kernel, see `MLA.__call__`);
  absorbed (every call with a cache): the cache keeps only c and k_rope, kv_lora_rank + rope values
    per token and layer. kv_b's key part is folded into the query (q_nope W_uk: [heads, latent]),
    scores are taken against c itself, the probabilities weight c, and kv_b's value part is applied
    once to the weighted latent. No per-head key or value is ever built from the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.kernels.masking import MASKED
from jaxlm.models import attention_kernels, rope
from jaxlm.models.attention import causal_blocked_attention, dot_product_attention, write_layer_cache
from jaxlm.models.compute import Compute
from jaxlm.models.layers import LoraSpec, Norm, adapter, param, project
from jaxlm.parallel.rules import constrain

def dims(cfg) -> tuple[int, int, int, int]:
  """(nope, rope, v, kv_lora_rank) of config.model `cfg`."""
  return cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank


def score_scale(cfg) -> float:
  """(qk_nope_head_dim + qk_rope_head_dim)**-0.5, times DeepSeek's YaRN adjustment."""
  return (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * rope.yarn_score_scale(cfg)


def init_cache(cfg, batch: int, max_len: int, dtype) -> dict:
  """{"latent": [layers, batch, max_len, kv_lora_rank], "k_rope": [layers, batch, max_len, rope]}:
  kv_lora_rank + qk_rope_head_dim values per token and layer (slots at axis 2, as
  attention.CACHE_SLOT_AXES says). The width is innermost, so the scores contract it without a
  transpose; the weighted sum, which contracts S, reads the same array (one copy of the latent)."""
  lead = (cfg.num_layers, batch, max_len)
  return {"latent": jnp.zeros((*lead, cfg.kv_lora_rank), dtype),
          "k_rope": jnp.zeros((*lead, cfg.qk_rope_head_dim), dtype)}


def expand(latent, k_rope, kv_b, nope: int):
  """The expanded form's keys and values. latent: [batch, s, kv_lora_rank] (normalised); k_rope:
  [batch, s, rope] (rotated); kv_b: [kv_lora_rank, heads, nope + v].

  Returns k: [batch, s, heads, nope + rope] (k_rope repeated on every head), v: [batch, s, heads, v]."""
  kv = jnp.einsum("bsr,rhd->bshd", latent, kv_b, preferred_element_type=jnp.float32)
  kv = kv.astype(latent.dtype)
  k_nope, v = kv[..., :nope], kv[..., nope:]
  shared = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], k_rope.shape[-1]))
  return jnp.concatenate([k_nope, shared], axis=-1), v


def absorbed_attention(q_latent, q_rope, latent, k_rope, cache_latent, cache_k_rope, q_slots,
                       start, scale: float):
  """t new queries over an MLA cache and over the t new entries themselves, in the absorbed form.

  q_latent: [batch, t, heads, kv_lora_rank] (q_nope already through kv_b's key part); q_rope:
  [batch, t, heads, rope] (rotated); latent, k_rope: [batch, t, kv_lora_rank | rope] the new
  entries at q_slots [batch, t]; cache_latent, cache_k_rope: [batch, S, kv_lora_rank | rope] as
  they were before this call. Cache slot s of row b is seen iff s < start[b] (as in
  attention.cached_attention, also for new entries of length 0 already in the cache). Returns the
  probability-weighted latent [batch, t, heads, kv_lora_rank] (float32), which kv_b's value part
  turns into each head's output.
  """
  b, t = q_latent.shape[:2]
  size = cache_latent.shape[1]

  def scores(lat, kr):  # over keys [batch, s, ...] -> [batch, heads, t, s]
    return (jnp.einsum("bthr,bsr->bhts", q_latent, lat, preferred_element_type=jnp.float32)
            + jnp.einsum("bthd,bsd->bhts", q_rope, kr, preferred_element_type=jnp.float32))

  s = jnp.concatenate([scores(cache_latent, cache_k_rope), scores(latent, k_rope)], -1) * scale
  cache_slots = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (b, size))
  tk = latent.shape[1]  # t, or 0 when the cache holds the new entries already
  k_slots = jnp.concatenate([cache_slots, q_slots[:, :tk]], axis=1)  # [batch, S + tk]
  filled = jnp.concatenate([cache_slots < start[:, None], jnp.ones((b, tk), bool)], axis=1)
  mask = (q_slots[:, :, None] >= k_slots[:, None, :]) & filled[:, None, :]  # [batch, t, S + tk]
  probs = jax.nn.softmax(jnp.where(mask[:, None], s, MASKED), axis=-1).astype(latent.dtype)
  return (jnp.einsum("bhts,bsr->bthr", probs[..., :size], cache_latent,
                     preferred_element_type=jnp.float32)
          + jnp.einsum("bhts,bsr->bthr", probs[..., size:], latent, preferred_element_type=jnp.float32))


def kernel_attention(cfg, compute: Compute, q, k, v, segments, scale: float):
  """The expanded form through an attention kernel, whose query/key and value widths must be one D:
  q and k are zero-padded to D = max(nope + rope, v) and v likewise (zeros add nothing to a score
  or an output), the kernel's own D**-0.5 is replaced by `scale` on q, and the output is cut back
  to v's width. q, k: [batch, t, heads, nope + rope]; v: [batch, t, heads, v]."""
  dq, dv = q.shape[-1], v.shape[-1]
  d = max(dq, dv)

  def pad(x):
    return x if x.shape[-1] == d else jnp.pad(x, ((0, 0),) * 3 + ((0, d - x.shape[-1]),))

  q = q * jnp.asarray(scale * d**0.5, q.dtype)
  out = attention_kernels.self_attention(cfg, compute, pad(q), pad(k), pad(v), segments, 0)
  return out[..., :dv]


class MLA(nnx.Module):
  """Multi-head latent attention (module doc). lora: adapters for the output projection `o` only
  (config checks refuse q, k, v targets under MLA)."""

  def __init__(self, cfg, compute: Compute, rngs: nnx.Rngs, out_std: float,
               lora: LoraSpec | None = None, lora_rngs: nnx.Rngs | None = None):
    self.cfg, self.compute = cfg, compute
    d, h = cfg.d_model, cfg.num_heads
    nope, rp, dv, r = dims(cfg)
    p, std = compute.params, cfg.init_std
    if cfg.q_lora_rank:
      self.q_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "latent"), std, p)
      self.q_a_norm = Norm(cfg, compute, cfg.q_lora_rank, rngs, axis_name="latent")
      self.q_b = param(rngs, (cfg.q_lora_rank, h, nope + rp), ("latent", "heads", "head_dim"), std, p)
    else:
      self.q = param(rngs, (d, h, nope + rp), ("embed", "heads", "head_dim"), std, p)
    self.kv_a = param(rngs, (d, r + rp), ("embed", "latent"), std, p)
    self.kv_a_norm = Norm(cfg, compute, r, rngs, axis_name="latent")
    self.kv_b = param(rngs, (r, h, nope + dv), ("latent", "heads", "head_dim"), std, p)
    self.o = param(rngs, (h, dv, d), ("heads", "head_dim", "embed"), out_std, p)
    self.o_lora = adapter(lora, "o", self.o, compute, lora_rngs, contract=2)
    inv_freq, magnitude = rope.inverse_frequencies(cfg, rp)
    self.rope = (tuple(inv_freq.tolist()), magnitude)  # static, hashable: not a parameter
    self.score_scale = score_scale(cfg)

  def _rope(self, x, positions):  # x: [batch, t, heads, rope]
    inv_freq, magnitude = self.rope
    return rope.apply_rope(x, positions, jnp.asarray(inv_freq, jnp.float32), magnitude)

  def project_in(self, x, positions):
    """x: [batch, t, embed] -> (q_nope [batch, t, heads, nope], q_rope [batch, t, heads, rope]
    rotated, latent [batch, t, kv_lora_rank] normalised, k_rope [batch, t, rope] rotated)."""
    cfg, cp = self.cfg, self.compute
    nope, _, _, r = dims(cfg)
    if cfg.q_lora_rank:
      cq = constrain(self.q_a_norm(project(x, self.q_a, None, cp)), ("batch", "length", "latent"))
      q = project(cq, self.q_b, None, cp)  # [batch, t, heads, nope + rope]
    else:
      q = project(x, self.q, None, cp)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    ckv = project(x, self.kv_a, None, cp)  # [batch, t, kv_lora_rank + rope]
    latent = constrain(self.kv_a_norm(ckv[..., :r]), ("batch", "length", "latent"))
    k_rope = self._rope(ckv[..., None, r:], positions)[:, :, 0]
    return q[..., :nope], self._rope(q[..., nope:], positions), latent, k_rope

  def __call__(self, x, positions, slots, segment_ids=None, cache=None, cache_index=None, local=None):
    """As attention.Attention.__call__, with this layer's cache {"latent": [batch, S,
    kv_lora_rank], "k_rope": [batch, S, rope]} and new entries of the same names ([batch, t, ...];
    unscanned layers return their cache with them written). local is unused: MLA layers are all
    global (config checks)."""
    del local
    cfg, cp = self.cfg, self.compute
    c, mdt = cp.activations, cp.matmul
    nope = cfg.qk_nope_head_dim
    q_nope, q_rope, latent, k_rope = self.project_in(x, positions)
    kv_b = self.kv_b[...].astype(c)  # [kv_lora_rank, heads, nope + v]
    if cache is not None:  # decoding: the absorbed form over the latent cache
      cdt = cache["latent"].dtype
      q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, kv_b[..., :nope],
                            preferred_element_type=jnp.float32)
      q_latent = constrain(q_latent.astype(cdt), ("batch", "length", "heads", "latent"))
      latent, k_rope = latent.astype(cdt), k_rope.astype(cdt)
      start, new = cache_index, {"latent": latent, "k_rope": k_rope}
      if not cp.scan_layers:  # this layer's own buffers: write, then read (see Attention)
        cache = new = write_layer_cache(cache, new, cache_index)
        latent, k_rope, start = latent[:, :0], k_rope[:, :0], cache_index + latent.shape[1]
      weighted = absorbed_attention(q_latent, q_rope.astype(cdt), latent, k_rope, cache["latent"],
                                    cache["k_rope"], slots, start, self.score_scale)
      out = jnp.einsum("bthr,rhv->bthv", weighted.astype(c), kv_b[..., nope:],
                       preferred_element_type=jnp.float32).astype(c)  # [batch, t, heads, v]
      out = project(out, self.o, self.o_lora, cp, contract=2, out_dtype=c)
      return out, new
    k, v = expand(latent.astype(mdt), k_rope.astype(mdt), kv_b.astype(mdt), nope)
    q = jnp.concatenate([q_nope, q_rope], -1).astype(mdt)  # [batch, t, heads, nope + rope]
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", None, "heads", "head_dim"))  # whole along length (see Attention)
    v = constrain(v, ("batch", None, "heads", "head_dim"))
    if cp.attention != "xla":
      out = kernel_attention(cfg, cp, q, k, v, segment_ids, self.score_scale)
    elif cp.attention_blocks > 1:
      out = causal_blocked_attention(q, k, v, segment_ids, cp.attention_blocks,
                                     scale=self.score_scale)
    else:
      out = dot_product_attention(q, k, v, slots, slots, segment_ids, segment_ids,
                                  scale=self.score_scale)
    out = project(out, self.o, self.o_lora, cp, contract=2, out_dtype=c)  # [batch, t, embed]
    return out, cache

