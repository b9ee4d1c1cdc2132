"""The train state created on a device mesh, and the train/eval steps jitted for it.

Nothing here is specific to one layout: the mesh comes from `config.mesh`, every array's sharding
from the rules table and the parameters' logical axis names (jaxlm/parallel/). On the default
config on one device every sharding is the single device and this is plain jax.jit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.config import parse_rules
from jaxlm.models import Transformer
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import batch_sharding, jit_sharded, tree_shardings
from jaxlm.train.step import TrainState, init_state, make_eval_step, make_train_step


class Layout(NamedTuple):
  mesh: jax.sharding.Mesh
  rules: tuple
  state: Any  # TrainState-shaped tree of NamedShardings
  batch: NamedSharding  # every batch feature
  replicated: NamedSharding


def _init_fn(config, tx):
  def init() -> TrainState:
    model = Transformer(config.model, nnx.Rngs(config.train.seed))
    _, params = nnx.split(model, nnx.Param)
    return init_state(params, tx, config.train.seed)
  return init


def graphdef_of(config) -> nnx.GraphDef:
  """The model's static structure, without allocating its parameters."""
  abstract = nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(config.train.seed)))
  return nnx.split(abstract, nnx.Param)[0]


def make_layout(config, tx, devices=None) -> Layout:
  """Mesh (validated against the device count, before compiling) and every sharding of a run."""
  mesh = make_mesh(config, devices)
  rules = parse_rules(config.mesh.rules)
  abstract = jax.eval_shape(_init_fn(config, tx))
  return Layout(mesh, rules, tree_shardings(abstract, mesh, rules), batch_sharding(mesh, rules),
                NamedSharding(mesh, PartitionSpec()))


def init_sharded_state(config, tx, layout: Layout) -> TrainState:
  """The initial state, each array created directly in its shards (never whole on one device).

  Same numbers as eager `init_state(nnx.split(Transformer(...))[1], ...)`: the random draws are
  the same threefry computation, only placed differently.
  """
  return jax.jit(_init_fn(config, tx), out_shardings=layout.state)()


def jit_train_step(config, graphdef, tx, layout: Layout):
  """train_step(state, batch) -> (state, metrics): explicit shardings, state donated."""
  return jit_sharded(make_train_step(graphdef, tx, config.train), layout.mesh, layout.rules,
                     in_shardings=(layout.state, layout.batch),
                     out_shardings=(layout.state, layout.replicated), donate_argnums=0)


def jit_eval_step(graphdef, token_bytes, layout: Layout):
  """eval_step(params, batch) -> replicated sums."""
  return jit_sharded(make_eval_step(graphdef, token_bytes), layout.mesh, layout.rules,
                     in_shardings=(layout.state.params, layout.batch), out_shardings=layout.replicated)
