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

from jaxlm.config import ConfigError, validate, with_vocab_size
from jaxlm.train import flops

# HBM bytes per device, by device_kind prefix (the longest matching prefix wins).
HBM = {"TPU v4": 32e9, "TPU v5 lite": 16e9, "TPU v5": 95e9, "TPU v6 lite": 32e9}
# Slice topologies (chips) by generation and chip count, for "v5p-64"-style names.
_SHAPES = {
    3: {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
_GENERATIONS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}  # generation -> torus dimensions
# Training FLOPs relative to no recompute: "full" reruns every layer's forward (+1/3 of 3 passes);
# "dots" keeps matmul outputs and reruns the cheap elementwise work.
RECOMPUTE = {"none": 1.0, "dots_no_batch": 1.05, "dots": 1.05, "full": 4 / 3}


def topology_name(topology: str) -> str:
  """'v5p:8x8x8' (chips per torus dimension) or a slice name like 'v5p-1024' -> 'v5p:8x8x8'."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?::(\d+(?:x\d+){1,2})|-(\d+))", topology.strip())
  if not m:
    raise ConfigError(
        f"unknown TPU topology {topology!r}; give a generation and shape like 'v5p:4x4x4' or "
        f"'v5e:8x8', or a slice name like 'v5p-64' (generations: {sorted(_GENERATIONS)})")
  gen, shape, cores = m.groups()
  dims = _GENERATIONS[gen]
  if shape:
    if shape.count("x") + 1 != dims:
      raise ConfigError(f"TPU {gen} topologies have {dims} dimensions, got {shape!r}; e.g. "
                        f"{gen}:{_SHAPES[dims][16]}")
    return f"{gen}:{shape}"
  per_chip = 2 if gen in ("v4", "v5p") else 1  # v4-N and v5p-N count TensorCores
  chips = int(cores) // per_chip
  if int(cores) % per_chip or chips not in _SHAPES[dims]:
    raise ConfigError(f"no standard {gen} slice with {cores} {'cores' if per_chip > 1 else 'chips'}; "
                      f"known: {', '.join(f'{gen}-{c * per_chip}' for c in _SHAPES[dims])}")
  return f"{gen}:{_SHAPES[dims][chips]}"


def tpu_devices(topology: str):
  """Abstract TPU devices of a topology (needs libtpu: `pip install -e '.[tpu]'`)."""
  name = topology_name(topology)
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  except Exception as e:  # no libtpu, or a shape libtpu rejects
    raise ConfigError(f"could not describe TPU topology {name!r}: {e}. The planner needs libtpu: "
                      "pip install -e '.[tpu]'") from e


def chip_info(devices) -> tuple[float, float]:
  """(HBM bytes per device, peak bf16 TFLOP/s per device) of the devices' kind."""
  kind = devices[0].device_kind
  matches = [prefix for prefix in HBM if kind.startswith(prefix)]
  peak = flops.table_peak_tflops(kind)
  if not matches or peak is None:
    raise ConfigError(f"no HBM or peak figure for device kind {kind!r}; add it to jaxlm.aot.plan.HBM "
                      "and jaxlm.train.flops.PEAK_TFLOPS")
  return HBM[max(matches, key=len)], peak


@dataclasses.dataclass
class Plan:
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


def plan(config, devices, assumed_mfu: float = 0.5) -> Plan:
  """Compiles config's train step for `devices` (abstract TPU devices) and measures it."""
  from jaxlm.train.setup import abstract_state, jit_train_step, make_setup

  validate(config)
  if not config.model.vocab_size:  # a tokenizer the run trains will have tokenizer.vocab_size ids
    config = with_vocab_size(config, config.tokenizer.vocab_size)
  setup = make_setup(config, devices)  # ConfigError before compiling if the mesh cannot work
  state = abstract_state(setup)
  rows, seq = config.train.batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((rows, seq), "int32", sharding=setup.batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
  hbm, peak = chip_info(devices)
  remat = config.compute.remat_policy
  step_flops = flops.train_flops_per_token(config.model, seq) * rows * seq * RECOMPUTE[remat]
  result = functools.partial(
      Plan, mesh=dict(setup.mesh.shape), remat=remat, hbm=hbm, flops_per_step=step_flops,
      step_seconds=step_flops / (len(devices) * peak * 1e12 * assumed_mfu))
  lowered = jit_train_step(setup).lower(state, batch)
  try:
    mem = lowered.compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that exceed HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = re.search(r"required for [\w ]+ \(([\d.]+)G\)", str(e))
    return result(arguments=_shard_bytes(state) + _shard_bytes(batch), outputs=0,
                  temporaries=int(float(needed.group(1)) * 2**30) if needed else 0, code=0,
                  note=str(e).split("\n")[0][:200])
  return result(arguments=mem.argument_size_in_bytes,
                outputs=max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0),
                temporaries=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes)


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def candidates(config, num_devices: int):
  """Mesh factorizations and remat policies to try, cheapest first: least recompute, then least
  tensor parallelism (it talks every layer), with fsdp taking the remaining devices."""
  heads = math.gcd(config.model.num_heads, config.model.num_kv_heads)
  tensors = [t for t in (1, 2, 4, 8) if heads % t == 0 and num_devices % t == 0]
  for remat in sorted(RECOMPUTE, key=RECOMPUTE.get):
    if remat == "dots_no_batch":
      continue  # same recompute estimate as dots; one of the two is enough for a sweep
    for t in tensors:
      yield remat, dict(data=1, stage=1, fsdp=num_devices // t, sequence=1, tensor=t)
