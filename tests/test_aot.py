"""The AOT planner: compiles the real train step for abstract TPU slices on this CPU machine."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="the planner needs libtpu (pip install -e '.[test]' installs it)")

from jaxlm.aot.plan import candidates, plan, topology_name, tpu_devices  # noqa: E402
from jaxlm.config import ConfigError, validate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny():
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny as tiny_module
  return tiny_module.get_config()


@pytest.mark.parametrize("name,expected", [
    ("v5p:2x2x1", "v5p:2x2x1"), ("v5p-64", "v5p:2x4x4"), ("v5p-1024", "v5p:8x8x8"), ("v5e-16", "v5e:4x4"),
])
def test_topology_names(name, expected):
  assert topology_name(name) == expected


@pytest.mark.parametrize("name,message", [
    ("v7x:2x2x2", r"unknown TPU topology 'v7x:2x2x2'.*like 'v5p:4x4x4'"),
    ("v5p:4x4", r"v5p topologies have 3 dimensions"),
    ("v5p-100", r"no standard v5p slice with 100 cores; known: .*v5p-64"),
])
def test_bad_topologies_name_the_fix(name, message):
  with pytest.raises(ConfigError, match=message):
    topology_name(name)


def test_tiny_plan_fits_and_shards_the_state():
  c = tiny()
  c.model.update(d_model=512, mlp_dim=2048)  # TPU tiles pad dims to 128: shards of 64/4 would not shrink
  c.mesh.update(data=1, fsdp=4)
  devices = tpu_devices("v5p:2x2x1")
  p = plan(c, devices)
  assert p.mesh["fsdp"] == 4 and p.fits
  assert 0 < p.arguments < 1e8 and p.temporaries > 0 and p.hbm == 95e9
  # fsdp4 holds about a quarter of the parameters + optimizer state that data4 replicates.
  c.mesh.update(data=4, fsdp=1)
  replicated = plan(c, devices)
  assert p.arguments < 0.35 * replicated.arguments
  assert p.step_seconds > 0 and p.flops_per_step > 0


def test_a_model_that_cannot_fit_is_reported():
  c = tiny()
  c.model.update(d_model=4096, num_heads=32, num_kv_heads=8, mlp_dim=16384, num_layers=8)
  c.mesh.update(data=4)  # 1.7B parameters replicated: ~27 GB of state per 16 GB v5e chip
  p = plan(validate(c), tpu_devices("v5e:2x2"))
  assert not p.fits and p.total > 16e9


def test_mesh_larger_than_the_slice_names_the_fix():
  c = tiny()
  c.mesh.update(data=8)
  with pytest.raises(ConfigError, match=r"multiply to 8 but there are 4 devices.*-1"):
    plan(c, tpu_devices("v5p:2x2x1"))


def test_sweep_order_is_cheapest_first():
  tried = list(candidates(tiny(), 8))
  assert tried[0] == ("none", dict(data=1, stage=1, fsdp=8, sequence=1, tensor=1))
  assert [r for r, _ in tried] == sorted((r for r, _ in tried), key=["none", "dots", "full"].index)


def test_cli_sweep_prints_the_fastest_plan_that_fits():
  out = subprocess.run(
      [sys.executable, "-m", "jaxlm.aot", f"--config={ROOT}/configs/tiny.py", "--topology=v5p:2x2x1",
       "--sweep"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "fastest that fits: mesh" in out.stdout and "remat none" in out.stdout


def test_cli_exits_nonzero_when_the_job_does_not_fit():
  out = subprocess.run(
      [sys.executable, "-m", "jaxlm.aot", f"--config={ROOT}/configs/tiny.py", "--topology=v5e:2x2",
       "--config.model.d_model=4096", "--config.model.num_heads=32", "--config.model.num_kv_heads=8",
       "--config.model.mlp_dim=16384", "--config.model.num_layers=8"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 1, out.stderr[-2000:]
  assert " NO " in out.stdout and "does not fit" in out.stdout and "grad_accum_steps" in out.stdout
