"""`python -m jaxlm.aot --config=configs/<preset>.py --topology=v5p:8x8x8 [--sweep]`.

Compiles the config's real train step for the TPU slice on this machine (libtpu, no TPU needed)
and prints per-chip HBM (arguments, outputs, temporaries, total) against the chip's capacity, FLOPs
per step and the predicted step time at --mfu. Exits 1 if it does not fit. --sweep tries remat
policies and mesh factorizations (fsdp x tensor, x expert for MoE models) in order, least
recompute first, then least tensor parallelism, then most expert parallelism, and stops at the
first that fits; it compares no step times. Any mesh field can be given as for training
(--config.mesh.expert=8 --config.mesh.fsdp=-1 ...).
"""

import copy
import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT uses no TPU: share libtpu freely

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxlm import cli  # noqa: E402
from jaxlm.config import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a jaxlm config file.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: 'v5p:8x8x8' (chips) or 'v5p-1024'.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Try remat policies and fsdp x tensor (x expert for MoE) meshes, "
                           "least recompute first; stop at the first that fits.")
_MFU = flags.DEFINE_float("mfu", 0.5, "Assumed model FLOPs utilisation for the predicted step time.")

_GB = 1e9


def _row(name: str, p) -> str:
  mesh = " ".join(f"{k}{v}" for k, v in p.mesh.items() if v > 1) or "1 device"
  return (f"{name:10s} {mesh:28s} {p.remat:6s} {p.arguments / _GB:8.2f} {p.outputs / _GB:8.2f} "
          f"{p.temporaries / _GB:8.2f} {p.total / _GB:8.2f} {p.hbm / _GB:6.0f} "
          f"{'yes' if p.fits else 'NO':>4s} {p.flops_per_step / 1e15:9.2f} {p.step_seconds:8.2f}"
          + (f"\n{'':10s} compiler: {p.note}" if p.note else ""))


HEADER = (f"{'':10s} {'mesh':28s} {'remat':6s} {'args GB':>8s} {'out GB':>8s} {'temp GB':>8s} "
          f"{'total GB':>8s} {'HBM':>6s} {'fits':>4s} {'PFLOP/step':>9s} {'step s':>8s}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from jaxlm.aot.plan import candidates, plan, topology_name, tpu_devices

  config = _CONFIG.value
  if config is None or not _TOPOLOGY.value:
    sys.exit("jaxlm.aot: give --config=configs/<preset>.py and --topology=v5p:8x8x8 (or v5p-1024)")
  try:
    devices = tpu_devices(_TOPOLOGY.value)
    print(f"{topology_name(_TOPOLOGY.value)}: {len(devices)} x {devices[0].device_kind}; "
          f"{config.train.batch_size} x {config.data.seq_len} tokens per step; MFU assumed {_MFU.value:.0%}")
    print(HEADER)
    if not _SWEEP.value:
      p = plan(config, devices, _MFU.value)
      print(_row("plan", p))
      if not p.fits:
        print(f"\ndoes not fit: {p.total / _GB:.1f} GB per chip of {p.hbm / _GB:.0f}. Try --sweep (remat "
              "and fsdp x tensor), --config.train.grad_accum_steps=2 (halves activations), a larger slice, "
              "or a smaller train.batch_size / data.seq_len")
      return 0 if p.fits else 1
    for remat, mesh in candidates(config, len(devices)):
      c = copy.deepcopy(config)
      c.compute.remat_policy = remat
      c.mesh.update(**mesh, dcn_data=1, dcn_expert=1)
      try:
        p = plan(c, devices, _MFU.value)
      except ConfigError as e:
        print(f"{'skipped':10s} {mesh}: {e}")
        continue
      print(_row("tried", p))
      if p.fits:
        print(f"\nfirst that fits (least recompute, then least tensor parallelism): mesh {p.mesh}, "
              f"remat {remat}: {p.total / _GB:.1f} of {p.hbm / _GB:.0f} GB per chip, predicted "
              f"{p.step_seconds:.2f} s/step")
        return 0
    print("\nnothing fits: add chips, lower train.batch_size or data.seq_len, or use grad accumulation")
    return 1
  except ConfigError as e:
    sys.exit(f"jaxlm.aot: {e}")


def run():
  cli.run(main, "jaxlm.aot")


if __name__ == "__main__":
  run()
