"""The AOT planner: compiles the real train step for abstract TPU slices on this CPU machine."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="the planner needs libtpu (pip install -e '.[test]' installs it)")

from jaxlm import presets
from jaxlm.aot.plan import candidates, plan, topology_name, tpu_devices  # noqa: E402
from jaxlm.config import ConfigError, validate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny():
  return presets.load("tiny").get_config()


def test_topology_names_reach_libtpu_and_errors_are_config_errors():
  # The names themselves are tested in tests/test_chips.py; here: the planner hands libtpu the shape
  # a slice name stands for, and a bad name stops the CLI as a ConfigError.
  assert topology_name("v5p-64") == "v5p:2x4x4"
  assert len(tpu_devices("v5p-8")) == 4 and len(tpu_devices("v5e-16")) == 16
  with pytest.raises(ConfigError, match=r"v5p-100': v5p slices are a multiple of 8 TensorCores"):
    topology_name("v5p-100")
  with pytest.raises(ConfigError, match=r"v5p-24 \(12 chips\) has no standard shape"):
    tpu_devices("v5p-24")


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
  # 4 v5p chips of 459 TFLOP/s each (the spec sheet) at the default 50% MFU.
  assert p.flops_per_step > 0 and p.step_seconds == pytest.approx(p.flops_per_step / (4 * 459e12 * 0.5))


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


@pytest.mark.fast
def test_sweep_order_is_cheapest_first():
  tried = list(candidates(tiny(), 8))
  assert tried[0] == ("none", dict(data=1, stage=1, fsdp=8, sequence=1, expert=1, tensor=1))
  assert [r for r, _ in tried] == sorted((r for r, _ in tried), key=["none", "dots", "full"].index)
  # MoE models: expert sizes dividing the experts and the devices, most expert parallelism first
  c = tiny()
  c.model.update(moe_num_experts=4, moe_mlp_dim=64)
  meshes = [m for r, m in candidates(c, 8) if r == "none"]
  assert [(m["tensor"], m["expert"], m["fsdp"]) for m in meshes][:4] == [
      (1, 4, 2), (1, 2, 4), (1, 1, 8), (2, 4, 1)]


def test_cli_sweep_stops_at_the_first_plan_that_fits():
  out = subprocess.run(
      [sys.executable, "-m", "jaxlm.aot", f"--config={ROOT}/configs/tiny.py", "--topology=v5p:2x2x1",
       "--sweep"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "first that fits (least recompute, then least tensor parallelism): mesh" in out.stdout
  assert "remat none" in out.stdout and out.stdout.count("\ntried ") == 1  # the first candidate fits


def test_cli_exits_nonzero_when_the_job_does_not_fit():
  out = subprocess.run(
      [sys.executable, "-m", "jaxlm.aot", f"--config={ROOT}/configs/tiny.py", "--topology=v5e:2x2",
       "--config.model.d_model=4096", "--config.model.num_heads=32", "--config.model.num_kv_heads=8",
       "--config.model.mlp_dim=16384", "--config.model.num_layers=8"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 1, out.stderr[-2000:]
  assert " NO " in out.stdout and "does not fit" in out.stdout and "grad_accum_steps" in out.stdout


def test_moe_plan_with_an_expert_axis():
  """A MoE model's step compiles for TPU with its experts split over mesh.expert (the all-to-all
  dispatch, jaxlm/parallel/experts.py)."""
  c = tiny()
  c.model.update(moe_num_experts=4, moe_mlp_dim=64)
  c.mesh.update(data=1, expert=4)
  p = plan(c, tpu_devices("v5p:2x2x1"))
  assert p.mesh["expert"] == 4 and p.fits and p.temporaries > 0
