"""Hardware facts, each in one table: what a chip computes and holds, and how Cloud TPU slices are
shaped and named.

Standard library only: launch/tpu_vm.py loads this file on machines without jax (see
launch/common.py), so it must not import jax, flax, or the jaxlm package.
"""

from __future__ import annotations

import dataclasses
import math
import re


class HardwareError(ValueError):
  """An unknown slice name or topology; the message names the valid ones."""


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_tflops: float  # dense bf16 matmul TFLOP/s (no sparsity), from the vendor's spec sheet
  hbm_bytes: float  # the vendor's HBM capacity per chip, decimal GB
  # HBM bandwidth per chip, GB/s (gigaBYTES per second), from the vendor's spec sheet.
  hbm_gbps: float | None = None
  # Inter-chip interconnect bandwidth per chip, GB/s (gigaBYTES per second): TPU ICI (Google
  # quotes gigabits: 4800 Gbps on v5p is 600 GB/s) or NVLink; None where no sourced figure is known.
  ici_gbps: float | None = None


# Keyed by the start of jax's `device_kind`: TPU v5e reports "TPU v5 lite", v6e "TPU v6 lite", v5p
# "TPU v5p" or "TPU v5"; GPUs report their marketing name ("NVIDIA H100 80GB HBM3"). The longest
# matching key wins, so "NVIDIA H100 PCIe" is not read as an SXM H100 nor "TPU v5 lite" as a v5p.
# Bandwidths (Cloud TPU system-architecture pages; NVIDIA data sheets): v4 HBM 1200 GB/s (its ICI
# figure is left unknown); v5e 819 GB/s, ICI 1600 Gbps; v5p 2765 GB/s, ICI 4800 Gbps; v6e 1640 GB/s,
# ICI 3584 Gbps; H100 SXM 3350 GB/s, NVLink 900 GB/s; H200 4800 GB/s, NVLink 900 GB/s; A100 80GB
# 2039 GB/s, A100 40GB 1555 GB/s, NVLink 600 GB/s. Variants without a sourced figure keep None.
CHIPS = {
    "TPU v4": Chip(275.0, 32e9, 1200.0),
    "TPU v5 lite": Chip(197.0, 16e9, 819.0, 200.0), "TPU v5e": Chip(197.0, 16e9, 819.0, 200.0),
    "TPU v5": Chip(459.0, 95e9, 2765.0, 600.0), "TPU v5p": Chip(459.0, 95e9, 2765.0, 600.0),
    "TPU v6 lite": Chip(918.0, 32e9, 1640.0, 448.0), "TPU v6e": Chip(918.0, 32e9, 1640.0, 448.0),
    "NVIDIA H100": Chip(989.0, 80e9, 3350.0, 900.0),  # SXM, "NVIDIA H100 80GB HBM3"
    "NVIDIA H100 PCIe": Chip(756.0, 80e9),
    "NVIDIA H100 NVL": Chip(835.0, 94e9),
    "NVIDIA H200": Chip(989.0, 141e9, 4800.0, 900.0),
    "NVIDIA A100": Chip(312.0, 80e9, 2039.0, 600.0),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
    "NVIDIA A100-SXM4-40GB": Chip(312.0, 40e9, 1555.0, 600.0),
    "NVIDIA A100-PCIE-40GB": Chip(312.0, 40e9, 1555.0),
}


def chip(device_kind: str) -> Chip | None:
  """The CHIPS entry whose key is the longest prefix of device_kind; None if no key is."""
  matches = [name for name in CHIPS if device_kind.startswith(name)]
  return CHIPS[max(matches, key=len)] if matches else None


# Standard slice shapes (chips per torus dimension) by chip count.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  gcloud: str  # the accelerator type's prefix in gcloud ("v5litepod-16" is a v5e slice)
  torus_dims: int
  cores_per_chip: int  # TensorCores the slice name counts per chip: v4-N and v5p-N count cores
  single_host_chips: int  # the largest slice one host drives; larger slices have 4 chips a host
  chip_step: int  # slices come in any multiple of this many chips; 0: only the counts in `shapes`
  max_chips: int
  shapes: dict  # chip count -> standard shape, e.g. 64 -> "4x4x4"

  def sizes(self) -> str:
    """The valid N of '<gen>-N', in words."""
    if self.chip_step:
      unit = "TensorCores" if self.cores_per_chip > 1 else "chips"
      step = self.chip_step * self.cores_per_chip
      return f"a multiple of {step} {unit} from {step} to {self.max_chips * self.cores_per_chip}"
    counts = [str(c) for c in self.shapes]
    return f"{', '.join(counts[:-1])} or {counts[-1]} chips"

  def valid_chips(self, chips: int) -> bool:
    if self.chip_step:
      return chips % self.chip_step == 0 and 0 < chips <= self.max_chips
    return chips in self.shapes


TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 3, 2, 4, 4, 4096, _SHAPES_3D),
    "v5e": TpuGeneration("v5litepod", 2, 1, 8, 0, 256, _SHAPES_2D),
    "v5p": TpuGeneration("v5p", 3, 2, 4, 4, 6144, _SHAPES_3D),
    "v6e": TpuGeneration("v6e", 2, 1, 8, 0, 256, _SHAPES_2D),
}
_BY_GCLOUD = {g.gcloud: name for name, g in TPU_GENERATIONS.items()}
_CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  generation: str  # a TPU_GENERATIONS key
  chips: int
  shape: str  # chips per torus dimension, "4x4x4"; "" where the size has no standard shape

  @property
  def size(self) -> int:
    """The N of the slice name '<gen>-N' (cores on v4/v5p, chips on v5e/v6e)."""
    return self.chips * TPU_GENERATIONS[self.generation].cores_per_chip

  @property
  def accelerator_type(self) -> str:  # as gcloud spells it
    return f"{TPU_GENERATIONS[self.generation].gcloud}-{self.size}"

  @property
  def hosts(self) -> int:
    if self.chips <= TPU_GENERATIONS[self.generation].single_host_chips:
      return 1
    return self.chips // _CHIPS_PER_HOST

  @property
  def topology(self) -> str:
    """'v5p:4x4x4', the name libtpu describes; an error where no standard shape is known."""
    if not self.shape:
      gen = TPU_GENERATIONS[self.generation]
      example = gen.shapes[16]
      raise HardwareError(
          f"{self.generation}-{self.size} ({self.chips} chips) has no standard shape here; give the "
          f"shape, chips per dimension, e.g. {self.generation}:{example}. Standard: "
          + ", ".join(f"{self.generation}-{c * gen.cores_per_chip} ({s})" for c, s in gen.shapes.items()))
    return f"{self.generation}:{self.shape}"


def _generation_list() -> str:
  return ", ".join(f"{name}-N ({g.sizes()})" for name, g in TPU_GENERATIONS.items())


def parse_slice_name(name: str) -> TpuSlice:
  """'v5p-64' (or gcloud's 'v5litepod-16') -> TpuSlice."""
  prefix, _, size = name.strip().partition("-")
  gen = _BY_GCLOUD.get(prefix, prefix)
  if gen not in TPU_GENERATIONS:
    raise HardwareError(f"unknown TPU accelerator type {name!r}; use one of {_generation_list()}, "
                        "e.g. v5p-64")
  g = TPU_GENERATIONS[gen]
  example = f"{gen}-{16 * g.cores_per_chip}"
  if not size.isdigit():
    raise HardwareError(f"{name!r} has no size; write {gen}-N, N being {g.sizes()}, e.g. {example}")
  n = int(size)
  if n % g.cores_per_chip or not g.valid_chips(n // g.cores_per_chip):
    raise HardwareError(f"{name!r}: {gen} slices are {g.sizes()}; e.g. {gen}-{32 * g.cores_per_chip}")
  chips = n // g.cores_per_chip
  return TpuSlice(gen, chips, g.shapes.get(chips, ""))


def parse_topology(text: str) -> TpuSlice:
  """A generation and shape, 'v5p:4x4x4' (chips per torus dimension), or a slice name, 'v5p-64'."""
  gen, colon, shape = text.strip().partition(":")
  if not colon:
    return parse_slice_name(text)
  g = TPU_GENERATIONS.get(_BY_GCLOUD.get(gen, gen))
  if g is None or not re.fullmatch(r"\d+(x\d+)+", shape):
    raise HardwareError(
        f"unknown TPU topology {text!r}; give a generation and shape like 'v5p:4x4x4' or 'v5e:8x8', "
        f"or a slice name like 'v5p-64' (generations: {', '.join(TPU_GENERATIONS)})")
  gen = _BY_GCLOUD.get(gen, gen)
  dims = [int(d) for d in shape.split("x")]
  if len(dims) != g.torus_dims:
    raise HardwareError(f"TPU {gen} topologies have {g.torus_dims} dimensions, got {shape!r}; e.g. "
                        f"{gen}:{g.shapes[16]}")
  return TpuSlice(gen, math.prod(dims), shape)
