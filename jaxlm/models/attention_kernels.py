"""Which attention implementation a training/prefill step runs: config.model.attention.

  xla    `dot_product_attention` (or its query-blocked form): the reference, any backend.
  flash  jaxlm's Pallas flash attention (jaxlm/kernels): Mosaic TPU on TPU, Mosaic GPU on
         Hopper GPUs, the TPU kernels in Pallas interpret mode on CPU.
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"): GPU only, for comparison.
  auto   flash on TPU and Hopper GPUs, xla on CPU and on other GPUs (the GPU kernel is wgmma-based).

Everything here sees self-attention over whole rows: slots are 0..t-1 (the KV-cache decode path
always uses the xla reference), so the kernels compute masks from positions.

Under active axis rules (a device mesh) the kernel runs inside shard_map: a Pallas call is a
per-device program. Batch and heads are split as the rules say; the sequence axis is gathered.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxlm.kernels import flash_gpu
from jaxlm.kernels.flash_attention import flash_attention
from jaxlm.parallel import rules

log = logging.getLogger(__name__)


def resolve(kind: str, platform: str | None = None) -> str:
  """The implementation `kind` runs on `platform` (default: the active mesh's, else JAX's default)."""
  platform = platform or rules.platform()
  if kind == "auto":
    kind = "xla" if platform == "cpu" else "flash"
    if platform == "gpu" and (why := flash_gpu.unsupported_gpu()):
      log.warning("model.attention='auto': %s; running xla attention", why)
      kind = "xla"
  if kind == "flash" and platform not in ("tpu", "cpu", "gpu"):
    raise RuntimeError(f"model.attention='flash' has no kernel for platform {platform!r}; "
                       "use 'xla'")
  if kind == "cudnn" and platform != "gpu":
    raise RuntimeError(f"model.attention='cudnn' needs a GPU; this backend is {platform!r}. "
                       "Use 'flash', 'xla' or 'auto'")
  return kind


def _in_shard_map(fn, q, k, v, segments):
  """Runs fn(q, k, v, segments) per device when axis rules are active; else directly."""
  active = rules._ACTIVE.get()  # pylint: disable=protected-access
  if active is None:
    return fn(q, k, v, segments)
  _, mesh = active
  q_spec = rules.spec(("batch", None, "heads", None))
  kv_spec = rules.spec(("batch", None, "kv_heads", None))
  if q_spec[2] != kv_spec[2]:  # local query heads must map onto local KV heads by h // groups
    log.warning("flash attention: heads and kv_heads are sharded differently (%s vs %s); "
                "attention replicates heads instead", q_spec[2], kv_spec[2])
    q_spec = kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
  seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
  args = (q, k, v, segments)
  specs = (q_spec, kv_spec, kv_spec, None if segments is None else seg_spec)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _cudnn(q, k, v, segments, window: int):
  mask = None
  if segments is not None:
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]  # [batch, 1, t, t]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation="cudnn",
      local_window_size=(window - 1, 0) if window else None)


def self_attention(cfg, kind: str, q, k, v, segments):
  """q: [batch, t, heads, head_dim]; k, v: [batch, t, kv_heads, head_dim]; segments: [batch, t]|None.

  `kind` is a resolved implementation other than xla. Returns [batch, t, heads, head_dim].
  """
  if kind == "cudnn":
    return _cudnn(q, k, v, segments, cfg.sliding_window)

  def flash(q, k, v, seg):
    return flash_attention(q, k, v, seg, seg, causal=True, window=cfg.sliding_window,
                           softcap=cfg.attn_logit_softcap, block_q=cfg.flash_block_q or None,
                           block_k=cfg.flash_block_k or None)

  return _in_shard_map(flash, q, k, v, None if segments is None else segments.astype(jnp.int32))
