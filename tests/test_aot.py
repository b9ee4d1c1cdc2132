"""The AOT planner: compiles the real train step for abstract TPU slices on this CPU machine."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="the planner needs libtpu (pip install -e '.[test]' installs it)")

from jaxlm import presets
from jaxlm import chips
from jaxlm.aot import hlo_cost, report
from jaxlm.aot.plan import (LADDER, MemoryPlan, activation_floor, apply, ladder, meshes, plan,  # noqa: E402
                            predict, topology_name, tpu_devices)
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


def _fsdp4():
  c = tiny()
  c.model.update(d_model=512, mlp_dim=2048)  # TPU tiles pad dims to 128: shards of 64/4 would not shrink
  c.mesh.update(data=1, fsdp=4)
  return c


@pytest.fixture(scope="module")
def fsdp4_plan():
  """tiny (2 layers) at d_model 512 over fsdp 4 of v5p:2x2x1, compiled once for the tests below."""
  return plan(_fsdp4(), tpu_devices("v5p:2x2x1"))


def test_tiny_plan_fits_and_shards_the_state(fsdp4_plan):
  c = _fsdp4()
  devices = tpu_devices("v5p:2x2x1")
  p = fsdp4_plan
  assert p.mesh["fsdp"] == 4 and p.fits
  assert 0 < p.arguments < 1e8 and p.temporaries > 0 and p.hbm == 95e9
  # fsdp4 holds about a quarter of the parameters + optimizer state that data4 replicates.
  c.mesh.update(data=4, fsdp=1)
  replicated = plan(c, devices)
  assert p.arguments < 0.35 * replicated.arguments
  # compute: 4 v5p chips of 459 TFLOP/s each (the spec sheet) at the peak; the step adds HBM time.
  assert p.flops_per_step > 0 and p.times["compute"] == pytest.approx(p.flops_per_step / (4 * 459e12))
  assert p.step_seconds >= max(p.times["compute"], p.times["hbm"]) > 0 and p.host_total == 0
  # offloaded optimizer state moves Adam's moments (2 x 4 bytes a parameter, sharded) to host memory
  c.mesh.update(data=1, fsdp=4)
  c.compute.offload_optimizer = True
  off = plan(c, devices)
  assert off.fits and off.host_arguments > 0.5 * p.arguments and off.arguments < 0.5 * p.arguments
  assert off.times["host"] == pytest.approx(2 * off.host_arguments / 32e9)


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
def test_sweep_meshes_and_ladder():
  assert meshes(tiny(), 8)[0] == dict(data=1, stage=1, fsdp=8, sequence=1, expert=1, tensor=1)
  assert [m["tensor"] for m in meshes(tiny(), 8)] == [1, 2]  # tiny: gcd of its heads and KV heads is 2
  assert [label for label, _ in LADDER][:3] == ["none", "dots", "full"] and "offload" in LADDER[-1][0]
  # the floor: each rung needs no more than the one before it
  c, mesh = tiny(), dict(data=1, stage=1, fsdp=8, sequence=1, expert=1, tensor=1)
  floors = [activation_floor(apply(c, fields), mesh) for _, fields in LADDER]
  assert floors[1:] <= floors[:-1] and floors[0] > 0
  # a config with the chunked loss gets its rung after full remat, before grad accumulation
  assert ladder(c) == LADDER  # tiny has no train.loss_chunk here
  chunky = c.copy_and_resolve_references()
  chunky.unlock()
  chunky.train.loss_chunk = 0
  chunky.data.seq_len = 4096
  assert [label for label, _ in ladder(chunky)][2:5] == ["full", "full chunked-loss", "full accum2"]
  # MoE models: expert sizes dividing the experts and the devices, most expert parallelism first
  moe = tiny()
  moe.model.update(moe_num_experts=4, moe_mlp_dim=64)
  assert [(m["tensor"], m["expert"], m["fsdp"]) for m in meshes(moe, 8)][:4] == [
      (1, 4, 2), (1, 2, 4), (1, 1, 8), (2, 4, 1)]
  # Rows are split over expert as over fsdp (the batch rule): fsdp2 x expert4 keeps what fsdp8 keeps.
  full = apply(moe, {"compute.remat_policy": "full"})
  fsdp8 = dict(data=1, stage=1, fsdp=8, sequence=1, expert=1, tensor=1)
  assert activation_floor(full, {**fsdp8, "fsdp": 2, "expert": 4}) == activation_floor(full, fsdp8)
  # Under remat none XLA's attention keeps each layer's [rows, heads, seq, seq] scores; flash none.
  xla = apply(c, {"compute.remat_policy": "none", "compute.attention": "xla"})
  flash = apply(xla, {"compute.attention": "flash"})
  m, rows = c.model, c.train.batch_size / 8
  scores = m.num_layers * rows * m.num_heads * c.data.seq_len ** 2 * 4  # float32
  assert activation_floor(xla, fsdp8) - activation_floor(flash, fsdp8) == pytest.approx(scores)
  # A config that already chunks its loss gets no rung that would compile it again.
  chunky.train.loss_chunk = 1024
  assert ladder(chunky) == LADDER


@pytest.mark.fast
def test_first_fit_sweep_stops_at_the_first_plan_that_fits(monkeypatch, capsys):
  """With plans faked (no compile): the first mesh's fourth rung fits, so the second mesh is never
  tried, and a rung the config already reaches (grad accumulation 2) is not compiled twice."""
  tried = []

  def fake_plan(c, devices, mfu, host_gbps, label):
    tried.append((c.mesh.tensor, label))
    fits = label == "full accum4"
    return MemoryPlan(mesh=dict(tensor=c.mesh.tensor), remat=c.compute.remat_policy, arguments=1,
                      outputs=0, temporaries=0 if fits else 10**12, code=0, hbm=95e9,
                      flops_per_step=1.0, step_seconds=1.0, label=label)

  monkeypatch.setattr(report, "plan", fake_plan)
  c = apply(tiny(), {"train.grad_accum_steps": 2})
  assert [m["tensor"] for m in meshes(c, 4)] == [1, 2]
  assert report.sweep(c, "v5p:2x2x1", 1.0, 32.0, first_fit=True) == 0
  assert tried == [(1, "none"), (1, "dots"), (1, "full"), (1, "full accum4")]
  out = capsys.readouterr().out
  assert out.count("as the rung before: not compiled again") == 1
  assert "first fit: mesh {'tensor': 1}, full accum4" in out and "ranked" not in out
  with pytest.raises(ConfigError, match="--first_fit compiles one plan at a time.*drop --jobs"):
    report.sweep(c, "v5p:2x2x1", 1.0, 32.0, jobs=2, first_fit=True)


_HLO = """HloModule m

%cond (p: (s32[], f32[80,64,128])) -> pred[] {
  %p = (s32[], f32[80,64,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(80)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[80,64,128])) -> (s32[], f32[80,64,128]) {
  %p = (s32[], f32[80,64,128]{2,1,0}) parameter(0)
  %w = f32[80,64,128]{2,1,0} get-tuple-element(%p), index=1
  %x = f32[8,128]{1,0} parameter(1)
  %cc = f32[8,128]{1,0} custom-call(%x), custom_call_target="k", frontend_attributes={a="{
}}", metadata={op_name="a kernel whose attributes span lines"}
  %ag = f32[64,128]{1,0} all-gather(%x), channel_id=1, replica_groups=[16,8]<=[128], dimensions={0}
  %ar = f32[64,128]{1,0} all-reduce(%ag), channel_id=2, replica_groups=mesh['a'=32,'b'=4] {'b'}, to_apply=%add
  %f = f32[64,128]{1,0} fusion(%ag, %w), kind=kLoop, calls=%fused
  %g = f32[32,128]{1,0} fusion(%f), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %t = (s32[], f32[80,64,128]{2,1,0}) tuple(%i, %w)
}

%all-reduce-scatter.1 (y: f32[64,128]) -> f32[32,128] {
  %y = f32[64,128]{1,0} parameter(0)
  %sum = f32[64,128]{1,0} all-reduce(%y), channel_id=4, replica_groups={{0,1}}, to_apply=%add
  ROOT %s = f32[32,128]{1,0} dynamic-slice(%sum, %i, %i), dynamic_slice_sizes={32,128}
}

ENTRY %main (a: f32[80,64,128]) -> f32[80,64,128] {
  %a = f32[80,64,128]{2,1,0} parameter(0)
  %rs = f32[8,128]{1,0} reduce-scatter(%a), channel_id=3, replica_groups={{0,1},{2,3}}, dimensions={0}
  %loop = (s32[], f32[80,64,128]{2,1,0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[80,64,128]{2,1,0} get-tuple-element(%loop), index=1
}
"""


@pytest.mark.fast
def test_hlo_walk_multiplies_loop_bodies_by_their_trip_count():
  t = hlo_cost.step_traffic(_HLO, 128)
  layer = 64 * 128 * 4  # one [64, 128] float32 array
  assert t.unknown_trips == 0
  assert t.by_collective["all-gather"] == pytest.approx(80 * layer * 7 / 8)  # groups of 8
  assert t.by_collective["all-reduce"] == pytest.approx(80 * 2 * layer * 3 / 4)  # mesh axis b of 4
  # {{0,1},..}: 2; once at the entry, and the fused reduce-scatter (all-reduce + slice) each trip
  assert t.by_collective["reduce-scatter"] == pytest.approx(80 * layer / 2 + 80 * layer / 2)
  # the fusion inside the loop reads its [80, 64, 128] stacked operand one [64, 128] slice a trip
  shard = 8 * 128 * 4
  # fusions, all-reduce, all-gather: out + operands
  in_loop = 3 * layer + layer // 2 + layer + 2 * layer + (layer + shard) + 2 * shard  # + custom call
  at_entry = 80 * layer + shard  # the reduce-scatter reads the whole stack, once
  assert t.hbm_bytes == pytest.approx(80 * in_loop + at_entry)


@pytest.mark.fast
def test_prediction_combines_the_terms():
  v5p = chips.chip("TPU v5p")
  t = hlo_cost.StepTraffic(hbm_bytes=2765e9, collective_bytes=600e9 * 3)  # 1 s of HBM, 3 s of ICI
  p = predict(2.0, t, v5p, host_bytes=16e9, host_gbps=32)
  assert p["hbm"] == pytest.approx(1.0) and p["comm"] == pytest.approx(3.0) and p["host"] == 1.0
  assert p["step"] == pytest.approx(2.0 + (3.0 - 0.8 * 2.0) + 1.0)
  assert predict(2.0, t, chips.chip("TPU v4"), 0)["comm"] is None  # no sourced v4 ICI figure


def test_trip_counts_scale_the_layer_loop(fsdp4_plan):
  # cost_analysis() counts the layer scan's body once; the HLO walk counts it once per layer.
  c = _fsdp4()
  assert c.model.num_layers == 2
  two = fsdp4_plan.traffic
  eight = plan(apply(c, {"model.num_layers": 8}), tpu_devices("v5p:2x2x1")).traffic
  assert two.unknown_trips == eight.unknown_trips == 0
  assert 3 < eight.by_collective["all-gather"] / two.by_collective["all-gather"] < 4.5


def test_cli_sweep_ranks_the_plans_that_fit():
  out = subprocess.run(
      [sys.executable, "-m", "jaxlm.aot", f"--config={ROOT}/configs/tiny.py", "--topology=v5p:2x2x1",
       "--sweep"], capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  # tiny fits at the first rung on each mesh (fsdp4, fsdp2 x tensor2), and both are ranked
  assert out.stdout.count("\ntried ") == 2 and "#1 " in out.stdout and "#2 " in out.stdout
  assert "ranked by predicted step time" in out.stdout and "picked: mesh" in out.stdout


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
