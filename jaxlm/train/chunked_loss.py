"""Next-token cross-entropy computed chunk by chunk of the sequence, so the float32 logits of the
whole batch [batch, seq, vocab] never exist at once, in the forward pass or the backward.

For a large vocabulary the logits are the biggest activation of a step: Llama-3.1-8B's 128256 ids
at 4 rows x 8192 tokens a chip are 16.8 GB of float32, and their gradient as much again. Here the
final hidden state [batch, seq, embed] (a 31x smaller array at d_model 4096) is cut into
seq / chunk pieces; a `lax.scan` runs the head on one piece at a time and keeps only its
logsumexp, target logit and their weighted sums. Each piece is a `jax.checkpoint`: the backward
pass recomputes that piece's logits from its hidden state and turns them into gradients at once,
so at most one chunk's logits (and their gradient) is alive. Cost: the head's forward matmul runs
twice (about a third more head FLOPs).

Chunks are strided, not contiguous: chunk j holds positions j, j + n, j + 2n, ... (n chunks). A
sequence split in contiguous blocks over the `sequence` mesh axis then keeps every chunk spread
over all of its shards (when the chunk size divides by them), so no piece moves between devices.
Under tensor parallelism the head's logits stay sharded over `vocab` (the rules table); the
logsumexp and the target logit are reductions over that axis, which the partitioner splits into
per-shard partial sums, so no device holds a whole vocabulary row either. The target logit is a
masked sum rather than a gather for the same reason.

The numbers are those of loss.cross_entropy on the full logits, up to float32 summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_sums(head, x, targets, weights):
  """x: [batch, c, embed]; targets, weights: [batch, c] -> (nll sum, log(Z)^2 sum), float32."""
  logits = head(x).astype(jnp.float32)  # [batch, c, vocab]
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, c]
  ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  target_logit = jnp.sum(jnp.where(ids == targets[..., None], logits, 0.0), axis=-1)  # [batch, c]
  w = weights.astype(jnp.float32)
  return jnp.sum((log_z - target_logit) * w), jnp.sum(jnp.square(log_z) * w)


def strided_chunks(a, chunk: int):
  """a: [batch, seq, ...] -> [seq / chunk, batch, chunk, ...]: piece j holds positions j, j + n, ..."""
  b, t = a.shape[:2]
  n = t // chunk
  return jnp.moveaxis(a.reshape(b, chunk, n, *a.shape[2:]), 2, 0)


def chunked_cross_entropy(head, x, targets, weights, z_loss: float, chunk: int):
  """head: x [batch, c, embed] -> logits [batch, c, vocab] (the model's head: final norm, unembed,
  soft-cap, padded ids masked); x: [batch, seq, embed], the hidden state before the head;
  targets, weights: [batch, seq]; chunk: tokens of the sequence per piece (divides seq).

  Returns (nll_sum, z_sum, count), as loss.cross_entropy does on head(x)."""
  t = x.shape[1]
  if chunk <= 0 or t % chunk:
    raise ValueError(f"loss chunk {chunk} must be > 0 and divide the sequence length {t}")
  sums = jax.checkpoint(lambda x, targets, weights: _chunk_sums(head, x, targets, weights))

  def body(carry, piece):
    nll, zsq = sums(*piece)
    return (carry[0] + nll, carry[1] + zsq), None

  zero = jnp.zeros((), jnp.float32)
  pieces = tuple(strided_chunks(a, chunk) for a in (x, targets, weights))
  (nll_sum, zsq_sum), _ = jax.lax.scan(body, (zero, zero), pieces)
  return nll_sum, z_loss * zsq_sum, jnp.sum(weights.astype(jnp.float32))
