"""The parameter layout decoding wants: layers unstacked and the output projection stored [embed, vocab].

Training stacks the layers' weights along one axis and runs them with `lax.scan` (compile time
independent of depth), and a tied model's logits multiply by the transposed embedding table. Both
are free when a step processes thousands of tokens and expensive when it processes one per row: in
a decode loop XLA:CPU copies every layer's weights out of the stack in every step (a dynamic slice
the matmul cannot read in place: the whole model's weights moved per token), and a matmul against
a transposed [vocab, embed] table repacks the table on every call (measured 1.3 ms for 5 tokens
against a 4096 x 256 table, more than the rest of a small model's step).

`for_decoding` returns the same function in the layout a decode loop reads directly: one block per
layer (compute.scan_layers = False) and, for tied embeddings, an output projection [embed, vocab]
holding the table's transpose (model.tie_embeddings = False in the graph: a copy of the table,
vocab x embed values more memory). The values are the same numbers, so logits agree to float32
rounding (a matmul kernel may sum in another order).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxlm.models.transformer import Transformer


def for_decoding(graphdef, params):
  """(graphdef, params) of a Transformer -> (graphdef, params) of the same model with unstacked
  layers and an untied [embed, vocab] output projection. Returns the pair unchanged when it is
  already in that layout. Parameters keep their dtypes (and, when sharded, their placement)."""
  model = nnx.merge(graphdef, params)
  if not isinstance(model, Transformer):
    raise TypeError(f"for_decoding takes a jaxlm Transformer, got {type(model).__name__}")
  cfg, compute = model.cfg, model.compute
  if not compute.scan_layers and not cfg.tie_embeddings:
    return graphdef, params
  new_cfg = cfg.as_configdict()
  new_cfg.tie_embeddings = False
  score = getattr(model, "score", None)
  width = 0 if score is None else score[...].shape[-1]
  layout = dataclasses.replace(compute, scan_layers=False)
  abstract = nnx.eval_shape(lambda: Transformer(new_cfg, nnx.Rngs(0), layout, model.lora, width))
  new_graphdef, new_state = nnx.split(abstract)
  old = params.to_pure_dict()
  values = {k: v for k, v in old.items() if k != "blocks"}
  if compute.scan_layers:  # every leaf [layers, ...] -> one tree per layer
    values["blocks"] = {i: _index(old["blocks"], i) for i in range(cfg.num_layers)}
  else:
    values["blocks"] = old["blocks"]
  if cfg.tie_embeddings:
    values["unembed"] = jnp.transpose(old["embed"])  # [embed, vocab]
  nnx.replace_by_pure_dict(new_state, values)
  return new_graphdef, new_state


def _index(tree, i):
  if isinstance(tree, dict):
    return {k: _index(v, i) for k, v in tree.items()}
  return tree[i]
