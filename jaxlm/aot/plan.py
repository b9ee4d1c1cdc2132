"""Ahead-of-time plan of a training job on a TPU slice, from a CPU machine.

libtpu describes any TPU topology without the hardware (`jax.experimental.topologies`). On those
abstract devices we build the job's real mesh and sharded abstract state, lower and compile the real
train step, and read per-chip HBM from the compiled program's `memory_analysis()`. Nothing is
allocated: the state is ShapeDtypeStructs carrying their NamedShardings.

Per chip: arguments (parameters, optimizer state, the batch shard) + outputs not aliased to a
donated argument + temporaries (activations kept for the backward pass, gradients, XLA scratch)
+ generated code. Step time is predicted from analytic FLOPs (jaxlm.train.flops) at an assumed MFU,
times the recompute of the remat policy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax

from jaxlm import chips
from jaxlm.config import ConfigError, validate, with_vocab_size
from jaxlm.train import flops

# Training FLOPs relative to no recompute: "full" reruns every layer's forward (+1/3 of 3 passes);
# "dots" keeps matmul outputs and reruns the cheap elementwise work.
RECOMPUTE = {"none": 1.0, "dots_no_batch": 1.05, "dots": 1.05, "full": 4 / 3}


def topology_name(topology: str) -> str:
  """'v5p:8x8x8' (chips per torus dimension) or a slice name like 'v5p-1024' -> 'v5p:8x8x8'."""
  try:
    return chips.parse_topology(topology).topology
  except chips.HardwareError as e:
    raise ConfigError(str(e)) from None


def tpu_devices(topology: str):
  """Abstract TPU devices of a topology (libtpu, which the `test` extra installs)."""
  name = topology_name(topology)
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  except Exception as e:  # no libtpu, or a shape libtpu rejects
    raise ConfigError(f"could not describe TPU topology {name!r}: {e}. The planner needs libtpu, "
                      "which the test extra installs: pip install -e '.[test]'") from e


def chip_info(devices) -> chips.Chip:
  """Peak TFLOP/s and HBM bytes of one of the devices."""
  kind = devices[0].device_kind
  info = chips.chip(kind)
  if info is None:
    raise ConfigError(f"no peak or HBM figure for device kind {kind!r}; add it to jaxlm.chips.CHIPS")
  return info


@dataclasses.dataclass
class MemoryPlan:
  mesh: dict  # axis -> size
  remat: str
  arguments: int  # bytes per device
  outputs: int  # not aliased to donated arguments
  temporaries: int
  code: int
  hbm: float
  flops_per_step: float  # all devices, with recompute
  step_seconds: float  # predicted at the assumed MFU
  note: str = ""  # why the compiler gave up, when it did

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries + self.code

  @property
  def fits(self) -> bool:
    return not self.note and self.total <= self.hbm


def plan(config, devices, assumed_mfu: float = 0.5) -> MemoryPlan:
  """Compiles config's train step for `devices` (abstract TPU devices) and measures it."""
  from jaxlm.train.setup import abstract_frozen, abstract_state, jit_train_step, make_setup

  validate(config)
  if not config.model.vocab_size:  # a tokenizer the run trains will have tokenizer.vocab_size ids
    config = with_vocab_size(config, config.tokenizer.vocab_size)
  setup = make_setup(config, devices)  # ConfigError before compiling if the mesh cannot work
  state = abstract_state(setup)
  frozen = abstract_frozen(setup)  # LoRA's base weights (none without LoRA)
  rows, seq = config.train.batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((rows, seq), "int32", sharding=setup.batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
  chip = chip_info(devices)
  remat = config.compute.remat_policy
  step_flops = flops.train_flops_per_token(config.model, seq) * rows * seq * RECOMPUTE[remat]
  result = functools.partial(
      MemoryPlan, mesh=dict(setup.mesh.shape), remat=remat, hbm=chip.hbm_bytes,
      flops_per_step=step_flops,
      step_seconds=step_flops / (len(devices) * chip.peak_tflops * 1e12 * assumed_mfu))
  lowered = jit_train_step(setup, frozen_shardings=setup.frozen_shardings).lower(state, batch, *frozen)
  try:
    mem = lowered.compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that exceed HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = re.search(r"required for [\w ]+ \(([\d.]+)G\)", str(e))
    return result(arguments=_shard_bytes((state, batch, frozen)), outputs=0,
                  temporaries=int(float(needed.group(1)) * 2**30) if needed else 0, code=0,
                  note=str(e).split("\n")[0][:200])
  return result(arguments=mem.argument_size_in_bytes,
                outputs=max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0),
                temporaries=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes)


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def expert_sizes(config, devices: int) -> list[int]:
  """Expert-axis sizes worth trying for `devices` devices, largest first: powers of two dividing
  both model.moe_num_experts and the devices; [1] for a dense model."""
  e = config.model.moe_num_experts
  if not e:
    return [1]
  return [s for s in (2 ** i for i in range(devices.bit_length() - 1, -1, -1))
          if e % s == 0 and devices % s == 0]


def candidates(config, num_devices: int):
  """Mesh factorizations and remat policies to try, cheapest first: least recompute, then least
  tensor parallelism (it talks every layer), then (MoE models) the most expert parallelism (each
  expert's weights stay whole on its ranks instead of being gathered over fsdp every layer), with
  fsdp taking the remaining devices."""
  heads = math.gcd(config.model.num_heads, config.model.num_kv_heads)
  tensors = [t for t in (1, 2, 4, 8) if heads % t == 0 and num_devices % t == 0]
  for remat in sorted(RECOMPUTE, key=RECOMPUTE.get):
    if remat == "dots_no_batch":
      continue  # same recompute estimate as dots; one of the two is enough for a sweep
    for t in tensors:
      for ep in expert_sizes(config, num_devices // t):
        yield remat, dict(data=1, stage=1, fsdp=num_devices // (t * ep), sequence=1, expert=ep,
                          tensor=t)
