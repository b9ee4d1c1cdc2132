"""How a Transformer computes, resolved for one platform: `Compute`, built from `config.compute`.

The architecture (`config.model`) says what function the model is; `Compute` says how this run
evaluates it: dtypes, the layer loop, recompute, which attention implementation and kernel backend,
how queries are laid out under sequence parallelism. A model built with any `Compute` has the same
parameters (up to stacking, see scan_layers) and, within floating-point tolerance, the same outputs.

`resolve(config.compute, platform, sequence_shards)` turns the config's choices ("auto" included)
into concrete ones for the platform the model will run on. The caller knows that platform (the
mesh's devices: abstract TPU devices when planning on a CPU host); model code never asks.
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp

from jaxlm.config import ConfigError
from jaxlm.kernels import flash_gpu
from jaxlm.kernels.flash_attention import backend_for_platform

log = logging.getLogger(__name__)

# compute.attention="auto" picks, per platform, the implementation benchmarks/attention.py measured
# fastest on that hardware. No accelerator measurement exists yet, so these are the well-kept
# libraries' kernels; jaxlm's own flash kernels stay one flag away (compute.attention=flash).
AUTO_ATTENTION = {"tpu": "splash", "gpu": "cudnn", "cpu": "xla"}


@dataclasses.dataclass(frozen=True)
class Compute:
  """Hashable (it lives in the model's static graph definition). Defaults: float32 xla reference."""
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  matmul_dtype: str = ""  # "": compute_dtype
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "xla"  # resolved: xla | flash | splash | cudnn
  kernel_backend: str = ""  # flash: tpu | interpret | gpu | gpu_interpret; splash: tpu | interpret
  flash_block_q: int = 0
  flash_block_k: int = 0
  attention_blocks: int = 1
  # > 1 (flash, or ring below, under sequence parallelism): each row's tokens arrive in the balanced order of
  # jaxlm.parallel.sequence, and each shard attends only its own queries.
  sequence_shards: int = 1
  # With sequence_shards > 1: "all_gather" (each shard attends its queries to the gathered row) or
  # "ring" (jaxlm/models/ring_attention.py; attention xla or flash computes each block pair).
  context_parallel: str = "all_gather"
  # CPU: materialise the transposes that feed low-precision matmuls (see jaxlm/kernels/matmul.py).
  copy_transposes: bool = False
  # Dropless MoE's grouped matmul (jaxlm/models/moe.py, dropless): "ragged" (jax.lax.ragged_dot,
  # native on GPU/TPU) | "blocks" (on CPU, where XLA runs ragged_dot as E dense masked matmuls:
  # benchmarks/moe.py measures both).
  moe_grouped_matmul: str = "ragged"

  @property
  def activations(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def matmul(self):
    """Operand dtype of the model's matmuls."""
    return jnp.dtype(self.matmul_dtype or self.compute_dtype)

  @property
  def params(self):
    return jnp.dtype(self.param_dtype)


def resolve_attention(kind: str, platform: str, softcap: float = 0.0,
                      attention_kind: str = "standard") -> tuple[str, str]:
  """(implementation, kernel backend) that compute.attention=`kind` runs on `platform` for a model
  of model.attention_kind `attention_kind`."""
  if kind == "auto" and attention_kind == "mla":
    # MLA reaches a kernel only with its query/key and value widths padded to one (mla.py); no
    # measurement says that beats xla anywhere, and cuDNN is not wired for it: xla.
    kind = "xla"
  if kind == "auto":
    kind = AUTO_ATTENTION.get(platform, "xla")
    if kind == "cudnn" and softcap:
      kind = "xla"  # cuDNN has no logit soft-capping
    if platform == "gpu" and kind == "flash" and (why := flash_gpu.unsupported_gpu()):
      log.warning("compute.attention='auto': %s; running xla attention", why)
      kind = "xla"
  if kind == "flash":
    if platform not in ("tpu", "cpu", "gpu"):
      raise RuntimeError(f"compute.attention='flash' has no kernel for platform {platform!r}; use 'xla'")
    return kind, backend_for_platform(platform)
  if kind == "splash":
    if platform not in ("tpu", "cpu"):
      raise RuntimeError(f"compute.attention='splash' is a TPU kernel (interpret mode on CPU); this "
                         f"platform is {platform!r}: use 'cudnn', 'flash' or 'xla'")
    return kind, "tpu" if platform == "tpu" else "interpret"
  if kind == "cudnn" and platform != "gpu":
    raise RuntimeError(f"compute.attention='cudnn' needs a GPU; this platform is {platform!r}. "
                       "Use 'flash', 'splash', 'xla' or 'auto'")
  return kind, ""


def resolve(compute_cfg, platform: str, sequence_shards: int = 1, softcap: float = 0.0,
            attention_kind: str = "standard") -> Compute:
  """config.compute -> Compute for models that run on `platform` ("cpu", "gpu", "tpu").

  With compute.context_parallel="ring" and sequence_shards > 1, xla or flash computes each block
  pair of the ring ("auto": flash on TPU, xla elsewhere).

  Otherwise, under sequence parallelism (sequence_shards > 1) only jaxlm's flash kernels attend a shard's
  own queries (they take the shard's position offset); splash would make every shard compute the
  whole row, so "auto" takes flash there and an explicit "splash" is refused. (jaxlm's GPU kernel
  does not take the offset yet: flash on GPU with sequence shards is refused too.)
  """
  ring = getattr(compute_cfg, "context_parallel", "all_gather") == "ring" and sequence_shards > 1
  attention, backend = resolve_attention(compute_cfg.attention, platform, softcap, attention_kind)
  if ring:
    return _resolve_ring(compute_cfg, platform, sequence_shards, attention, backend)
  if attention == "splash" and sequence_shards > 1:
    if compute_cfg.attention != "auto":
      raise ConfigError(
          f"compute.attention='splash' with a sequence axis of {sequence_shards}: every sequence "
          "shard would compute the whole row's attention; use 'flash' (each shard attends only its "
          "own queries) or mesh.sequence=1")
    attention, backend = resolve_attention("flash", platform, softcap)
  if attention == "flash" and backend == "gpu" and sequence_shards > 1:
    raise ConfigError(
        f"compute.attention='flash' with a sequence axis of {sequence_shards}: jaxlm's GPU kernel "
        "cannot yet attend one shard's queries on their own; use 'cudnn' or 'xla', or mesh.sequence=1")
  return _compute(compute_cfg, platform, attention, backend,
                  sequence_shards=sequence_shards if attention == "flash" else 1)


def _compute(compute_cfg, platform: str, attention: str, backend: str, **rest) -> Compute:
  """The Compute of config.compute on `platform` with the resolved attention kernel."""
  return Compute(
      param_dtype=compute_cfg.param_dtype, compute_dtype=compute_cfg.compute_dtype,
      matmul_dtype=compute_cfg.matmul_dtype, scan_layers=bool(compute_cfg.scan_layers),
      remat_policy=compute_cfg.remat_policy, attention=attention, kernel_backend=backend,
      flash_block_q=compute_cfg.flash_block_q, flash_block_k=compute_cfg.flash_block_k,
      attention_blocks=compute_cfg.attention_blocks, copy_transposes=platform == "cpu",
      moe_grouped_matmul="blocks" if platform == "cpu" else "ragged", **rest)


def _resolve_ring(compute_cfg, platform: str, shards: int, attention: str, backend: str) -> Compute:
  """Compute for compute.context_parallel="ring" over `shards` sequence shards: every block pair is
  computed by xla or by jaxlm's TPU flash kernels (on TPU, or interpreted on CPU)."""
  if compute_cfg.attention == "auto":
    attention, backend = ("flash", "tpu") if platform == "tpu" else ("xla", "")
  if attention not in ("xla", "flash"):
    raise ConfigError(f"compute.context_parallel='ring' computes key/value blocks with xla or flash "
                      f"attention, not {attention!r}; set compute.attention to 'flash' or 'xla'")
  if attention == "flash" and backend not in ("tpu", "interpret"):
    raise ConfigError(
        f"compute.context_parallel='ring' with compute.attention='flash' runs jaxlm's TPU kernels, "
        f"which take each block's position offset; the {backend!r} kernels do not yet: use "
        "compute.attention='xla' for the ring on this platform")
  return _compute(compute_cfg, platform, attention, backend, sequence_shards=shards,
                  context_parallel="ring")
