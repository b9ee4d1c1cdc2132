"""The device mesh from `config.mesh`, and the checks that need the device count.

Mesh axes, outermost (slowest links) to innermost (fastest links):

    data, stage, fsdp, sequence, expert, tensor

Each axis has an in-slice size (`mesh.<axis>`, over ICI / NVLink / one host) and a cross-slice size
(`mesh.dcn_<axis>`, over the data-center network); the mesh axis is their product. Tensor
parallelism talks every layer, so it is innermost and lands on neighbouring devices; data
parallelism talks once per step, so it is outermost and is the natural axis to put across slices.
One in-slice size (and one DCN size) may be -1: it absorbs whatever devices (slices) are left.

`stage` splits the layer stack into pipeline stages (jaxlm/parallel/pipeline.py). `expert` splits a
MoE layer's experts (jaxlm/parallel/experts.py): its devices exchange tokens all-to-all in every MoE
layer, so it sits inside, next to tensor. Outside the MoE layers it is one more fsdp-like axis (batch
rows split over data x fsdp x expert, as DeepSeek-V3 and MaxText do, and the default rules shard the
non-expert parameters over fsdp x expert), so a dense model with mesh.expert > 1 simply runs fully
sharded data parallel over it.

`resolve_mesh(config, num_devices, num_slices)` does all the arithmetic and every check that needs
the device count, raising ConfigError naming the field and the fix; `make_mesh` builds the mesh. Both
run before anything is compiled.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils

from jaxlm.config import MESH_AXES, ConfigError, rows_per_example
from jaxlm.parallel.pipeline import pipeline_microbatches

BATCH_AXES = ("data", "fsdp", "expert")  # the axes the batch rows are split over (the "data-like" axes)


def _resolve(sizes: dict[str, int], total: int, what: str, prefix: str) -> dict[str, int]:
  """Replaces a -1 in `sizes` so the product is `total`; checks the product otherwise."""
  free = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if total % fixed:
      raise ConfigError(
          f"config field '{prefix}{free[0]}' is -1, but the other {prefix}* sizes multiply to {fixed}, "
          f"which does not divide the {total} {what}; make them divide {total}")
    sizes = {**sizes, free[0]: total // fixed}
  elif fixed != total:
    shown = " x ".join(f"{prefix}{a}={s}" for a, s in sizes.items() if s != 1) or "all 1"
    raise ConfigError(
        f"the mesh sizes ({shown}) multiply to {fixed} but there are {total} {what}; set one of "
        f"{[prefix + a for a in sizes]} to -1 to absorb the rest, or make the product {total}")
  return sizes


def resolve_mesh(config, num_devices: int, num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
  """(in-slice sizes, cross-slice sizes) per axis with the -1s filled in; checks the model fits.

  Raises ConfigError for sizes that do not multiply to the device count and for model or batch
  dimensions the mesh cannot split: heads or kv_heads not divisible by tensor, layers by stage,
  experts by expert, the (micro)batch by data x fsdp x expert, the sequence by sequence.
  """
  m = config.mesh
  if num_devices % num_slices:
    raise ConfigError(f"{num_devices} devices do not split evenly into {num_slices} slices")
  dcn = _resolve({a: m[f"dcn_{a}"] for a in MESH_AXES}, num_slices, "slices", "mesh.dcn_")
  ici = _resolve({a: m[a] for a in MESH_AXES}, num_devices // num_slices, "devices per slice", "mesh.")
  size = {a: ici[a] * dcn[a] for a in MESH_AXES}

  model, t, compute = config.model, config.train, config.compute
  tensor = size["tensor"]
  for field, value in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads)):
    if value % tensor:
      raise ConfigError(
          f"model.{field} ({value}) is not divisible by the tensor axis ({tensor} = mesh.tensor x "
          f"mesh.dcn_tensor): tensor parallelism splits whole heads; use a tensor size that divides "
          f"{value}, or move those devices to mesh.fsdp or mesh.data")
  if model.num_layers % size["stage"]:
    raise ConfigError(
        f"model.num_layers ({model.num_layers}) is not divisible by the stage axis ({size['stage']}); "
        "each pipeline stage holds the same number of layers")
  experts = size["expert"]
  if model.moe_num_experts and model.moe_num_experts % experts:
    raise ConfigError(
        f"model.moe_num_experts ({model.moe_num_experts}) is not divisible by the expert axis "
        f"({experts} = mesh.expert x mesh.dcn_expert): each expert-parallel rank holds the same "
        f"number of whole experts; use an expert size that divides {model.moe_num_experts}, or move "
        "those devices to mesh.data or mesh.fsdp")
  rows = math.prod(size[a] for a in BATCH_AXES)
  micro = t.batch_size * rows_per_example(config) // t.grad_accum_steps
  if micro % rows:
    raise ConfigError(
        f"train.batch_size ({t.batch_size}) x {rows_per_example(config)} rows an example / "
        f"train.grad_accum_steps ({t.grad_accum_steps}) = {micro} rows "
        f"per micro-batch is not divisible by the data-like axes (data x fsdp x expert = {rows}); make "
        f"the batch a multiple of {rows * t.grad_accum_steps} or shrink mesh.data / mesh.fsdp / "
        "mesh.expert")
  if size["stage"] > 1:
    if not compute.scan_layers:
      raise ConfigError(
          f"the stage axis is {size['stage']} but compute.scan_layers is False; pipeline stages split "
          "the stacked layers, so set compute.scan_layers=True (or mesh.stage=1)")
    chunks = size["stage"] * compute.pipeline_repeats
    if compute.pipeline_schedule == "circular" and model.num_layers % chunks:
      raise ConfigError(
          f"model.num_layers ({model.num_layers}) is not divisible by the stage axis "
          f"({size['stage']}) x compute.pipeline_repeats ({compute.pipeline_repeats}) = {chunks}; "
          "the circular schedule gives each stage pipeline_repeats equal chunks of layers: change "
          "compute.pipeline_repeats, or use compute.pipeline_schedule='gpipe'")
    pipe = pipeline_microbatches(compute, size["stage"])
    if micro % (pipe * rows):
      raise ConfigError(
          f"{micro} rows per step do not split into compute.pipeline_microbatches ({pipe}) pipeline "
          f"micro-batches of a multiple of data x fsdp x expert = {rows} rows; make train.batch_size a "
          f"multiple of {pipe * rows * t.grad_accum_steps} or change compute.pipeline_microbatches")
  if config.data.seq_len % size["sequence"]:
    raise ConfigError(
        f"data.seq_len ({config.data.seq_len}) is not divisible by the sequence axis "
        f"({size['sequence']}); make data.seq_len a multiple of it or lower mesh.sequence")
  return ici, dcn


def _num_slices(devices) -> int:
  """Slices (granules joined by DCN): TPU slice_index if the devices have one, else 1."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The mesh `config.mesh` asks for over `devices` (default: all), axes MESH_AXES, Auto axis types.

  Auto (not Explicit) axis types: the train step relies on sharding propagation between the
  in/out shardings and the model's with_sharding_constraint points.
  On one slice, `mesh_utils.create_device_mesh` orders devices so inner axes get the fastest
  links; across slices (any dcn_* > 1) `create_hybrid_device_mesh` puts dcn_* across slices
  (treating each process as a slice on hardware without slice ids, e.g. GPUs or CPU hosts).
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn_requested = any(config.mesh[f"dcn_{a}"] > 1 for a in MESH_AXES)
  slices = _num_slices(devices)
  by_process = False
  if dcn_requested and slices == 1:  # no slice ids: each process is one granule
    slices, by_process = len({d.process_index for d in devices}), True
  ici, dcn = resolve_mesh(config, len(devices), slices)
  ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=by_process)
  else:
    grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(np.asarray(grid), MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def platform(mesh: jax.sharding.Mesh) -> str:
  """The platform of the mesh's devices ("tpu" for abstract TPU devices planned on a CPU host)."""
  return mesh.devices.flat[0].platform
