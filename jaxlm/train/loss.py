"""Next-token cross-entropy as (sum, denominator), so micro-batches add up to an exact token mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """logits: [batch, t, vocab] float32; targets, weights: [batch, t].

  Returns (nll_sum, z_sum, count): summed negative log-likelihood in nats over weighted tokens, the
  summed z-loss term z_loss * log(Z)^2 (PaLM), and the number of weighted tokens.
  """
  logits = logits.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, t]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll_sum = jnp.sum((log_z - target_logit) * w)
  z_sum = z_loss * jnp.sum(jnp.square(log_z) * w)
  return nll_sum, z_sum, jnp.sum(w)
