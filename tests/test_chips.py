"""Hardware facts: chip figures by the device_kind strings jax reports, TPU slice names and shapes."""

import math

import pytest

from jaxlm import chips

pytestmark = pytest.mark.fast  # unit tests: the `-m fast` tier


def test_every_chip_has_both_figures_in_plausible_units():
  for name, c in chips.CHIPS.items():
    assert isinstance(c, chips.Chip), name
    # TFLOP/s, not FLOP/s; bytes, not GB: every accelerator here is 100-2000 TFLOP/s and 16-200 GB.
    assert 100 <= c.peak_tflops <= 2000, name
    assert 16e9 <= c.hbm_bytes <= 200e9, name


# What jax reports as device_kind on each chip, and the spec-sheet figures it must resolve to.
# HBM and interconnect bandwidths in GB/s (bytes); ICI Gbps / 8 (v5p 4800 Gbps = 600 GB/s).
@pytest.mark.parametrize("kind, tflops, hbm, hbm_gbps, ici_gbps", [
    ("TPU v4", 275, 32e9, 1200, None),
    ("TPU v5 lite", 197, 16e9, 819, 200), ("TPU v5e", 197, 16e9, 819, 200),  # not the v5p "TPU v5"
    ("TPU v5p", 459, 95e9, 2765, 600), ("TPU v5", 459, 95e9, 2765, 600),
    ("TPU v6 lite", 918, 32e9, 1640, 448), ("TPU v6e", 918, 32e9, 1640, 448),
    ("NVIDIA H100 80GB HBM3", 989, 80e9, 3350, 900),  # SXM
    ("NVIDIA H100 PCIe", 756, 80e9, None, None),  # not the SXM "NVIDIA H100" prefix
    ("NVIDIA H200", 989, 141e9, 4800, 900),
    ("NVIDIA A100-SXM4-80GB", 312, 80e9, 2039, 600), ("NVIDIA A100-SXM4-40GB", 312, 40e9, 1555, 600),
])
def test_device_kinds_resolve_to_their_chip(kind, tflops, hbm, hbm_gbps, ici_gbps):
  assert chips.chip(kind) == chips.Chip(tflops, hbm, hbm_gbps, ici_gbps)


@pytest.mark.parametrize("kind", ["cpu", "TPU v3", "NVIDIA GeForce RTX 4090", ""])
def test_unknown_device_kinds_have_no_figures(kind):
  assert chips.chip(kind) is None


def test_standard_shapes_hold_their_chip_counts():
  for name, g in chips.TPU_GENERATIONS.items():
    for count, shape in g.shapes.items():
      dims = [int(d) for d in shape.split("x")]
      assert len(dims) == g.torus_dims and math.prod(dims) == count, (name, count, shape)
      assert g.valid_chips(count), (name, count)


@pytest.mark.parametrize("name, generation, chip_count, shape, hosts, gcloud", [
    ("v5p-8", "v5p", 4, "2x2x1", 1, "v5p-8"),
    ("v5p-64", "v5p", 32, "2x4x4", 8, "v5p-64"),
    ("v5p-1024", "v5p", 512, "8x8x8", 128, "v5p-1024"),
    ("v5p-24", "v5p", 12, "", 3, "v5p-24"),  # a valid slice without a standard shape here
    ("v4-32", "v4", 16, "2x2x4", 4, "v4-32"),
    ("v5e-8", "v5e", 8, "2x4", 1, "v5litepod-8"),  # 8 chips on one host
    ("v5e-16", "v5e", 16, "4x4", 4, "v5litepod-16"),
    ("v5litepod-256", "v5e", 256, "16x16", 64, "v5litepod-256"),
    ("v6e-4", "v6e", 4, "2x2", 1, "v6e-4"),
])
def test_slice_names(name, generation, chip_count, shape, hosts, gcloud):
  s = chips.parse_slice_name(name)
  assert (s.generation, s.chips, s.shape, s.hosts, s.accelerator_type) == (
      generation, chip_count, shape, hosts, gcloud)


@pytest.mark.parametrize("text, topology, chip_count", [
    ("v5p:2x2x1", "v5p:2x2x1", 4), ("v5p-64", "v5p:2x4x4", 32), ("v5p-1024", "v5p:8x8x8", 512),
    ("v5e-16", "v5e:4x4", 16), ("v5p:2x2x3", "v5p:2x2x3", 12), ("v6e:8x8", "v6e:8x8", 64),
])
def test_topologies(text, topology, chip_count):
  s = chips.parse_topology(text)
  assert (s.topology, s.chips) == (topology, chip_count)


@pytest.mark.parametrize("text, message", [
    ("v7x:2x2x2", r"unknown TPU topology 'v7x:2x2x2'.*like 'v5p:4x4x4'"),
    ("v5p:4x4", r"v5p topologies have 3 dimensions, got '4x4'; e.g. v5p:2x2x4"),
    ("v5p-100", r"'v5p-100': v5p slices are a multiple of 8 TensorCores from 8 to 12288; e.g. v5p-64"),
    ("v5p-12296", r"v5p slices are a multiple of 8 TensorCores from 8 to 12288"),
    ("v5e-12", r"v5e slices are 1, 4, 8, 16, 32, 64, 128 or 256 chips; e.g. v5e-32"),
    ("v5x-64", r"unknown TPU accelerator type 'v5x-64'; use one of v4-N .*v5e-N .*v5p-N .*v6e-N"),
    ("v5p", r"'v5p' has no size; write v5p-N"),
])
def test_bad_names_name_the_valid_ones(text, message):
  with pytest.raises(chips.HardwareError, match=message):
    chips.parse_topology(text)


def test_a_slice_without_a_standard_shape_asks_for_the_shape():
  with pytest.raises(chips.HardwareError, match=r"v5p-24 \(12 chips\) has no standard shape.*v5p-64 \(2x4x4\)"):
    chips.parse_topology("v5p-24").topology
