"""Ahead-of-time plan of a training job on a TPU slice, from a CPU machine.

libtpu describes any TPU topology without the hardware (`jax.experimental.topologies`). On those
abstract devices we build the job's real mesh and sharded abstract state, lower and compile the real
train step, and read per-chip memory from the compiled program's `memory_analysis()`. Nothing is
allocated: the state is ShapeDtypeStructs carrying their NamedShardings.

Per chip, device (HBM): arguments (parameters, optimizer state, the batch shard) + outputs not
aliased to a donated argument + temporaries (activations kept for the backward pass, gradients,
XLA scratch) + generated code. Host memory (compute.offload_optimizer): the arguments and outputs
placed there (memory kind pinned_host), counted apart; only device bytes must fit in HBM.

Predicted step time (`predict`), per chip, every term a time:
  compute = analytic FLOPs (jaxlm.train.flops) x the remat policy's recompute / (chips x peak x mfu)
  hbm     = HBM bytes of one step / HBM bandwidth, the bytes read from the compiled HLO with each
            while loop's trip count recovered (jaxlm/aot/hlo_cost.py)
  comm    = collective bytes of one step (same walk) / interconnect bandwidth (the chip's whole ICI
            or NVLink figure: as if every link carried its share)
  host    = 2 x the host-resident state (read and written back each step) / host link bandwidth
  step    = max(compute, hbm) + max(0, comm - OVERLAP x max(compute, hbm)) + host
Collectives run asynchronously beside the layers' compute, but only independent work can hide them:
OVERLAP (0.8) is the share of the compute time assumed available to hide communication. The host
transfers happen in the optimizer update, after the last gradient, with nothing to hide behind.
A model for ranking plans against each other, not a measurement. With JAXLM_AOT_HLO_DIR set, each
fitting plan's compiled HLO text is written there, to check what the walk read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import re

import jax
from jax.experimental.compilation_cache import compilation_cache

from jaxlm import chips
from jaxlm.config import ConfigError, moe_layers, validate, with_vocab_size
from jaxlm.aot import hlo_cost
from jaxlm.models.compute import resolve_attention
from jaxlm.train import flops

# Training FLOPs relative to no recompute: "full" reruns every layer's forward (+1/3 of 3 passes);
# "dots" keeps matmul outputs and reruns the cheap elementwise work.
RECOMPUTE = {"none": 1.0, "dots_no_batch": 1.05, "dots": 1.05, "full": 4 / 3}
OVERLAP = 0.8  # share of max(compute, hbm) time that can hide collectives (see the module docstring)
# Host <-> device bandwidth per chip assumed for offloaded state: PCIe 4.0 x16 in one direction
# (about 32 GB/s); not a sourced figure for any one TPU host. --host_gbps overrides it.
HOST_LINK_GBPS = 32.0


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
  arguments: int  # bytes per device, in device memory (HBM)
  outputs: int  # not aliased to donated arguments
  temporaries: int
  code: int
  hbm: float
  flops_per_step: float  # all devices, with recompute
  step_seconds: float  # predicted (see `predict`); 0 until predicted
  note: str = ""  # why the compiler gave up, when it did
  host_arguments: int = 0  # bytes per device in host memory (offloaded optimizer state)
  host_outputs: int = 0  # not aliased to donated arguments
  host_temporaries: int = 0
  label: str = ""  # the sweep's rung: remat, grad accumulation, offload
  times: dict = dataclasses.field(default_factory=dict)  # compute / hbm / comm / host seconds
  traffic: hlo_cost.StepTraffic | None = None  # what the HLO walk read, for plans that fit

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries + self.code

  @property
  def host_total(self) -> int:
    return self.host_arguments + self.host_outputs + self.host_temporaries

  @property
  def fits(self) -> bool:
    return not self.note and self.total <= self.hbm


def predict(compute_s: float, traffic: hlo_cost.StepTraffic, chip: chips.Chip, host_bytes: float,
            host_gbps: float = HOST_LINK_GBPS) -> dict:
  """The step-time terms of the module docstring, in seconds; "step" is their combination. A chip
  with no interconnect figure (v4 ICI) gets comm None and the step leaves communication out."""
  hbm_s = traffic.hbm_bytes / (chip.hbm_gbps * 1e9) if chip.hbm_gbps else 0.0
  comm_s = traffic.collective_bytes / (chip.ici_gbps * 1e9) if chip.ici_gbps else None
  host_s = 2 * host_bytes / (host_gbps * 1e9)
  busy = max(compute_s, hbm_s)
  step = busy + max(0.0, (comm_s or 0.0) - OVERLAP * busy) + host_s
  return {"compute": compute_s, "hbm": hbm_s, "comm": comm_s, "host": host_s, "step": step}


def plan(config, devices, assumed_mfu: float = 1.0, host_gbps: float = HOST_LINK_GBPS,
         label: str = "") -> MemoryPlan:
  """Compiles config's train step for `devices` (abstract TPU devices), measures it and, when it
  fits, predicts its step time from the compiled program (`predict`)."""
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
  compute_s = step_flops / (len(devices) * chip.peak_tflops * 1e12 * assumed_mfu)
  result = functools.partial(
      MemoryPlan, mesh=dict(setup.mesh.shape), remat=remat, hbm=chip.hbm_bytes,
      flops_per_step=step_flops, step_seconds=compute_s, label=label or remat)
  lowered = jit_train_step(setup, frozen_shardings=setup.frozen_shardings).lower(state, batch, *frozen)
  try:
    with _no_persistent_cache():
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that exceed HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = re.search(r"required for [\w ]+ \(([\d.]+)G\)", str(e))
    device, host = _shard_bytes((state, batch, frozen))
    return result(arguments=device, outputs=0, host_arguments=host,
                  temporaries=int(float(needed.group(1)) * 2**30) if needed else 0, code=0,
                  note=str(e).split("\n")[0][:200])
  mem = compiled.memory_analysis()
  p = result(arguments=mem.argument_size_in_bytes,
             outputs=max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0),
             temporaries=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes,
             host_arguments=getattr(mem, "host_argument_size_in_bytes", 0),
             host_outputs=max(getattr(mem, "host_output_size_in_bytes", 0)
                              - getattr(mem, "host_alias_size_in_bytes", 0), 0),
             host_temporaries=getattr(mem, "host_temp_size_in_bytes", 0))
  if p.fits:  # the HLO walk costs seconds on large programs: only for plans that can be ranked
    text = compiled.as_text()
    if os.environ.get("JAXLM_AOT_HLO_DIR"):  # to read what the walk read
      name = "_".join(f"{k}{v}" for k, v in p.mesh.items() if v > 1) + "_" + p.label.replace(" ", "_")
      pathlib.Path(os.environ["JAXLM_AOT_HLO_DIR"], name + ".hlo").write_text(text)
    traffic = hlo_cost.step_traffic(text, len(devices))
    p.times = predict(compute_s, traffic, chip, p.host_arguments, host_gbps)
    p.traffic = traffic
    p.step_seconds = p.times["step"]
  return p


@contextlib.contextmanager
def _no_persistent_cache():
  """JAX's persistent compilation cache off (where a user turned it on): an executable compiled for
  a topology's abstract devices cannot be loaded back without a TPU client, so caching it costs a
  write now and a warning at every later read of it."""
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # JAX decides once whether to use the cache; decide again
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", was)
    compilation_cache.reset_cache()


def _shard_bytes(tree) -> tuple[int, int]:
  """(device, host) bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  device = host = 0
  for x in jax.tree.leaves(tree):
    size = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    if getattr(x.sharding, "memory_kind", None) == "pinned_host":
      host += size
    else:
      device += size
  return device, host


def expert_sizes(config, devices: int) -> list[int]:
  """Expert-axis sizes worth trying for `devices` devices, largest first: powers of two dividing
  both model.moe_num_experts and the devices; [1] for a dense model."""
  e = config.model.moe_num_experts
  if not e:
    return [1]
  return [s for s in (2 ** i for i in range(devices.bit_length() - 1, -1, -1))
          if e % s == 0 and devices % s == 0]


def meshes(config, num_devices: int):
  """fsdp x tensor (x expert) factorizations to try: tensor parallelism in the powers of two that
  divide the heads (and the device count), for MoE models each expert size of `expert_sizes`
  (most expert parallelism first), fsdp taking the remaining devices."""
  heads = math.gcd(config.model.num_heads, config.model.num_kv_heads)
  tensors = [t for t in (1, 2, 4, 8) if heads % t == 0 and num_devices % t == 0]
  return [dict(data=1, stage=1, fsdp=num_devices // (t * ep), sequence=1, expert=ep, tensor=t)
          for t in tensors for ep in expert_sizes(config, num_devices // t)]


# The memory-saving ladder, least added time first: each rung saves memory and costs time over the
# one before (recompute, a serial micro-batch loop, host transfers), so for a mesh the sweep stops
# at the first rung that fits. (label, {config field: value}); `ladder` adds the chunked loss
# where the config has it.
LADDER = (
    ("none", {"compute.remat_policy": "none"}),
    ("dots", {"compute.remat_policy": "dots"}),
    ("full", {"compute.remat_policy": "full"}),
    ("full accum2", {"compute.remat_policy": "full", "train.grad_accum_steps": 2}),
    ("full accum4", {"compute.remat_policy": "full", "train.grad_accum_steps": 4}),
    ("full accum4 offload", {"compute.remat_policy": "full", "train.grad_accum_steps": 4,
                             "compute.offload_optimizer": True}),
)

def ladder(config) -> tuple:
  """LADDER for this config: with a train.loss_chunk field (the chunked head and loss) still 0, a
  rung that computes the logits 1024 tokens at a time goes between full remat and grad accumulation
  (it costs one more forward of the head, less than a serial micro-batch loop). A config that
  already chunks its loss (the presets) gets no such rung: it would compile the full-remat plan
  again."""
  if ("loss_chunk" not in config.train or config.train.loss_chunk or config.data.seq_len % 1024
      or config.data.seq_len == 1024):
    return LADDER
  chunked = ("full chunked-loss", {"compute.remat_policy": "full", "train.loss_chunk": 1024})
  return LADDER[:3] + (chunked,) + LADDER[3:]


# Pipeline schedules to try, each (label, {config field: value}) applied with a mesh. Only "no
# pipeline" for now: a schedule (mesh.stage > 1 with compute.pipeline_schedule "gpipe" or
# "circular" and its repeats, once those fields are on this branch) is added here as one entry per
# schedule, with `meshes` giving stage > 1 factorizations, and the sweep tries every mesh x
# schedule with the same ladder.
SCHEDULES = (("", {}),)


def apply(config, overrides: dict):
  """A copy of config with {"section.field": value} set."""
  c = config.copy_and_resolve_references()
  for name, value in overrides.items():
    section, field = name.split(".")
    c[section][field] = value
  return c


def activation_floor(config, mesh: dict) -> float:
  """A lower bound on one chip's bytes for the state (parameters, gradients and Adam's two moments,
  every routed expert included, sharded over every device; host-resident moments left out; with
  LoRA the base weights alone) and the residuals the remat policy keeps: every layer's input under
  "full"; its projections' outputs under "dots" and "none" (which keeps more), and with XLA's
  attention (what the TPU runs for compute.attention; flash keeps no scores) each layer's score
  matrix too, a dot output both policies keep. Rows are split over data, fsdp and expert (the
  batch rule). The sweep skips a rung whose floor exceeds HBM without compiling it."""
  m, c, t = config.model, config.compute, config.train
  devices = math.prod(mesh.values())
  moe = sum(moe_layers(m))
  per_width = m.d_model * (2 if m.mlp_kind == "gelu" else 3)
  expert_dim = m.moe_mlp_dim or m.mlp_dim
  idle_experts = moe * (m.moe_num_experts - m.moe_experts_per_token) * per_width * expert_dim
  params = (flops.matmul_params(m) + idle_experts
            + m.d_model * m.vocab_size * (0 if m.tie_embeddings else 1))
  itemsize = 2 if c.param_dtype == "bfloat16" else 4  # optax keeps moments in the parameters' dtype
  copies = 1 if config.lora.rank else (2 if c.offload_optimizer else 4)  # LoRA: frozen base only
  state = params * itemsize * copies / devices
  rows = t.batch_size / (mesh["data"] * mesh["fsdp"] * mesh.get("expert", 1) * t.grad_accum_steps)
  seq = config.data.seq_len / mesh["sequence"]
  act = 2 if c.compute_dtype == "bfloat16" else 4
  if c.remat_policy == "full":
    return state + m.num_layers * rows * seq * m.d_model * act
  hd = m.head_dim or m.d_model // m.num_heads
  # hidden units a token passes through, all layers together
  mlp = ((m.num_layers - moe) * m.mlp_dim
         + moe * expert_dim * (m.moe_experts_per_token + m.moe_shared_experts))
  # every layer's q, k, v, o outputs and up, gate, down outputs
  width = (m.num_layers * ((m.num_heads + 2 * m.num_kv_heads) * hd / mesh["tensor"] + 2 * m.d_model)
           + 2 * mlp / mesh["tensor"])
  attention = c.attention
  if attention == "auto":
    attention = resolve_attention("auto", "tpu", attention_kind=m.attention_kind)[0]
  scores = 0.0
  if attention == "xla":
    scores = m.num_layers * rows * m.num_heads / mesh["tensor"] * seq * config.data.seq_len * act
  return state + rows * seq * width * act + scores
