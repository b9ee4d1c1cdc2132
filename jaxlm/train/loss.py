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


# Sums of MoE statistics the train step keeps whole (not divided by the token count): per layer
# assignments per expert [moe layers, experts] and dropped assignments [moe layers].
MOE_COUNTS = ("moe_load", "moe_dropped")


def moe_terms(stats: dict, count, balance_coef: float, z_coef: float):
  """A MoE model's router terms for one batch (stats: jaxlm.models.moe.collect_stats' dict).

  Returns (loss sum, metric sums): balance_coef x the load-balancing loss plus z_coef x the router
  z-loss, each summed over MoE layers, times count, so that dividing by the global token count as
  the step does gives their token-weighted mean over micro-batches; the metric sums are the
  layer-mean unweighted losses (times count) and the MOE_COUNTS."""
  loss = count * (balance_coef * jnp.sum(stats["balance"]) + z_coef * jnp.sum(stats["z"]))
  return loss, {"moe/balance_loss": count * jnp.mean(stats["balance"]),
                "moe/router_z_loss": count * jnp.mean(stats["z"]),
                "moe_load": stats["load"], "moe_dropped": stats["dropped"]}
