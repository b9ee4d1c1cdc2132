"""AdamW with a learning-rate schedule, global-norm clipping and a weight-decay mask (optax)."""

from __future__ import annotations

import jax
import optax

# Parameters whose leaf name is listed never decay: norm scales and biases (they set scales and
# offsets, not features), and embedding tables unless train.decay_embeddings is set.
_NEVER_DECAY = ("scale", "bias")
_EMBEDDINGS = ("embed", "pos_embed")


def schedule(t) -> optax.Schedule:
  """Linear warmup to train.learning_rate, then cosine / linear / WSD decay or constant."""
  peak, end = t.learning_rate, t.learning_rate * t.min_lr_ratio
  warm = optax.linear_schedule(0.0, peak, max(t.warmup_steps, 1))
  rest = max(t.steps - t.warmup_steps, 1)
  if t.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=t.min_lr_ratio)
  elif t.schedule == "linear":
    after = optax.linear_schedule(peak, end, rest)
  elif t.schedule == "wsd":  # warmup-stable-decay: hold the peak, then decay over the last fraction
    decay = max(int(t.steps * t.wsd_decay_fraction), 1)
    after = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [max(rest - decay, 0)])
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warm, after], [t.warmup_steps])


def decay_mask(params, decay_embeddings: bool):
  """True for the parameters that weight decay applies to, from each leaf's name."""
  def decays(path, _):
    name = [str(k.key) for k in path if hasattr(k, "key")][-1]  # the leaf's own name
    if name in _NEVER_DECAY or name.endswith("_bias"):
      return False
    return decay_embeddings or name not in _EMBEDDINGS
  return jax.tree_util.tree_map_with_path(decays, params)


def optimizer_parts(t) -> tuple:
  """(clip_by_global_norm, adamw) or (adamw,) without clipping; t = config.train. The chain of them
  is the optimizer; jaxlm/train/offload.py applies them one at a time."""
  parts = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm else []
  parts.append(optax.adamw(
      schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
      mask=lambda p: decay_mask(p, t.decay_embeddings)))
  return tuple(parts)


def make_optimizer(t) -> optax.GradientTransformation:
  """t = config.train."""
  return optax.chain(*optimizer_parts(t))
