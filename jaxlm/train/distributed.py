"""Multi-process start-up: `jax.distributed.initialize()` when a launcher asks for it.

The launchers in launch/ set JAXLM_DISTRIBUTED=1 on every process of a multi-host job. JAX then finds
the coordinator, the process count and this process's id by itself: on Cloud TPU VMs from the VM
metadata; under SLURM from SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID (one process per GPU), with
JAX_COORDINATOR_ADDRESS, when set, naming the coordinator. Machines with no cluster manager name
all three themselves: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID. A
plain single-process run leaves JAXLM_DISTRIBUTED unset and never initializes anything.
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
  environ = os.environ if environ is None else environ
  kwargs = explicit_cluster(environ)
  if peer_timeout_seconds:
    kwargs["heartbeat_timeout_seconds"] = int(peer_timeout_seconds)
  if environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
  jax.distributed.initialize(**kwargs)
  return True


def explicit_cluster(environ) -> dict:
  """Coordinator, process count and id from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID when all three are set (machines with no cluster manager JAX can ask); {} lets
  JAX detect them (Cloud TPU metadata, SLURM)."""
  names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  given = {n: environ.get(n, "") for n in names}
  if not given["JAX_NUM_PROCESSES"] and not given["JAX_PROCESS_ID"]:
    return {}
  missing = [n for n, v in given.items() if not v]
  if missing:
    raise ConfigError(f"{', '.join(missing)} unset: a run started by hand needs all of {', '.join(names)}")
  try:
    count, index = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
  except ValueError:
    raise ConfigError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                      f"{given['JAX_NUM_PROCESSES']!r} and {given['JAX_PROCESS_ID']!r}") from None
  if not 0 <= index < count:
    raise ConfigError(f"JAX_PROCESS_ID {index} is not in [0, JAX_NUM_PROCESSES={count})")
  return {"coordinator_address": given["JAX_COORDINATOR_ADDRESS"], "num_processes": count,
          "process_id": index}


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
