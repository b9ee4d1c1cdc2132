"""Building blocks: parameters with logical axis names, norms, embeddings and the MLP.

Parameters are created in `param_dtype` and cast to `compute_dtype` where they are used, so master
weights and optimizer state stay float32 while matmuls may run in bfloat16.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.parallel.rules import constrain, platform


def dtype(name: str):
  return jnp.dtype(name)


def matmul_dtype(cfg):
  """The operand dtype of the model's matmuls: model.matmul_dtype, defaulting to compute_dtype."""
  return dtype(cfg.matmul_dtype or cfg.compute_dtype)


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype_name: str) -> nnx.Param:
  """A normal(0, std) parameter (std 0: zeros) tagged with its logical axis names."""
  if std:
    value = jax.random.normal(rngs.params(), shape, dtype(dtype_name)) * std
  else:
    value = jnp.zeros(shape, dtype(dtype_name))
  return nnx.Param(value, out_sharding=tuple(axes))


def dense(x, w, contract: int = 1, out_dtype=None, dot_dtype=None, transpose_w: bool = False):
  """Contracts the last `contract` dims of x with the first of w, as ONE 2-D matmul.

  x: [..., *in], w: [*in, *out] -> [..., *out] in `out_dtype` (default x.dtype). Flattening to
  [rows, in] @ [in, out] matters on CPU: XLA's kernels for dot_generals with several free dims (and
  their weight gradients) ran ~15% slower per step at the default shape.
  transpose_w: w is [out, in] (a tied embedding used as the output projection), contract 1 only.
  dot_dtype: the operand dtype of the matmul. bfloat16 runs forward and backward matmuls on bf16
  operands with float32 accumulation, whatever the activations' dtype (`model.matmul_dtype`).
  """
  if transpose_w:
    lead, inner, outer = x.shape[:-1], w.shape[1:], w.shape[:1]
    w2 = w
  else:
    lead, inner, outer = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
    w2 = w.reshape(math.prod(inner), -1)
  rows = x.reshape(-1, math.prod(inner))
  if dot_dtype is not None and jnp.dtype(dot_dtype) != jnp.float32:
    static = (jnp.dtype(dot_dtype), rows.dtype, w2.dtype, transpose_w)
    out = low_precision_matmul(rows, w2, static).astype(out_dtype or x.dtype)
  else:
    out = jnp.matmul(rows, w2.T if transpose_w else w2, preferred_element_type=out_dtype)
  return out.reshape(*lead, *outer)


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _transposed(rows):
  """rows: [m, k] -> [k, m], materialised on CPU.

  XLA:CPU folds a plain transpose into the dot as a dim-0 contraction, which runs at about half
  speed for bf16 (no oneDNN bf16 kernel for that layout, and some fused layouts are not supported
  at all); a reshape-transpose-reshape is not folded, and the copy is cheap next to the matmul.
  Other backends take the plain transpose.
  """
  m, k = rows.shape
  if platform() != "cpu":
    return rows.T
  split = math.gcd(m, 16)
  return rows.reshape(split, m // split, k).transpose(2, 0, 1).reshape(k, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_matmul(x, w, static):
  """x: [m, k] @ w: [k, n] (or w: [n, k] when transposed) -> [m, n] float32, on bf16 operands.

  static: (operand dtype, x.dtype, w.dtype, w transposed). Products accumulate in float32. The
  custom VJP keeps the two backward matmuls on low-precision operands too (plain autodiff would
  multiply the float32 cotangent by a bf16 operand: an upcast float32 matmul), returns each
  cotangent in its primal's dtype, and saves the operands in low precision, halving what the
  backward pass keeps. Every matmul is in the canonical [m, k] . [k, n] or [m, k] . [n, k] form
  that XLA:CPU runs on oneDNN's bf16 kernels.
  """
  return _lpm_fwd(x, w, static)[0]


def _lpm_fwd(x, w, static):
  dot_dtype, _, _, transposed = static
  xl, wl = x.astype(dot_dtype), w.astype(dot_dtype)
  return _dot(xl, wl, 1, 1 if transposed else 0), (xl, wl)


def _lpm_bwd(static, res, g):  # g: [m, n]
  (xl, wl), (dot_dtype, x_dtype, w_dtype, transposed) = res, static
  g = g.astype(dot_dtype)
  if transposed:  # wl: [n, k]
    dx = _dot(g, wl, 1, 0)  # [m, n] . [n, k] -> [m, k]
    dw = _dot(_transposed(g), xl, 1, 0)  # [n, m] . [m, k] -> [n, k]
  else:  # wl: [k, n]
    dx = _dot(g, wl, 1, 1)  # [m, n] . [k, n] -> [m, k]
    dw = _dot(_transposed(xl), g, 1, 0)  # [k, m] . [m, n] -> [k, n]
  return dx.astype(x_dtype), dw.astype(w_dtype)


low_precision_matmul.defvjp(_lpm_fwd, _lpm_bwd)


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
    self.kind, self.cdt, self.mdt = cfg.mlp_kind, dtype(cfg.compute_dtype), matmul_dtype(cfg)
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
    up = dense(x, self.up[...].astype(c), dot_dtype=self.mdt)
    if self.use_bias:
      up = up + self.up_bias[...].astype(c)
    if self.kind == "gelu":
      h = jax.nn.gelu(up)
    else:
      gate = dense(x, self.gate[...].astype(c), dot_dtype=self.mdt)
      if self.use_bias:
        gate = gate + self.gate_bias[...].astype(c)
      act = jax.nn.silu if self.kind == "swiglu" else jax.nn.gelu
      h = act(gate) * up
    h = constrain(h, ("batch", "length", "mlp"))  # h: [batch, length, mlp]
    out = dense(h, self.down[...].astype(c), dot_dtype=self.mdt)
    if self.use_bias:
      out = out + self.down_bias[...].astype(c)
    return out
