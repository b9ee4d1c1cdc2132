"""A matmul on low-precision operands with float32 accumulation, forward and backward.

`low_precision_matmul(x, w, static)` is what the model's projections run when `compute.matmul_dtype`
is narrower than float32. Plain autodiff of a bf16 matmul would multiply the float32 cotangent by a
bf16 operand (an upcast float32 matmul); the custom VJP keeps both backward matmuls on
low-precision operands, returns each cotangent in its primal's dtype, and saves the operands in low
precision, halving what the backward pass keeps.

Every matmul is in the canonical [m, k] . [k, n] or [m, k] . [n, k] form that XLA:CPU runs on
oneDNN's bf16 kernels. XLA:CPU folds a plain transpose into the dot as a dim-0 contraction, which
runs at about half speed for bf16 (no oneDNN kernel for that layout); with `copy_transposes` the
weight-gradient operand is transposed by a reshape-transpose-reshape that XLA does not fold. The
caller decides (the platform is its knowledge, not this function's): other backends take the plain
transpose.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MatmulSpec(NamedTuple):
  """The static part of one call; hashable."""
  operand_dtype: jnp.dtype
  x_dtype: jnp.dtype
  w_dtype: jnp.dtype
  w_transposed: bool  # w is [n, k] (a tied embedding used as the output projection)
  copy_transposes: bool


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _transposed(rows, copy: bool):
  """rows: [m, k] -> [k, m]; materialised when `copy` (see the module docstring)."""
  if not copy:
    return rows.T
  m, k = rows.shape
  split = math.gcd(m, 16)
  return rows.reshape(split, m // split, k).transpose(2, 0, 1).reshape(k, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_matmul(x, w, spec: MatmulSpec):
  """x: [m, k] @ w: [k, n] (or w: [n, k] when spec.w_transposed) -> [m, n] float32."""
  return _fwd(x, w, spec)[0]


def _fwd(x, w, spec):
  xl, wl = x.astype(spec.operand_dtype), w.astype(spec.operand_dtype)
  return _dot(xl, wl, 1, 1 if spec.w_transposed else 0), (xl, wl)


def _bwd(spec, res, g):  # g: [m, n]
  xl, wl = res
  g = g.astype(spec.operand_dtype)
  if spec.w_transposed:  # wl: [n, k]
    dx = _dot(g, wl, 1, 0)  # [m, n] . [n, k] -> [m, k]
    dw = _dot(_transposed(g, spec.copy_transposes), xl, 1, 0)  # [n, m] . [m, k] -> [n, k]
  else:  # wl: [k, n]
    dx = _dot(g, wl, 1, 1)  # [m, n] . [k, n] -> [m, k]
    dw = _dot(_transposed(xl, spec.copy_transposes), g, 1, 0)  # [k, m] . [m, n] -> [k, n]
  return dx.astype(spec.x_dtype), dw.astype(spec.w_dtype)


low_precision_matmul.defvjp(_fwd, _bwd)
