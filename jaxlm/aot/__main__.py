"""`python -m jaxlm.aot --config=configs/<preset>.py --topology=v5p:8x8x8 [--sweep]`.

Compiles the config's real train step for the TPU slice on this machine (libtpu, no TPU needed)
and prints per-chip HBM (arguments, outputs, temporaries, total) against the chip's capacity, host
memory (offloaded optimizer state), FLOPs per step and the predicted step time (jaxlm/aot/plan.py:
compute from analytic FLOPs, HBM traffic and collectives from the compiled HLO). Exits 1 if it does
not fit.

--sweep: for every fsdp x tensor mesh (and pipeline schedule, plan.SCHEDULES), walks the
memory-saving ladder (plan.LADDER: remat none -> dots -> full -> grad accumulation 2 -> 4 -> optimizer
offload) and stops at the first rung that fits (later rungs only add time); a rung whose lower
bound on memory (plan.activation_floor) exceeds HBM is skipped without compiling. The plans that
fit are ranked by predicted step time, and the fastest is picked.
"""

import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT uses no TPU: share libtpu freely

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxlm import cli  # noqa: E402
from jaxlm.config import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a jaxlm config file.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: 'v5p:8x8x8' (chips) or 'v5p-1024'.")
_SWEEP = flags.DEFINE_bool("sweep", False, "For each fsdp x tensor mesh walk the memory-saving ladder to the "
                           "first rung that fits; rank the fitting plans by predicted step time.")
_MFU = flags.DEFINE_float("mfu", 1.0, "Share of peak matmul throughput the compute term assumes (1: the peak).")
_HOST_GBPS = flags.DEFINE_float("host_gbps", 32.0, "Host<->device GB/s per chip for offloaded state.")

_GB = 1e9


def _comm(t: dict) -> str:
  return f"{'n/a':>6s}" if t["comm"] is None else f"{t['comm']:6.3g}"


def _row(name: str, p) -> str:
  mesh = " ".join(f"{k}{v}" for k, v in p.mesh.items() if v > 1) or "1 device"
  t = p.times
  times = (f"{t['compute']:7.3g} {t['hbm']:6.3g} {_comm(t)} "
           f"{t['host']:6.3g} {p.step_seconds:7.3g}") if t else f"{'':7s} {'':6s} {'':6s} {'':6s} {'':7s}"
  return (f"{name:8s} {mesh:20s} {p.label:20s} {p.arguments / _GB:7.2f} {p.temporaries / _GB:8.2f} "
          f"{p.total / _GB:8.2f} {p.hbm / _GB:4.0f} {p.host_total / _GB:7.2f} {'yes' if p.fits else 'NO':>4s} "
          f"{p.flops_per_step / 1e15:9.1f} {times}"
          + (f"\n{'':8s} compiler: {p.note}" if p.note else ""))


HEADER = (f"{'':8s} {'mesh':20s} {'plan':20s} {'args GB':>7s} {'temp GB':>8s} {'total GB':>8s} {'HBM':>4s} "
          f"{'host GB':>7s} {'fits':>4s} {'PFLOP/step':>9s} {'compute':>7s} {'hbm s':>6s} {'comm s':>6s} "
          f"{'host s':>6s} {'step s':>7s}")


def _sweep(config, devices) -> int:
  from jaxlm.aot.plan import LADDER, SCHEDULES, activation_floor, apply, meshes, plan

  fitting = []
  for schedule, schedule_fields in SCHEDULES:
    for mesh in meshes(config, len(devices)):
      for label, fields in LADDER:
        c = apply(config, {**schedule_fields, **fields, **{f"mesh.{k}": v for k, v in mesh.items()},
                           "mesh.dcn_data": 1})
        name = " ".join(x for x in (schedule, label) if x)
        floor = activation_floor(c, mesh)
        if floor > devices_hbm(devices):
          print(f"{'floor':8s} {' '.join(f'{k}{v}' for k, v in mesh.items() if v > 1):20s} {name:20s} "
                f"skipped: at least {floor / _GB:.0f} GB a chip (state + kept residuals)")
          continue
        try:
          p = plan(c, devices, _MFU.value, _HOST_GBPS.value, label=name)
        except (ConfigError, ValueError) as e:
          print(f"{'skipped':8s} {mesh} {name}: {str(e)[:200]}")
          continue
        print(_row("tried", p), flush=True)
        if p.fits:
          fitting.append(p)
          break  # later rungs save memory this mesh no longer needs, and cost time
  if not fitting:
    print("\nnothing fits: add chips, lower train.batch_size or data.seq_len")
    return 1
  fitting.sort(key=lambda p: p.step_seconds)
  print("\nranked by predicted step time (s): compute = analytic FLOPs / peak; hbm and comm from the "
        "compiled HLO's bytes with loop trip counts; host = offloaded state over the host link")
  print(HEADER)
  for rank, p in enumerate(fitting, 1):
    print(_row(f"#{rank}", p))
  if any(p.times.get("comm") is None for p in fitting):
    print("(comm n/a: no sourced interconnect bandwidth for this chip in jaxlm.chips; the step leaves "
          "communication out)")
  best = fitting[0]
  print(f"\npicked: mesh {best.mesh}, {best.label}: {best.total / _GB:.1f} of {best.hbm / _GB:.0f} GB per "
        f"chip, predicted {best.step_seconds:.3g} s/step")
  return 0


def devices_hbm(devices) -> float:
  from jaxlm.aot.plan import chip_info
  return chip_info(devices).hbm_bytes


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from jaxlm.aot.plan import plan, topology_name, tpu_devices

  config = _CONFIG.value
  if config is None or not _TOPOLOGY.value:
    sys.exit("jaxlm.aot: give --config=configs/<preset>.py and --topology=v5p:8x8x8 (or v5p-1024)")
  try:
    devices = tpu_devices(_TOPOLOGY.value)
    print(f"{topology_name(_TOPOLOGY.value)}: {len(devices)} x {devices[0].device_kind}; "
          f"{config.train.batch_size} x {config.data.seq_len} tokens per step; compute at "
          f"{_MFU.value:.0%} of peak; host link {_HOST_GBPS.value:g} GB/s")
    print(HEADER)
    if _SWEEP.value:
      return _sweep(config, devices)
    p = plan(config, devices, _MFU.value, _HOST_GBPS.value)
    print(_row("plan", p))
    if not p.fits:
      print(f"\ndoes not fit: {p.total / _GB:.1f} GB per chip of {p.hbm / _GB:.0f}. Try --sweep (remat, "
            "grad accumulation, optimizer offload and fsdp x tensor), --config.train.grad_accum_steps=2 "
            "(halves activations), --config.compute.offload_optimizer=True (Adam's moments in host "
            "memory), a larger slice, or a smaller train.batch_size / data.seq_len")
    return 0 if p.fits else 1
  except ConfigError as e:
    sys.exit(f"jaxlm.aot: {e}")


def run():
  cli.run(main, "jaxlm.aot")


if __name__ == "__main__":
  run()
