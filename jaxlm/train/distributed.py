"""Multi-process start-up: `jax.distributed.initialize()` when a launcher (or a user) asks for it.

Every process of a multi-process job runs with JAXLM_DISTRIBUTED=1. The coordinator (process 0's
host:port), the process count and this process's id come from, in order:
  * the config (train.coordinator_address, train.num_processes, train.process_id), or the standard
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID variables: machines with no cluster
    manager name all three (a value set in both places must agree);
  * otherwise JAX finds them: on Cloud TPU VMs from the VM metadata, under SLURM from SLURM_NTASKS /
    SLURM_PROCID / SLURM_LOCALID (the launchers in launch/ rely on this).
A plain single-process run leaves JAXLM_DISTRIBUTED unset and never initializes anything.

Started by hand, a job can be started wrong: a process given another count, another coordinator,
or none started at all. jax.distributed then aborts the waiting processes from C++ after its
timeout with a generic message, or (another count) starts anyway. So a process gives up after
train.start_timeout_seconds with a message saying what it waited for, and once every process has
joined they compare their process counts, so a disagreement stops all of them, naming it.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import jax

from jaxlm.config import ConfigError

ENV = "JAXLM_DISTRIBUTED"
_NAMES = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
          "process_id": "JAX_PROCESS_ID"}
_UNSET = {"coordinator_address": "", "num_processes": 0, "process_id": -1}


def maybe_initialize(environ=None, peer_timeout_seconds: int | None = None, train_cfg=None) -> bool:
  """Initializes jax.distributed if JAXLM_DISTRIBUTED=1; returns whether it did.

  train_cfg: the config's `train` section (coordinator, count, id, start timeout), or None for the
  environment alone. peer_timeout_seconds (train.peer_timeout_seconds): a process that stops sending
  heartbeats for this long is declared dead, and the coordination service ends every other process
  with an error naming it, so a lost host never leaves the rest hanging.
  """
  environ = os.environ if environ is None else environ
  value = environ.get(ENV, "")
  if value in ("", "0"):
    return False
  if value != "1":
    raise ConfigError(f"environment variable {ENV} is {value!r}; set it to 1 (multi-process job) or unset it")
  kwargs = explicit_cluster(environ, train_cfg)
  if peer_timeout_seconds:
    kwargs["heartbeat_timeout_seconds"] = int(peer_timeout_seconds)
  if environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
  timeout = int(train_cfg.start_timeout_seconds) if train_cfg is not None else None
  if timeout is None or not kwargs:  # JAX's own cluster detection: its defaults
    jax.distributed.initialize(**kwargs)
    return True
  watchdog = threading.Timer(timeout, _give_up, (kwargs, timeout))
  watchdog.daemon = True
  watchdog.start()
  try:  # JAX's own timeout is the backstop; ours comes first and says what went wrong
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout + 30)
  finally:
    watchdog.cancel()
  agree(kwargs["num_processes"], timeout)
  return True


def explicit_cluster(environ, train_cfg=None) -> dict:
  """Coordinator, process count and id from the config's train section and the JAX_* variables
  ({} when neither names a count or an id: JAX detects the cluster). Raises ConfigError naming the
  field or variable that is missing, malformed or disagrees."""
  given = {}
  for key, env_name in _NAMES.items():
    from_env = environ.get(env_name, "")
    if from_env and key != "coordinator_address":
      try:
        from_env = int(from_env)
      except ValueError:
        raise ConfigError(f"{env_name} must be an integer, got {from_env!r}") from None
    from_cfg = _UNSET[key] if train_cfg is None else train_cfg[key]
    if from_cfg != _UNSET[key] and from_env not in ("", from_cfg):
      raise ConfigError(f"train.{key} is {from_cfg!r} but {env_name} is {from_env!r}; give one, or "
                        "make them agree")
    given[key] = from_cfg if from_cfg != _UNSET[key] else from_env
  if given["num_processes"] == "" and given["process_id"] == "":
    return {}
  missing = [f"train.{k} (or {_NAMES[k]})" for k, v in given.items() if v == ""]
  if missing:
    raise ConfigError(f"{', '.join(missing)} unset: a job started by hand needs the coordinator's "
                      "host:port, the number of processes and each process's id")
  count, index = given["num_processes"], given["process_id"]
  if not 0 <= index < count:
    raise ConfigError(f"process id {index} (train.process_id or JAX_PROCESS_ID) is not in "
                      f"[0, num_processes={count})")
  return {"coordinator_address": given["coordinator_address"], "num_processes": count,
          "process_id": index}


def _give_up(cluster: dict, timeout: int) -> None:
  """The start timeout passed inside jax.distributed.initialize: say why and leave (JAX would abort
  later with a C++ trace that only says a deadline passed)."""
  print(f"jaxlm: process {cluster['process_id']} waited {timeout} s for all {cluster['num_processes']} "
        f"processes to join the coordinator at {cluster['coordinator_address']} and stops. Start "
        "every process with JAXLM_DISTRIBUTED=1, this coordinator address (reachable from every "
        f"machine), num_processes={cluster['num_processes']} and its own process id in "
        f"0..{cluster['num_processes'] - 1} (train.start_timeout_seconds sets the wait)",
        file=sys.stderr, flush=True)
  os._exit(1)  # the main thread is inside JAX's C++ wait; nothing else to flush


def agree(num_processes: int, timeout: int) -> None:
  """Every process publishes the process count it was started with and reads everyone's: all of
  them stop with the same message if the counts differ (JAX takes the coordinator's)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  me, joined = jax.process_index(), jax.process_count()
  client.key_value_set(f"jaxlm/start/{me}", json.dumps({"num_processes": num_processes}))
  counts = {p: json.loads(client.blocking_key_value_get(f"jaxlm/start/{p}", timeout * 1000))["num_processes"]
            for p in range(joined)}
  if set(counts.values()) != {joined}:
    said = ", ".join(f"process {p}: {n}" for p, n in counts.items())
    raise ConfigError(f"the processes were started with different process counts ({said}) and "
                      f"{joined} joined; give every process num_processes={joined} (train.num_processes "
                      "or JAX_NUM_PROCESSES), or the count you meant and start that many")


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
