"""Choosing the next token from a model's logits: greedy, or sampled after top-k / top-p / min-p.

Everything here is pure and jittable. The filter hyperparameters (`temperature`, `top_k`, `top_p`,
`min_p`) are Python scalars, static under jit: a filter that is off costs nothing at run time, and
`lax.top_k` needs a static k anyway. A new setting compiles a new program, which is fine for
generation (one setting per run).

Semantics, in the order they are applied:
  1. temperature: logits / temperature (0: greedy argmax, no filter and no randomness).
  2. top_k (0 off): keep tokens whose logit >= the k-th largest logit. Tokens tied with the k-th
     are all kept, so the result never depends on vocabulary order (it may hold more than k).
  3. top_p (1 off): keep the smallest set of most likely tokens whose probability (renormalized
     over the survivors of 2) reaches top_p; the top token is always kept, and tokens tied with
     the least likely kept token are kept too.
  4. min_p (0 off): keep tokens with prob >= min_p * (max prob). Renormalizing over survivors does
     not change this ratio, so its place in the order does not matter.
Filtered-out tokens get logit -inf; a token whose logit is already -inf stays unreachable.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check(top_k: int, top_p: float, min_p: float) -> None:
  """Rejects settings that would filter out every token (NaN sampling) or make no sense."""
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")
  if not 0 <= min_p <= 1:
    raise ValueError(f"min_p must be in [0, 1] (0: off), got {min_p}")


def _top_k(logits, k: int):
  """logits: [batch, vocab]. Threshold at the k-th largest logit, keeping ties with it."""
  kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [batch, 1]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def _top_p(logits, p: float):
  """logits: [batch, vocab]. Nucleus filter, turned into a logit threshold so ties are kept."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [batch, vocab], descending
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  cumulative = jnp.cumsum(sorted_probs, axis=-1)
  # mass of the strictly more likely tokens; 0 for the top token, so it is always kept
  mass_before = jnp.concatenate([jnp.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)
  kept = mass_before < p  # [batch, vocab] in sorted order: a prefix
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # [batch, 1]
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _min_p(logits, min_p: float):
  """logits: [batch, vocab]. prob >= min_p * max prob  <=>  logit >= max logit + log(min_p)."""
  threshold = jnp.max(logits, axis=-1, keepdims=True) + math.log(min_p)  # [batch, 1]
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
  """logits: [batch, vocab] float32 -> same shape, disallowed tokens set to -inf.

  Applies top_k, then top_p, then min_p (see the module docstring); a filter at its "off" value
  (0, 1, 0) is skipped at trace time.
  """
  _check(top_k, top_p, min_p)
  logits = logits.astype(jnp.float32)
  if 0 < top_k < logits.shape[-1]:
    logits = _top_k(logits, top_k)
  if top_p < 1:
    logits = _top_p(logits, top_p)
  if min_p > 0:
    logits = _min_p(logits, min_p)
  return logits


def sample_token(key, logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0):
  """logits: [batch, vocab] -> next tokens [batch] int32.

  temperature 0 is greedy (argmax; the filters cannot change the argmax, so they are skipped).
  Otherwise the logits are scaled by 1 / temperature *before* filtering, so top_p and min_p see
  the distribution that is actually sampled from.
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
  if temperature == 0:
    _check(top_k, top_p, min_p)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / temperature
  filtered = filter_logits(scaled, top_k, top_p, min_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
