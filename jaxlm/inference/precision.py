"""Decoding with low-precision matmul operands: a (graphdef, params) pair recomputed in another
`compute.matmul_dtype`, its projection weights stored in that dtype.

A model's `Compute` lives in its graph definition, so a checkpoint trained (or converted) in float32
decodes in float32. On CPU, bfloat16 operands with float32 accumulation run XLA's matmuls about
twice as fast (oneDNN / YNNPACK bf16 kernels), and a decode step at batch 32 is mostly matmuls.
`with_matmul_dtype` returns the same model computing its matmuls on `dtype` operands, exactly as
a model built with `config.compute.matmul_dtype = dtype` would (activations, norms, softmax and the
KV cache stay in the compute dtype). The weights that only ever feed a matmul are cast once here
rather than in every decode step; the embedding table stays as it is (its rows are looked up as
activations). Greedy output may then differ from the float32 model's wherever two logits are
within bfloat16 rounding of each other.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.compute import Compute

# Parameters consumed only as matmul weights (attention and MLP projections, an untied output
# projection, LoRA factors, MLA's latent projections); everything else (embeddings, norms, biases)
# keeps its dtype.
MATMUL_WEIGHTS = frozenset({"q", "k", "v", "o", "up", "gate", "down", "unembed", "a", "b",
                            "q_a", "q_b", "kv_a", "kv_b"})


def with_matmul_dtype(graphdef, params, dtype: str):
  """(graphdef, params) -> the same model with compute.matmul_dtype = dtype ("float32" |
  "bfloat16"), its matmul weights stored in dtype. Parameters keep their shardings."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"matmul dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  model = nnx.merge(graphdef, params)
  for _, module in nnx.iter_graph(model):
    if isinstance(getattr(module, "compute", None), Compute):
      module.compute = dataclasses.replace(module.compute, matmul_dtype=dtype)
  graphdef, params = nnx.split(model)
  low = jnp.dtype(dtype)

  def cast(path, x):
    name = next((k.key for k in reversed(path) if hasattr(k, "key")), None)  # past ".value"
    weight = name in MATMUL_WEIGHTS and jnp.issubdtype(x.dtype, jnp.floating)
    return x.astype(low) if weight and x.dtype.itemsize > low.itemsize else x

  return graphdef, jax.tree_util.tree_map_with_path(cast, params)
