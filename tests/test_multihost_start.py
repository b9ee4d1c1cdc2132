"""A multi-process job started by hand (no SLURM, MPI, TPU metadata or Kubernetes): coordinator,
process count and id from the config or the JAX_* variables; a missing or inconsistent value stops
every process with a message naming it."""

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

import small_corpus
from jaxlm.config import ConfigError, base_config, validate
from jaxlm.train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_section(**fields):
  t = base_config().train
  t.update(fields)
  return t


@pytest.mark.fast
def test_cluster_from_the_config_the_environment_or_both_when_they_agree():
  cfg = train_section(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  want = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.explicit_cluster({}, cfg) == want
  assert distributed.explicit_cluster(env, train_section()) == want
  assert distributed.explicit_cluster(env, cfg) == want
  mixed = train_section(process_id=1)  # the id per machine in the config, the rest shared
  assert distributed.explicit_cluster({k: v for k, v in env.items() if k != "JAX_PROCESS_ID"}, mixed) == want
  assert distributed.explicit_cluster({}, train_section()) == {}  # JAX detects the cluster


@pytest.mark.fast
def test_a_missing_malformed_or_conflicting_value_is_named():
  with pytest.raises(ConfigError, match=r"train.process_id \(or JAX_PROCESS_ID\) unset"):
    distributed.explicit_cluster({}, train_section(coordinator_address="h:1", num_processes=2))
  with pytest.raises(ConfigError, match=r"train.coordinator_address \(or JAX_COORDINATOR_ADDRESS\) unset"):
    distributed.explicit_cluster({}, train_section(num_processes=2, process_id=0))
  with pytest.raises(ConfigError, match="train.num_processes is 2 but JAX_NUM_PROCESSES is 4"):
    distributed.explicit_cluster({"JAX_NUM_PROCESSES": "4"},
                                 train_section(coordinator_address="h:1", num_processes=2, process_id=0))
  with pytest.raises(ConfigError, match="JAX_PROCESS_ID must be an integer, got 'one'"):
    distributed.explicit_cluster({"JAX_PROCESS_ID": "one"}, train_section())
  with pytest.raises(ConfigError, match=r"process id 2 .* is not in \[0, num_processes=2\)"):
    distributed.explicit_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                  "JAX_PROCESS_ID": "2"}, train_section())
  c = base_config()
  c.train.num_processes, c.train.process_id = 2, 2
  with pytest.raises(ConfigError, match=r"train.process_id is 2; give each process a distinct id in \[0, "
                                        r"train.num_processes=2\)"):
    validate(c)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, settings, steps=4):
  """One `python -m jaxlm.train` process per dict of train.* settings, with JAXLM_DISTRIBUTED=1 and
  no other cluster variable; output to files (a pipe nobody reads could stall a process). The data:
  tests/small_corpus.py's plays, next to the workdir (each start tokenizes its whole corpus)."""
  procs = []
  for i, fields in enumerate(settings):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "JAXLM_", "XLA_", "SLURM_", "TPU_", "OMPI_", "PMI_"))}
    env.update(JAXLM_DISTRIBUTED="1", JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "jaxlm.train", "--config=configs/tiny.py",
            f"--config.train.workdir={workdir}", f"--config.train.steps={steps}",
            "--config.train.log_every=1", "--config.train.progress_bar=False",
            "--config.sample.max_new_tokens=0", "--config.train.eval_batches=1",
            "--config.checkpoint.async_save=False", "--config.train.warmup_steps=1"]
    argv += small_corpus.flags(os.path.join(os.path.dirname(str(workdir)), "corpus"))
    argv += [f"--config.train.{k}={v}" for k, v in fields.items()]
    log = tempfile.NamedTemporaryFile("w+", prefix=f"process{i}-", suffix=".log")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    procs.append(proc)
  return procs


def finish(procs, timeout=400):
  out = []
  for p in procs:
    code = p.wait(timeout)
    p.log.seek(0)
    out.append((code, p.log.read()))
  return out


def test_two_processes_started_by_hand_train_into_one_run(tmp_path):
  address = f"127.0.0.1:{free_port()}"
  workdir = tmp_path / "run"
  done = finish(start(workdir, [dict(coordinator_address=address, num_processes=2, process_id=i)
                                for i in range(2)]))
  for code, log in done:
    assert code == 0, log[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    steps = {json.loads(line).get("step") for line in f}
  assert {1, 2, 3, 4} <= steps
  assert "4" in os.listdir(workdir / "checkpoints"), os.listdir(workdir)


def test_processes_started_with_different_counts_all_stop_naming_it(tmp_path):
  address = f"127.0.0.1:{free_port()}"
  done = finish(start(tmp_path / "run", [dict(coordinator_address=address, num_processes=2, process_id=0),
                                         dict(coordinator_address=address, num_processes=3, process_id=1)]),
                timeout=120)
  for code, log in done:
    assert code != 0 and "started with different process counts (process 0: 2, process 1: 3)" in log, log[-3000:]


def test_a_process_missing_its_id_stops_at_once_and_the_other_gives_up_after_the_start_timeout(tmp_path):
  address = f"127.0.0.1:{free_port()}"
  # Process 1 never joins, so process 0 always waits the whole timeout: short, to keep the test fast.
  common = dict(coordinator_address=address, num_processes=2, start_timeout_seconds=3)
  (code0, log0), (code1, log1) = finish(start(tmp_path / "run", [dict(common, process_id=0), common]),
                                        timeout=120)
  assert code1 != 0 and "train.process_id (or JAX_PROCESS_ID) unset" in log1, log1[-3000:]
  assert code0 != 0 and f"waited 3 s for all 2 processes to join the coordinator at {address}" in log0, log0[-3000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
