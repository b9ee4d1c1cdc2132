"""`python -m jaxlm.aot --config=configs/<preset>.py --topology=v5p:8x8x8 [--sweep]`.

Compiles the config's real train step for the TPU slice on this machine (libtpu, no TPU needed)
and prints per-chip HBM (arguments, outputs, temporaries, total) against the chip's capacity, host
memory (offloaded optimizer state), FLOPs per step and the predicted step time (jaxlm/aot/plan.py:
compute from analytic FLOPs, HBM traffic and collectives from the compiled HLO). Exits 1 if it does
not fit.

--sweep: for every fsdp x tensor (x expert, MoE models) mesh (and pipeline schedule, plan.SCHEDULES), walks the
memory-saving ladder (plan.ladder: remat none -> dots -> full [-> chunked loss] -> grad accumulation 2 -> 4 -> optimizer
offload) and stops at the first rung that fits (later rungs only add time); a rung whose lower
bound on memory (plan.activation_floor) exceeds HBM is skipped without compiling. The plans that
fit are ranked by predicted step time, and the fastest is picked. --jobs N compiles N meshes at once,
each in its own process. --first_fit stops at the first plan that fits, for models whose compiles
take minutes each (meshes in plan.meshes order: no tensor parallelism and the most expert
parallelism first).
Any mesh field can be given as for training (--config.mesh.expert=8 --config.mesh.fsdp=-1 ...).
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
_FIRST_FIT = flags.DEFINE_bool("first_fit", False, "--sweep: stop at the first plan that fits (meshes in "
                                "order, one at a time) instead of ranking every mesh's.")
_JOBS = flags.DEFINE_integer("jobs", 1, "--sweep: meshes compiled at once, each in its own process.")
_HOST_GBPS = flags.DEFINE_float("host_gbps", 32.0, "Host<->device GB/s per chip for offloaded state.")

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from jaxlm.aot.plan import plan, topology_name, tpu_devices
  from jaxlm.aot.report import HEADER, row, sweep

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
      return sweep(config, _TOPOLOGY.value, _MFU.value, _HOST_GBPS.value, _JOBS.value,
                   _FIRST_FIT.value)
    p = plan(config, devices, _MFU.value, _HOST_GBPS.value)
    print(row("plan", p))
    if not p.fits:
      print(f"\ndoes not fit: {p.total / 1e9:.1f} GB per chip of {p.hbm / 1e9:.0f}. Try --sweep (remat, "
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
