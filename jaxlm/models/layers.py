"""Building blocks: parameters with logical axis names, norms, embeddings and the MLP.

Parameters are created in `param_dtype` and cast to `compute_dtype` where they are used, so master
weights and optimizer state stay float32 while matmuls may run in bfloat16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.parallel.rules import constrain


def dtype(name: str):
  return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype_name: str) -> nnx.Param:
  """A normal(0, std) parameter (std 0: zeros) tagged with its logical axis names."""
  if std:
    value = jax.random.normal(rngs.params(), shape, dtype(dtype_name)) * std
  else:
    value = jnp.zeros(shape, dtype(dtype_name))
  return nnx.Param(value, out_sharding=tuple(axes))


def dense(x, w, contract: int = 1, out_dtype=None):
  """Contracts the last `contract` dims of x with the first of w, as ONE 2-D matmul.

  x: [..., *in], w: [*in, *out] -> [..., *out]. Flattening to [rows, in] @ [in, out] matters on
  CPU: XLA's kernels for dot_generals with several free dims (and their weight gradients) ran
  ~15% slower per step at the default shape (benchmarks/train_throughput.py).
  """
  lead, inner, outer = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
  rows = x.reshape(-1, math.prod(inner))
  out = jnp.matmul(rows, w.reshape(math.prod(inner), -1), preferred_element_type=out_dtype)
  return out.reshape(*lead, *outer)


class Norm(nnx.Module):
  """RMSNorm (scale only) or LayerNorm (scale and bias), computed in float32."""

  def __init__(self, cfg, size: int, rngs: nnx.Rngs, axis_name: str = "embed"):
    self.kind, self.eps = cfg.norm_kind, cfg.norm_eps
    self.scale = nnx.Param(jnp.ones((size,), dtype(cfg.param_dtype)), out_sharding=(axis_name,))
    if self.kind == "layernorm":
      self.bias = nnx.Param(jnp.zeros((size,), dtype(cfg.param_dtype)), out_sharding=(axis_name,))

  def __call__(self, x):
    h = x.astype(jnp.float32)
    if self.kind == "layernorm":
      h = h - h.mean(-1, keepdims=True)
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps) * self.scale[...]
    if self.kind == "layernorm":
      h = h + self.bias[...]
    return h.astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU / GeGLU (gated, two input projections) or GELU (one), then a down projection."""

  def __init__(self, cfg, rngs: nnx.Rngs, out_std: float):
    self.kind, self.cdt = cfg.mlp_kind, dtype(cfg.compute_dtype)
    d, f, p = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    self.up = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, p)
    if self.kind != "gelu":
      self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, p)
    self.down = param(rngs, (f, d), ("mlp", "embed"), out_std, p)
    self.use_bias = cfg.mlp_bias
    if self.use_bias:
      self.up_bias = param(rngs, (f,), ("mlp",), 0, p)
      if self.kind != "gelu":
        self.gate_bias = param(rngs, (f,), ("mlp",), 0, p)
      self.down_bias = param(rngs, (d,), ("embed",), 0, p)

  def __call__(self, x):  # x: [batch, length, embed]
    c = self.cdt
    up = dense(x, self.up[...].astype(c))
    if self.use_bias:
      up = up + self.up_bias[...].astype(c)
    if self.kind == "gelu":
      h = jax.nn.gelu(up)
    else:
      gate = dense(x, self.gate[...].astype(c))
      if self.use_bias:
        gate = gate + self.gate_bias[...].astype(c)
      act = jax.nn.silu if self.kind == "swiglu" else jax.nn.gelu
      h = act(gate) * up
    h = constrain(h, ("batch", "length", "mlp"))  # h: [batch, length, mlp]
    out = dense(h, self.down[...].astype(c))
    if self.use_bias:
      out = out + self.down_bias[...].astype(c)
    return out
