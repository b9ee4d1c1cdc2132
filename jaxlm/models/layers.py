"""Building blocks: parameters with logical axis names, LoRA adapters, norms and the MLP.

Parameters are created in `compute.param_dtype` and cast to `compute.compute_dtype` where they are
used, so master weights and optimizer state stay float32 while matmuls may run in bfloat16.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import lora_targets
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


ADAPTERS = nnx.LoRAParam  # what LoRA trains (see Adapter)
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # every other parameter: all of them without LoRA


class ScoreParam(nnx.Param):
  """The weight of a scalar head on the final hidden state (a reward model's score, PPO's value).
  A training choice like LoRA's adapters, not part of the architecture: a model started from a
  language model (checkpoint.init_from) gets a fresh one, and exports drop it."""


# What a pretrained language model holds: every parameter but adapters and score heads.
PRETRAINED = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.Not(ScoreParam))

# posttrain.objective values whose model carries a score head, and its width.
SCORE_OBJECTIVES = {"reward": 1, "ppo": 1}


def score_outputs(config) -> int:
  """Width of the score head a full config's model carries (0: none)."""
  return SCORE_OBJECTIVES.get(config.posttrain.objective, 0)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections get LoRA adapters, their rank and alpha (static: part of the graphdef)."""
  rank: int
  alpha: float
  targets: tuple[str, ...]  # names from jaxlm.config.LORA_TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lora_spec(config) -> LoraSpec | None:
  """The LoraSpec of a full config's `lora` section; None when lora.rank is 0."""
  lo = config.lora
  if not lo.rank:
    return None
  return LoraSpec(int(lo.rank), float(lo.alpha), lora_targets(lo, config.model))


class Adapter(nnx.Module):
  """LoRA's low-rank update of one projection W [*in, *out]: x [..., *in] -> scale (x A) B.

  A: [*in, lora] normal(0, 1 / sqrt(fan_in)); B: [lora, *out] zeros, so a new adapter changes
  nothing; scale = alpha / rank. Both are nnx.LoRAParam (a subclass of nnx.Param) with W's logical
  axes plus "lora" (the rank dimension), so every walk over nnx.Param (sharding, checkpoints,
  decoding) includes them and `nnx.split(model, ADAPTERS, BASE)` separates them from the frozen
  base. Adapters are built inside the blocks, so scanned layers stack them [layers, ...] too.
  Training and merging them: jaxlm/posttrain/lora.py.
  """

  def __init__(self, spec: LoraSpec, weight: nnx.Param, contract: int, compute: Compute,
               rngs: nnx.Rngs):
    """weight: the projection's (one layer's) parameter; contract: how many leading dims are inputs."""
    shape, axes = weight.shape, tuple(weight.get_metadata()["out_sharding"])
    dtype, fan_in = compute.params, math.prod(shape[:contract])
    self.compute, self.scale, self.contract = compute, spec.scale, contract
    a = jax.random.normal(rngs.lora(), (*shape[:contract], spec.rank), dtype) * fan_in**-0.5
    self.a = nnx.LoRAParam(a, out_sharding=(*axes[:contract], "lora"))
    self.b = nnx.LoRAParam(jnp.zeros((spec.rank, *shape[contract:]), dtype),
                           out_sharding=("lora", *axes[contract:]))

  def __call__(self, x):  # x: [batch, t, *in] -> [batch, t, *out]
    cp = self.compute
    h = dense(x, self.a[...].astype(cp.activations), cp, contract=self.contract)  # [batch, t, lora]
    h = constrain(h, ("batch", "length", "lora"))
    return dense(h, self.b[...].astype(cp.activations), cp) * jnp.asarray(self.scale, h.dtype)


def adapter(lora: LoraSpec | None, name: str, weight: nnx.Param, compute: Compute,
            rngs: nnx.Rngs | None, contract: int = 1) -> Adapter | None:
  """An Adapter for projection `name` (q, k, v, o, up, gate, down) if `lora` targets it, else None."""
  if lora is None or name not in lora.targets:
    return None
  return Adapter(lora, weight, contract, compute, rngs)


def project(x, w: nnx.Param, lora: Adapter | None, compute: Compute, contract: int = 1,
            out_dtype=None):
  """x through projection w (see `dense`), plus its LoRA update when it has an adapter."""
  out = dense(x, w[...].astype(compute.activations), compute, contract, out_dtype)
  if lora is not None:
    out = out + lora(x).astype(out.dtype)
  return out


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
  """SwiGLU / GeGLU (gated, two input projections) or GELU (one), then a down projection.

  lora: which projections get adapters (drawn from lora_rngs), or None. mlp_dim: the hidden
  width, default model.mlp_dim (a MoE layer's shared experts have their own)."""

  def __init__(self, cfg, compute: Compute, rngs: nnx.Rngs, out_std: float,
               lora: LoraSpec | None = None, lora_rngs: nnx.Rngs | None = None,
               mlp_dim: int | None = None):
    self.kind, self.compute = cfg.mlp_kind, compute
    d, f, p = cfg.d_model, mlp_dim or cfg.mlp_dim, compute.params
    self.up = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, p)
    if self.kind != "gelu":
      self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, p)
    self.down = param(rngs, (f, d), ("mlp", "embed"), out_std, p)
    self.up_lora = adapter(lora, "up", self.up, compute, lora_rngs)
    if self.kind != "gelu":
      self.gate_lora = adapter(lora, "gate", self.gate, compute, lora_rngs)
    self.down_lora = adapter(lora, "down", self.down, compute, lora_rngs)
    self.use_bias = cfg.mlp_bias
    if self.use_bias:
      self.up_bias = param(rngs, (f,), ("mlp",), 0, p)
      if self.kind != "gelu":
        self.gate_bias = param(rngs, (f,), ("mlp",), 0, p)
      self.down_bias = param(rngs, (d,), ("embed",), 0, p)

  def __call__(self, x):  # x: [batch, length, embed]
    cp = self.compute
    c = cp.activations
    up = project(x, self.up, self.up_lora, cp)
    if self.use_bias:
      up = up + self.up_bias[...].astype(c)
    if self.kind == "gelu":
      h = jax.nn.gelu(up)
    else:
      gate = project(x, self.gate, self.gate_lora, cp)
      if self.use_bias:
        gate = gate + self.gate_bias[...].astype(c)
      act = jax.nn.silu if self.kind == "swiglu" else jax.nn.gelu
      h = act(gate) * up
    h = constrain(h, ("batch", "length", "mlp"))  # h: [batch, length, mlp]
    out = project(h, self.down, self.down_lora, cp)
    if self.use_bias:
      out = out + self.down_bias[...].astype(c)
    return out
