"""The planner's printed lines: one row per plan, the header, and the sweep over meshes and the
memory-saving ladder (run in this process or, with --jobs, one process per mesh)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing

from jaxlm.aot.plan import (SCHEDULES, activation_floor, apply, chip_info, ladder, meshes, plan,
                            tpu_devices)
from jaxlm.config import ConfigError

_GB = 1e9


def _comm(t: dict) -> str:
  return f"{'n/a':>6s}" if t["comm"] is None else f"{t['comm']:6.3g}"


def row(name: str, p) -> str:
  mesh = " ".join(f"{k}{v}" for k, v in p.mesh.items() if v > 1) or "1 device"
  t = p.times
  times = (f"{t['compute']:7.3g} {t['hbm']:6.3g} {_comm(t)} "
           f"{t['host']:6.3g} {p.step_seconds:7.3g}") if t else f"{'':7s} {'':6s} {'':6s} {'':6s} {'':7s}"
  return (f"{name:8s} {mesh:20s} {p.label:20s} {p.arguments / _GB:7.2f} {p.temporaries / _GB:8.2f} "
          f"{p.total / _GB:8.2f} {p.hbm / _GB:4.0f} {p.host_total / _GB:7.2f} {'yes' if p.fits else 'NO':>4s} "
          f"{p.flops_per_step / 1e15:9.1f} {times}"
          + (f"\n{'':8s} compiler: {p.note}" if p.note else "")
          + (f"\n{'':8s} {p.traffic.unknown_trips} loop(s) with no readable trip count, counted once"
             if p.traffic and p.traffic.unknown_trips else ""))


HEADER = (f"{'':8s} {'mesh':20s} {'plan':20s} {'args GB':>7s} {'temp GB':>8s} {'total GB':>8s} {'HBM':>4s} "
          f"{'host GB':>7s} {'fits':>4s} {'PFLOP/step':>9s} {'compute':>7s} {'hbm s':>6s} {'comm s':>6s} "
          f"{'host s':>6s} {'step s':>7s}")




def _mesh_name(mesh: dict) -> str:
  return " ".join(f"{k}{v}" for k, v in mesh.items() if v > 1) or "1 device"


def walk_ladder(config, topology: str, mesh: dict, schedule, mfu: float, host_gbps: float):
  """(printed lines, the first plan that fits or None) of one mesh and schedule: the ladder's rungs
  in order, a rung whose floor exceeds HBM skipped without compiling. Runs in a worker process
  with --jobs (the devices are described again there from the topology's name)."""
  devices = tpu_devices(topology)
  hbm = chip_info(devices).hbm_bytes
  schedule_name, schedule_fields = schedule
  lines, before = [], None
  for label, fields in ladder(config):
    c = apply(config, {**schedule_fields, **fields, **{f"mesh.{k}": v for k, v in mesh.items()},
                       "mesh.dcn_data": 1, "mesh.dcn_expert": 1})
    name = " ".join(x for x in (schedule_name, label) if x)
    if c.to_dict() == before:  # the config already sets what this rung adds (a preset's grad_accum_steps)
      lines.append(f"{'same':8s} {_mesh_name(mesh):20s} {name:20s} as the rung before: not compiled again")
      continue
    before = c.to_dict()
    floor = activation_floor(c, mesh)
    if floor > hbm:
      lines.append(f"{'floor':8s} {_mesh_name(mesh):20s} {name:20s} skipped: at least "
                   f"{floor / _GB:.0f} GB a chip (state + kept residuals)")
      continue
    try:
      p = plan(c, devices, mfu, host_gbps, label=name)
    except ConfigError as e:
      lines.append(f"{'skipped':8s} {_mesh_name(mesh):20s} {name:20s} {str(e)[:200]}")
      continue
    lines.append(row("tried", p))
    if p.fits:
      return lines, p  # later rungs save memory this mesh no longer needs, and cost time
  return lines, None


def sweep(config, topology: str, mfu: float, host_gbps: float, jobs: int = 1,
          first_fit: bool = False) -> int:
  """Every mesh x schedule's ladder walk, then the fitting plans ranked by predicted step time.
  first_fit: the meshes one at a time in `meshes` order, stopping at the first plan that fits (for
  models whose every compile takes minutes; that plan is not ranked against the rest)."""
  if first_fit and jobs > 1:
    raise ConfigError("--first_fit compiles one plan at a time, in order: drop --jobs, or drop "
                      "--first_fit to rank every mesh")
  devices = tpu_devices(topology)
  tasks = [(mesh, schedule) for schedule in SCHEDULES for mesh in meshes(config, len(devices))]
  fitting = []
  if jobs > 1:
    context = multiprocessing.get_context("spawn")  # a fresh JAX in each worker
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context) as pool:
      futures = [pool.submit(walk_ladder, config, topology, m, s, mfu, host_gbps) for m, s in tasks]
      for future in concurrent.futures.as_completed(futures):
        lines, p = future.result()
        print("\n".join(lines), flush=True)
        fitting += [p] if p else []
  else:
    for mesh, schedule in tasks:
      lines, p = walk_ladder(config, topology, mesh, schedule, mfu, host_gbps)
      print("\n".join(lines), flush=True)
      fitting += [p] if p else []
      if p and first_fit:
        print(f"\nfirst fit: mesh {p.mesh}, {p.label}: {p.total / _GB:.1f} of {p.hbm / _GB:.0f} GB per "
              f"chip, predicted {p.step_seconds:.3g} s/step ({len(tasks)} meshes, the others not tried)")
        return 0
  if not fitting:
    print("\nnothing fits: add chips, lower train.batch_size or data.seq_len")
    return 1
  # Ties (compute-bound plans whose traffic is hidden) go to the plan with more HBM to spare.
  fitting.sort(key=lambda p: (round(p.step_seconds, 3), p.total))
  print("\nranked by predicted step time (s): compute = analytic FLOPs / peak; hbm and comm from the "
        "compiled HLO's bytes with loop trip counts; host = offloaded state over the host link")
  print(HEADER)
  for rank, p in enumerate(fitting, 1):
    print(row(f"#{rank}", p))
  if any(p.times.get("comm") is None for p in fitting):
    print("(comm n/a: no sourced interconnect bandwidth for this chip in jaxlm.chips; the step leaves "
          "communication out)")
  best = fitting[0]
  print(f"\npicked: mesh {best.mesh}, {best.label}: {best.total / _GB:.1f} of {best.hbm / _GB:.0f} GB per "
        f"chip, predicted {best.step_seconds:.3g} s/step")
  return 0
