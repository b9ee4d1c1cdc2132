"""From a config to compiled steps, in one place: the mesh, every sharding, the model's `Compute`,
the sharded train state and the jitted train and eval steps.

Nothing here is specific to one layout: the mesh comes from `config.mesh`, every array's sharding
from the rules table and the parameters' logical axis names (jaxlm/parallel/). On the default
config on one device every sharding is the single device and this is plain jax.jit.

With LoRA (config.lora.rank > 0) the train state's params are the adapters alone (`Setup.trainable`)
and the base weights are an argument of the steps, frozen, laid out by `Setup.frozen_shardings`
(jaxlm/posttrain/lora.py reads them).

The config must hold the run's vocabulary size (model.vocab_size > 0): the loop fills it in from
the tokenizer before calling `make_setup`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.config import ConfigError, parse_rules
from jaxlm.models import Transformer
from jaxlm.models import compute as compute_lib
from jaxlm.models.layers import ADAPTERS, BASE, lora_spec, score_outputs
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import pipeline, sequence
from jaxlm.parallel.rules import axis_rules
from jaxlm.parallel.sharding import batch_sharding, tree_shardings
from jaxlm.train import offload
from jaxlm.train.optimizer import make_optimizer, optimizer_parts
from jaxlm.train.step import TrainState, init_state, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run on its devices."""
  config: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  compute: compute_lib.Compute  # config.compute resolved for the mesh's platform
  tx: Any  # the optax optimizer
  state_shardings: Any  # TrainState-shaped tree of NamedShardings
  batch_sharding: NamedSharding  # every batch feature
  replicated: NamedSharding
  # The shardings of the parameters the steps take frozen: LoRA's base weights; None when every
  # parameter trains (config.lora.rank 0).
  frozen_shardings: Any = None

  @property
  def trainable(self):
    """The nnx filter of the parameters the train state holds and the optimizer updates."""
    return trainable_filter(self.config)

  @functools.cached_property
  def graphdef(self) -> nnx.GraphDef:
    """The model's static structure, without allocating its parameters."""
    return nnx.split(abstract_model(self.config, self.compute), nnx.Param)[0]


def trainable_filter(config):
  """What trains: every nnx.Param, or with LoRA (config.lora.rank > 0) the adapters alone."""
  return ADAPTERS if config.lora.rank else nnx.Param


def new_model(config, compute: compute_lib.Compute) -> Transformer:
  """The run's model, freshly initialized from train.seed (LoRA adapters included)."""
  return Transformer(config.model, nnx.Rngs(config.train.seed), compute, lora_spec(config),
                     score_outputs(config))


def abstract_model(config, compute: compute_lib.Compute) -> Transformer:
  """The model as ShapeDtypeStructs (nnx.eval_shape): no memory is allocated."""
  return nnx.eval_shape(lambda: new_model(config, compute))


def _init(config, compute, tx):
  def init() -> TrainState:
    params = nnx.state(new_model(config, compute), trainable_filter(config))
    return init_state(params, tx, config.train.seed)
  return init


def abstract_state(setup: Setup) -> TrainState:
  """The train state as ShapeDtypeStructs carrying their shardings (for AOT compiles and restores)."""
  shapes = jax.eval_shape(_init(setup.config, setup.compute, setup.tx))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, setup.state_shardings)


def abstract_frozen(setup: Setup) -> tuple:
  """The steps' frozen arguments as sharded ShapeDtypeStructs: (LoRA's base weights,), or () when
  every parameter trains (for AOT compiles)."""
  if setup.frozen_shardings is None:
    return ()
  shapes = nnx.state(abstract_model(setup.config, setup.compute), BASE)
  return (jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       shapes, setup.frozen_shardings),)


def make_setup(config, devices=None) -> Setup:
  """Mesh (validated against the device count, before compiling), Compute and every sharding."""
  mesh = mesh_lib.make_mesh(config, devices)
  rules = parse_rules(config.mesh.rules)
  # How many pieces the rules cut a row's length into (mesh.sequence with the default rules).
  shards = math.prod(mesh.shape[a] for a in dict(rules).get("length") or ())
  compute = compute_lib.resolve(config.compute, mesh_lib.platform(mesh), shards,
                                config.model.attn_logit_softcap, config.model.attention_kind)
  if compute.sequence_shards > 1 and config.data.seq_len % (2 * shards):
    raise ConfigError(
        f"data.seq_len ({config.data.seq_len}) must be a multiple of 2 x the sequence axis "
        f"({2 * shards}) for {compute.attention} attention, which balances causal work by giving "
        "each shard two chunks of every row; change data.seq_len or mesh.sequence")
  tx = make_optimizer(config.train)
  shapes = jax.eval_shape(_init(config, compute, tx))
  frozen = None
  if config.lora.rank:
    frozen = tree_shardings(nnx.state(abstract_model(config, compute), BASE), mesh, rules)
  shardings = tree_shardings(shapes, mesh, rules)
  if config.compute.offload_optimizer:  # the moments live in host memory between steps
    shardings = shardings._replace(opt_state=offload.host_shardings(shapes.opt_state, shardings.opt_state))
  return Setup(config, mesh, rules, compute, tx, shardings,
               batch_sharding(mesh, rules), NamedSharding(mesh, PartitionSpec()), frozen)


def init_sharded_state(setup: Setup) -> TrainState:
  """The initial state, each array created directly in its shards (never whole on one device).

  Same numbers as eager `init_state(nnx.split(Transformer(...))[1], ...)`: the random draws are
  the same threefry computation, only placed differently.
  """
  return jax.jit(_init(setup.config, setup.compute, setup.tx), out_shardings=setup.state_shardings)()


def forward_fn(setup: Setup):
  """forward(model, batch, head=True) -> (logits, batch as the model saw it) for this mesh: the
  pipeline schedule when the stage axis is > 1, the balanced token order under sequence-sharded
  kernels. head=False: the final hidden state instead of the logits (a chunked loss)."""
  stages = setup.mesh.shape["stage"]
  compute = setup.config.compute
  microbatches = pipeline.pipeline_microbatches(compute, stages)
  shards = setup.compute.sequence_shards
  order = sequence.balanced_order(setup.config.data.seq_len, shards) if shards > 1 else None

  def forward(model, batch, head=True):
    slots = None
    if order is not None:
      batch = sequence.permute_batch(batch, order)
      slots = jnp.broadcast_to(jnp.asarray(order), batch["inputs"].shape)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if stages > 1:
      return pipeline.pipelined_forward(model, *args, slots, stages, microbatches, head,
                                        compute.pipeline_schedule, compute.pipeline_repeats), batch
    return model(*args, slots=slots, head=head), batch

  return forward


def with_rules(fn, setup: Setup):
  """fn with the rules table active while it is traced, so the model's `constrain` calls apply."""
  def wrapped(*args):
    with axis_rules(setup.rules, setup.mesh):
      return fn(*args)
  return wrapped


def jit_train_step(setup: Setup, objective=None, frozen_shardings=None):
  """train_step(state, batch[, frozen]) -> (state, metrics): explicit shardings, state donated.

  objective: a jaxlm.train.step.Objective (default: the language-model one); frozen_shardings: the
  shardings of the frozen parameters it takes as a third argument (None: it takes none)."""
  config = setup.config
  offloaded = None
  if config.compute.offload_optimizer:
    params = nnx.state(abstract_model(config, setup.compute), setup.trainable)
    offloaded = (optimizer_parts(config.train), offload.stacked_mask(params, config.compute.scan_layers))
  step = make_train_step(setup.graphdef, setup.tx, config.train, forward_fn(setup), objective, offloaded)
  in_shardings = (setup.state_shardings, setup.batch_sharding)
  if frozen_shardings is not None:
    in_shardings += (frozen_shardings,)
  return jax.jit(with_rules(step, setup), in_shardings=in_shardings,
                 out_shardings=(setup.state_shardings, setup.replicated), donate_argnums=0)


def jit_eval_step(setup: Setup, token_bytes):
  """eval_step(params, batch[, frozen]) -> replicated sums; frozen when setup has frozen_shardings."""
  step = make_eval_step(setup.graphdef, token_bytes, forward_fn(setup), setup.config.train.loss_chunk)
  in_shardings = (setup.state_shardings.params, setup.batch_sharding)
  if setup.frozen_shardings is not None:
    in_shardings += (setup.frozen_shardings,)
  return jax.jit(with_rules(step, setup), in_shardings=in_shardings, out_shardings=setup.replicated)
