"""LoRA: training low-rank adapters on frozen base weights, and merging them back.

Design. jaxlm implements LoRA on NNX itself rather than through a library such as qwix (what
Tunix uses). qwix adds LoRA by model surgery: rules matched against module paths decide which Flax
modules' matmuls (dot_general / einsum) get adapters. jaxlm's projections are raw nnx.Params
contracted by its own `dense` (a 2-D matmul after reshapes, or its low-precision matmul kernel), so
the surgery would have to reach into that code, the adapters' parameters would be declared by the
library rather than beside their weights with jaxlm's logical axis names, and it would be a new
dependency. Here, instead:
  * the model owns its adapters (jaxlm/models/layers.py, `Adapter`): a targeted projection W gets
    `<name>_lora` beside it with factors A [*in, lora] and B [lora, *out] of type nnx.LoRAParam,
    and computes x W + (alpha / rank) (x A) B. The forward pass changes in one function (`project`)
    and nowhere else, so attention kernels, sequence parallelism and the pipeline schedule never
    see LoRA: they see the same activations as before.
  * adapters are built inside the blocks, so scan_layers stacks them [layers, ...] with the
    "layers" axis like every other parameter, pipeline stages take their layers' adapters with
    their weights, and their logical axes ("lora", the rank, is replicated by default) shard
    them with the rules table.
  * nnx.LoRAParam subclasses nnx.Param: `nnx.split(model, ADAPTERS, BASE)` separates what trains
    from what is frozen, while code that takes every nnx.Param sees the whole model.
How the model learns about LoRA: `config.model` stays the architecture (what checkpoint.init_from
must match); `config.lora` is a training choice that `build_model(config)` (and the trainer's
model) turns into a `LoraSpec` for the Transformer's constructor.

Training (jaxlm/train/): with lora.rank > 0 the TrainState's params are the adapters alone, so the
optimizer holds state for them only; the base weights are read once, from checkpoint.init_from (a
jaxlm run or a Hugging Face directory) straight into their shardings, and passed to every step as
its frozen argument (`frozen_base`). Checkpoints therefore hold only the adapters; the run's
config.json records the base's absolute path (`with_recorded_base`), and a resume reads the base
from there again. Without init_from the base is the train.seed initialization (for tests).
Dropout on the adapters' input is not implemented (lora.dropout > 0 is refused): the step's rng
would have to reach every layer, scanned and pipelined ones included.

Merging: `merge(model)` is the plain Transformer with W + (alpha / rank) A B in every adapted
weight and no adapters, which hf.save_model exports like any other; `jaxlm.runs.load_params` of a
LoRA run returns it merged (through `merged_run_params`), so `python -m jaxlm.convert --to_hf=DIR
--workdir=LORA_RUN`, `python -m jaxlm.generate --workdir=LORA_RUN` and checkpoint.init_from=LORA_RUN
all see the merged model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from jaxlm.config import ConfigError
from jaxlm.models import compute as compute_lib
from jaxlm.models.layers import ADAPTERS, BASE
from jaxlm.models.transformer import Transformer
from jaxlm.workdir import absolute

SUFFIX = "_lora"  # an adapter's name is its projection's plus this: attn/q_lora adapts attn/q


def _delta(a, b, lead: int):
  """A [*lead, *in, r] @ B [*lead, r, *out] -> [*lead, *in, *out] in float32."""
  lead_shape, n_in = a.shape[:lead], a.ndim - lead - 1
  in_shape, out_shape = a.shape[lead:lead + n_in], b.shape[lead + 1:]
  a2 = a.astype(jnp.float32).reshape(*lead_shape, -1, a.shape[-1])  # [*lead, in, r]
  b2 = b.astype(jnp.float32).reshape(*lead_shape, b.shape[lead], -1)  # [*lead, r, out]
  d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
  return d.reshape(*lead_shape, *in_shape, *out_shape)


def merge_params(base: dict, adapters: dict, scale: float) -> dict:
  """Pure dicts (nnx.to_pure_dict): `base` with every adapted weight W replaced by W + scale A B,
  in W's dtype (the sum is taken in float32). Stacked layers ([layers, ...] on W, A and B) merge
  layer by layer."""
  out = dict(base)
  for key, node in adapters.items():
    if isinstance(key, str) and key.endswith(SUFFIX):
      name = key[:-len(SUFFIX)]
      w, a, b = base[name], node["a"], node["b"]
      lead = a.ndim + b.ndim - 2 - w.ndim  # 1 for stacked layers, else 0
      out[name] = (w.astype(jnp.float32) + scale * _delta(a, b, lead)).astype(w.dtype)
    else:
      out[key] = merge_params(base[key], node, scale)
  return out


def plain_model(model: Transformer) -> Transformer:
  """The same architecture and compute without adapters, as ShapeDtypeStructs."""
  return nnx.eval_shape(lambda: Transformer(model.cfg, nnx.Rngs(0), model.compute))


def merge(model: Transformer) -> Transformer:
  """A plain Transformer (no adapters) computing what the LoRA `model` computes: every adapted
  weight is W + (alpha / rank) A B. hf.save_model exports it like any other model."""
  if model.lora is None:
    return model
  _, adapters, base = nnx.split(model, ADAPTERS, BASE)
  graphdef, state = nnx.split(plain_model(model), nnx.Param)
  nnx.replace_by_pure_dict(state, merge_params(nnx.to_pure_dict(base), nnx.to_pure_dict(adapters),
                                               model.lora.scale))
  return nnx.merge(graphdef, state)


def parameter_counts(model: Transformer) -> tuple[int, int]:
  """(adapter parameters, all parameters) of a model (arrays or ShapeDtypeStructs)."""
  size = lambda state: sum(x.size for x in jax.tree.leaves(state))
  return size(nnx.state(model, ADAPTERS)), size(nnx.state(model, nnx.Param))


def describe(config, trainable: int, frozen: int) -> str:
  """The log's words for what trains, e.g. "65.5K trainable (LoRA rank 8 on q,k,v,o: 1.45%)"."""
  return (f"{trainable / 1e3:.1f}K trainable (LoRA rank {config.lora.rank} on "
          f"{config.lora.targets}: {100 * trainable / (trainable + frozen):.2f}%)")


# The trainer's side: where the base comes from, and reading it.

def _has_checkpoint(workdir: str) -> bool:
  from jaxlm.runs import checkpoint_dir
  directory = epath.Path(checkpoint_dir(workdir))
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def with_recorded_base(config):
  """A LoRA run's config with checkpoint.init_from, the base, as an absolute path; when the run
  directory already holds a checkpoint to resume from, the base its config.json records (so a
  resume reads the base the adapters were trained on). Raises ConfigError when the command line
  names another base than the run's. Other configs are returned as they are."""
  from jaxlm.runs import read_config
  if not config.lora.rank:
    return config
  given = absolute(config.checkpoint.init_from) if config.checkpoint.init_from else ""
  workdir = config.train.workdir
  recorded = ""
  if config.checkpoint.resume != "never" and _has_checkpoint(workdir):
    recorded = read_config(workdir).checkpoint.init_from
    recorded = absolute(recorded) if recorded else ""
    if given and given != recorded:
      raise ConfigError(
          f"checkpoint.init_from={config.checkpoint.init_from!r}, but the LoRA run in {workdir} "
          f"trains adapters on {recorded or 'the train.seed initialization'!r} (its config.json); "
          "leave checkpoint.init_from out to resume it, or start a new train.workdir")
  config = config.copy_and_resolve_references()
  config.checkpoint.init_from = given or recorded
  return config


def read_base(config, compute: compute_lib.Compute, mesh, shardings) -> nnx.State:
  """The base weights of a LoRA run (config.checkpoint.init_from's, or without one the train.seed
  initialization) as an nnx.State in `shardings`; mesh: where the source is read (None: one
  device)."""
  from jaxlm.train.init_from import read_source
  from jaxlm.train.setup import new_model
  if config.checkpoint.init_from:
    return read_source(config.checkpoint.init_from, config, compute, mesh, shardings)
  return jax.jit(lambda: nnx.state(new_model(config, compute), BASE), out_shardings=shardings)()


def frozen_base(setup):
  """What the steps of `setup` (jaxlm/train/setup.py) take frozen: a LoRA run's base weights in
  setup.frozen_shardings; None when every parameter trains."""
  if setup.frozen_shardings is None:
    return None
  return read_base(setup.config, setup.compute, setup.mesh, setup.frozen_shardings)


def merged_run_params(config, adapters: nnx.State, mesh=None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params) of the plain model a LoRA run's `adapters` (restored from its checkpoint)
  make with its base: read from the run's checkpoint.init_from (or the train.seed initialization)
  onto `mesh` with the run's rules (None: one device), then merged (`merge_params`).
  For jaxlm.runs.load_params."""
  from jaxlm.config import parse_rules
  from jaxlm.parallel.mesh import platform
  from jaxlm.parallel.sharding import tree_shardings
  from jaxlm.train.setup import abstract_model

  compute = compute_lib.resolve(config.compute, platform(mesh) if mesh else jax.default_backend(),
                                1, config.model.attn_logit_softcap, config.model.attention_kind)
  abstract = abstract_model(config, compute)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, nnx.state(abstract, BASE))
  else:
    shardings = tree_shardings(nnx.state(abstract, BASE), mesh, parse_rules(config.mesh.rules))
  base = read_base(config, compute, mesh, shardings)
  merge_fn = lambda b, a: merge_params(b, a, abstract.lora.scale)
  merged = jax.jit(merge_fn, out_shardings=nnx.to_pure_dict(shardings))(
      nnx.to_pure_dict(base), nnx.to_pure_dict(adapters))
  graphdef, state = nnx.split(plain_model(abstract), nnx.Param)
  nnx.replace_by_pure_dict(state, merged)
  return graphdef, state
