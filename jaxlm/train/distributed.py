"""Multi-process start-up: `jax.distributed.initialize()` when a launcher asks for it.

The launchers in launch/ set JAXLM_DISTRIBUTED=1 on every process of a multi-host job. JAX then finds
the coordinator, the process count and this process's id by itself: on Cloud TPU VMs from the VM
metadata; under SLURM from SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID (one process per GPU), with
JAX_COORDINATOR_ADDRESS, when set, naming the coordinator. A plain single-process run leaves the
variable unset and never initializes anything.
"""

from __future__ import annotations

import os

import jax

from jaxlm.config import ConfigError

ENV = "JAXLM_DISTRIBUTED"


def maybe_initialize(environ=None) -> bool:
  """Initializes jax.distributed if JAXLM_DISTRIBUTED=1; returns whether it did."""
  value = (os.environ if environ is None else environ).get(ENV, "")
  if value in ("", "0"):
    return False
  if value != "1":
    raise ConfigError(f"environment variable {ENV} is {value!r}; set it to 1 (multi-process job) or unset it")
  jax.distributed.initialize()
  return True
