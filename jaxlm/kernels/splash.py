"""attention="splash": JAX's own TPU splash-attention kernel in the model's layout.

`jax.experimental.pallas.ops.tpu.splash_attention` takes per-example, head-major arrays
(q [heads, t, head_dim], k/v [kv_heads, s, head_dim]) and a static mask object from which it
precomputes, in numpy, which blocks to skip. Its conventions, and what this wrapper does about them:
  * it does not scale scores: q is multiplied by head_dim**-0.5 here, before the kernel;
  * GQA is native: its MHA kernel maps query head i to KV head i // (heads // kv_heads), the same
    grouping as jaxlm's, so K/V are never repeated;
  * masks are per query head (MultiHeadMask) over (query position, key position); a window is a
    LocalMask whose (left, right) sizes count keys besides the diagonal, hence window - 1;
  * segment ids (SegmentIds(q, kv), per example) are and-ed with the mask; a query row with no
    visible key is undefined there, which self-attention with its own segment never produces;
  * the soft cap is `attn_logits_soft_cap`: cap * tanh(scores / cap), as in jaxlm;
  * block sizes must divide the sequence lengths, and key blocks are multiples of 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

DEFAULT_BLOCK = 512  # as flash's TPU default: a 1 MiB f32 score tile that fits v5e's scoped VMEM


def _pick(requested: int | None, length: int, what: str) -> int:
  size = requested or min(DEFAULT_BLOCK, length)
  if length % size or size % 128:
    raise ValueError(f"splash attention: {what} {size} must be a multiple of 128 that divides the "
                     f"sequence length {length}; pad the sequence or choose another block")
  return size


def _kernel(t: int, s: int, heads: int, causal: bool, window: int, softcap: float, block_q: int,
            block_kv: int, interpret: bool):
  """The kernel object for one shape and mask.

  Not cached across calls: it holds the block tables as arrays, and arrays made during one jit trace
  (a forward step) and reused in another (its gradient) become extra inputs of the second's
  ahead-of-time compiled executable (jax 0.10), which then cannot be called with its own arguments."""
  if window:
    mask = sa.LocalMask((t, s), (window - 1, 0 if causal else window - 1), offset=0)
  elif causal:
    mask = sa.CausalMask((t, s))
  else:
    mask = sa.FullMask((t, s))
  blocks = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                         block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                         block_q_dq=block_q, block_kv_dq=block_kv)
  return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                            q_seq_shards=1, attn_logits_soft_cap=softcap or None, interpret=interpret)


def splash_attention(q, k, v, segments=None, *, causal: bool = True, window: int = 0,
                     softcap: float = 0.0, block_q: int | None = None, block_kv: int | None = None,
                     interpret: bool = False):
  """Splash attention. q: [batch, t, heads, head_dim]; k, v: [batch, s, kv_heads, head_dim].

  segments: [batch, t] int or None (self-attention only: needs t == s). causal, window and softcap
  mean what they mean in `flash_attention`. block_q / block_kv (None: min(512, length)) divide t / s
  and are multiples of 128; they serve the forward and both backward kernels. interpret=True runs
  the kernels under Pallas' interpreter (CPU). Returns [batch, t, heads, head_dim] in q's dtype.
  """
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  if h % kvh:
    raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kvh})")
  if segments is not None and t != s:
    raise ValueError("splash attention takes segment ids for self-attention only (t == s)")
  kernel = _kernel(t, s, h, bool(causal), int(window), float(softcap), _pick(block_q, t, "block_q"),
                   _pick(block_kv, s, "block_kv"), bool(interpret))
  q = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
  head_major = lambda x: jnp.swapaxes(x, 1, 2)
  args = (head_major(q), head_major(k.astype(q.dtype)), head_major(v.astype(q.dtype)))
  if segments is None:
    out = jax.vmap(kernel)(*args)
  else:
    segments = segments.astype(jnp.int32)
    out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=sa.SegmentIds(seg, seg)))(*args, segments)
  return jnp.swapaxes(out, 1, 2)
