"""Building blocks: parameters with logical axis names, norms and the MLP.

Parameters are created in `compute.param_dtype` and cast to `compute.compute_dtype` where they are
used, so master weights and optimizer state stay float32 while matmuls may run in bfloat16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.kernels.matmul import MatmulSpec, low_precision_matmul
from jaxlm.models.compute import Compute
from jaxlm.parallel.rules import constrain


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  """A normal(0, std) parameter (std 0: zeros) tagged with its logical axis names."""
  if std:
    value = jax.random.normal(rngs.params(), shape, dtype) * std
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, out_sharding=tuple(axes))


def dense(x, w, compute: Compute, contract: int = 1, out_dtype=None, transpose_w: bool = False):
  """Contracts the last `contract` dims of x with the first of w, as ONE 2-D matmul.

  x: [..., *in], w: [*in, *out] -> [..., *out] in `out_dtype` (default x.dtype). Flattening to
  [rows, in] @ [in, out] matters on CPU: XLA's kernels for dot_generals with several free dims (and
  their weight gradients) ran ~15% slower per step at the default shape.
  transpose_w: w is [out, in] (a tied embedding used as the output projection), contract 1 only.
  Operands are compute.matmul (low precision runs jaxlm.kernels.matmul), accumulation float32.
  """
  if transpose_w:
    lead, inner, outer = x.shape[:-1], w.shape[1:], w.shape[:1]
    w2 = w
  else:
    lead, inner, outer = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
    w2 = w.reshape(math.prod(inner), -1)
  rows = x.reshape(-1, math.prod(inner))
  if compute.matmul != jnp.float32:
    spec = MatmulSpec(compute.matmul, rows.dtype, w2.dtype, transpose_w, compute.copy_transposes)
    out = low_precision_matmul(rows, w2, spec).astype(out_dtype or x.dtype)
  else:
    out = jnp.matmul(rows, w2.T if transpose_w else w2, preferred_element_type=out_dtype)
  return out.reshape(*lead, *outer)


class Norm(nnx.Module):
  """RMSNorm (scale only) or LayerNorm (scale and bias), computed in float32.

  With model.norm_plus_one the stored `scale` is w (zeros at init) and the norm multiplies by
  (1 + w) in float32 (Gemma); otherwise it stores the multiplier itself (ones at init).
  """

  def __init__(self, cfg, compute: Compute, size: int, rngs: nnx.Rngs, axis_name: str = "embed"):
    self.kind, self.eps, self.plus_one = cfg.norm_kind, cfg.norm_eps, cfg.norm_plus_one
    init = jnp.zeros if self.plus_one else jnp.ones
    self.scale = nnx.Param(init((size,), compute.params), out_sharding=(axis_name,))
    if self.kind == "layernorm":
      self.bias = nnx.Param(jnp.zeros((size,), compute.params), out_sharding=(axis_name,))

  def __call__(self, x):
    h = x.astype(jnp.float32)
    if self.kind == "layernorm":
      h = h - h.mean(-1, keepdims=True)
    scale = self.scale[...].astype(jnp.float32)
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps)
    h = h * (1 + scale if self.plus_one else scale)
    if self.kind == "layernorm":
      h = h + self.bias[...]
    return h.astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU / GeGLU (gated, two input projections) or GELU (one), then a down projection."""

  def __init__(self, cfg, compute: Compute, rngs: nnx.Rngs, out_std: float):
    self.kind, self.compute = cfg.mlp_kind, compute
    d, f, p = cfg.d_model, cfg.mlp_dim, compute.params
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
    cp = self.compute
    c = cp.activations
    up = dense(x, self.up[...].astype(c), cp)
    if self.use_bias:
      up = up + self.up_bias[...].astype(c)
    if self.kind == "gelu":
      h = jax.nn.gelu(up)
    else:
      gate = dense(x, self.gate[...].astype(c), cp)
      if self.use_bias:
        gate = gate + self.gate_bias[...].astype(c)
      act = jax.nn.silu if self.kind == "swiglu" else jax.nn.gelu
      h = act(gate) * up
    h = constrain(h, ("batch", "length", "mlp"))  # h: [batch, length, mlp]
    out = dense(h, self.down[...].astype(c), cp)
    if self.use_bias:
      out = out + self.down_bias[...].astype(c)
    return out
