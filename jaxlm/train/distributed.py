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


def maybe_initialize(environ=None, peer_timeout_seconds: int | None = None) -> bool:
  """Initializes jax.distributed if JAXLM_DISTRIBUTED=1; returns whether it did.

  peer_timeout_seconds (train.peer_timeout_seconds): a process that stops sending heartbeats for
  this long is declared dead, and the coordination service ends every other process with an error
  naming it ("Task N heartbeat timeout"), so a lost host never leaves the rest hanging.
  """
  value = (os.environ if environ is None else environ).get(ENV, "")
  if value in ("", "0"):
    return False
  if value != "1":
    raise ConfigError(f"environment variable {ENV} is {value!r}; set it to 1 (multi-process job) or unset it")
  kwargs = {}
  if peer_timeout_seconds:
    kwargs["heartbeat_timeout_seconds"] = int(peer_timeout_seconds)
  jax.distributed.initialize(**kwargs)
  return True


def lost_processes() -> list[int]:
  """Ids of the processes the coordination service no longer hears from ([] when it cannot say:
  one process, or a JAX without the query). Used to name the lost peer after a failed collective."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
    if client is None:
      return []
    everyone = list(range(jax.process_count()))
    live = client.get_live_nodes(everyone)
    return [p for p in everyone if p not in live]
  except Exception:  # a private API: any failure means "unknown", never a new error
    return []
