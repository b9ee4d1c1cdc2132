"""Rotary position embeddings (RoPE) and their context-extension scalings.

RoPE rotates each (i, i + head_dim/2) pair of query/key features by angle position * inv_freq[i], so
the dot product of a query and a key depends only on their position difference. The scalings change
inv_freq (and, for YaRN, the magnitude) so a model pretrained on `original_max_len` tokens can be
run on `factor` times longer sequences:
  linear: every frequency divided by factor (position interpolation).
  llama3: high frequencies kept, low frequencies divided by factor, a smooth ramp in between.
  yarn:   the same idea with the ramp placed by rotation counts (beta_fast/beta_slow), plus a
          logit temperature 0.1 * ln(factor) + 1 folded into cos/sin (DeepSeek's variant moves
          it: see model.yarn_mscale, model.yarn_mscale_all_dim and `yarn_score_scale`).
The half-split pairing (not interleaved) matches the Hugging Face Llama layout.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's magnitude factor 0.1 * mscale * ln(factor) + 1 (1 when the context is not stretched)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_score_scale(cfg) -> float:
  """The factor DeepSeek's MLA multiplies its softmax scale by: mscale(yarn_mscale_all_dim)**2
  under yarn with yarn_mscale_all_dim set, else 1."""
  if cfg.rope_scaling != "yarn" or not cfg.yarn_mscale_all_dim:
    return 1.0
  return yarn_mscale(cfg.rope_scaling_factor, cfg.yarn_mscale_all_dim) ** 2


def inverse_frequencies(cfg, head_dim: int) -> tuple[np.ndarray, float]:
  """Returns (inv_freq [head_dim // 2], magnitude scale) for the model config `cfg`."""
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  factor = cfg.rope_scaling_factor
  original = cfg.rope_original_max_len or cfg.max_seq_len
  if cfg.rope_scaling == "linear":
    inv = inv / factor
  elif cfg.rope_scaling == "llama3":
    wavelen = 2 * np.pi / inv
    low_wavelen = original / cfg.rope_low_freq_factor  # longer than this: fully scaled
    high_wavelen = original / cfg.rope_high_freq_factor  # shorter than this: untouched
    smooth = (original / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * inv / factor + smooth * inv
    inv = np.where(wavelen > low_wavelen, inv / factor, np.where(wavelen < high_wavelen, inv, blended))
  elif cfg.rope_scaling == "yarn":
    def dim_for(rotations):  # the feature index that makes `rotations` turns over the original context
      return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
    low = max(math.floor(dim_for(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(dim_for(cfg.yarn_beta_slow)), head_dim - 1)
    ramp = np.clip((np.arange(head_dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    inv = inv / factor * ramp + inv * (1 - ramp)  # ramp 0: keep (extrapolate), 1: interpolate
    magnitude = yarn_mscale(factor, cfg.yarn_mscale)
    if cfg.yarn_mscale_all_dim:  # DeepSeek: the rest of the temperature is in the softmax scale
      magnitude /= yarn_mscale(factor, cfg.yarn_mscale_all_dim)
    return inv.astype(np.float32), magnitude
  return inv.astype(np.float32), 1.0


def layer_frequencies(cfg, head_dim: int) -> dict[bool, tuple[np.ndarray, float]]:
  """{False: global layers' (inv_freq, scale), True: local layers'} (see model.layer_pattern).

  Local layers use the global RoPE unless model.rope_local_theta is set; then plain RoPE of that
  theta, never scaled (Gemma 3: rope_local_base_freq beside a scaled global RoPE).
  """
  glob = inverse_frequencies(cfg, head_dim)
  if not cfg.rope_local_theta:
    return {False: glob, True: glob}
  inv = 1.0 / (cfg.rope_local_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  return {False: glob, True: (inv.astype(np.float32), 1.0)}


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq, scale=1.0):
  """Rotates x: [batch, length, heads, head_dim] by positions: [batch, length].
  inv_freq: [head_dim / 2]; scale: a float or a traced scalar (a scanned layer's own RoPE)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, length, head_dim/2]
  cos = (jnp.cos(angles) * scale)[:, :, None, :]
  sin = (jnp.sin(angles) * scale)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
