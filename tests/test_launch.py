"""Launchers: dry runs print exactly what launch/README.md documents, preemption retries, bad inputs."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `launch` is a directory of scripts at the repository root, not installed

from jaxlm import presets  # noqa: E402
from jaxlm.config import ConfigError  # noqa: E402
from jaxlm.train import distributed  # noqa: E402
from launch import slurm, tpu_vm  # noqa: E402
from jaxlm.train import preemption  # noqa: E402
from launch.common import PREEMPTED_EXIT_CODE, LaunchError, Result  # noqa: E402

pytestmark = pytest.mark.fast  # unit tests: the `-m fast` tier


@pytest.fixture(autouse=True)
def at_repository_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # launchers take config paths relative to the repository root


def readme_example(marker):
  """(argv after the script name, expected stdout) of the console block after `<!-- dry-run: marker -->`."""
  with open(os.path.join(ROOT, "launch", "README.md")) as f:
    text = f.read()
  block = re.search(rf"<!-- dry-run: {re.escape(marker)} -->\n```console\n(.*?)```", text, re.S).group(1)
  command, expected = block.split("\n", 1)
  assert command.startswith("$ python launch/")
  return shlex.split(command[2:])[2:], expected


class FakeRunner:
  """Records every command; training fails (preempted) the first `failures` times."""

  def __init__(self, failures=0, state="PREEMPTED", code=255):
    self.calls, self.failures, self.state, self.code = [], failures, state, code

  def __call__(self, argv, capture=False):
    argv = tuple(argv)
    self.calls.append(argv)
    if "jaxlm.train" in " ".join(argv):
      if self.failures:
        self.failures -= 1
        return Result(self.code)
      return Result(0)
    if "describe" in argv:
      return Result(0, self.state + "\n")
    return Result(0)

  def kinds(self):
    """Each call as a short name: create, archive, scp, install, train, state, delete."""
    def kind(argv):
      if argv[0] == "git":
        return "archive"
      verb = argv[4]
      if verb == "ssh":
        return "train" if "jaxlm.train" in " ".join(argv) else "install"
      return {"describe": "state"}.get(verb, verb)
    return [kind(a) for a in self.calls]


def no_runner(argv, capture=False):
  raise AssertionError(f"a dry run ran {argv}")


def test_tpu_v5p_64_dry_run_prints_exactly_the_readme_commands(capsys):
  argv, expected = readme_example("tpu_vm v5p-64")
  assert tpu_vm.main(argv, runner=no_runner) == 0
  out = capsys.readouterr().out
  assert out == expected
  assert "--accelerator-type=v5p-64" in out and "--worker=all" in out


def test_slurm_4_node_dry_run_prints_exactly_the_readme_commands(capsys):
  argv, expected = readme_example("slurm 4 nodes")
  assert slurm.main(argv, runner=no_runner) == 0
  out = capsys.readouterr().out
  assert out == expected
  assert "#SBATCH --nodes=4" in out and "JAX_COORDINATOR_ADDRESS" in out


def test_job_survives_two_preemptions_and_resumes_with_the_same_command():
  argv, _ = readme_example("tpu_vm v5p-64")
  argv = [a for a in argv if a != "--dry_run"]
  runner = FakeRunner(failures=2)
  assert tpu_vm.main(argv, runner=runner) == 0
  setup = ["create", "archive", "scp", "install"]
  recreate = ["state", "delete"] + setup
  assert runner.kinds() == setup + ["train"] + recreate + ["train"] + recreate + ["train", "delete"]
  trains = [c for c in runner.calls if "jaxlm.train" in " ".join(c)]
  assert len(trains) == 3 and len(set(trains)) == 1  # the same command: it resumes from the checkpoint


def test_a_sigterm_exit_on_a_healthy_slice_reruns_training_in_place():
  """Exit 75 (the trainer checkpointed its step after SIGTERM) on a READY slice: rerun, no recreate."""
  argv, _ = readme_example("tpu_vm v5p-64")
  argv = [a for a in argv if a != "--dry_run"]
  runner = FakeRunner(failures=2, state="READY", code=preemption.PREEMPTED_EXIT_CODE)
  assert tpu_vm.main(argv, runner=runner) == 0
  setup = ["create", "archive", "scp", "install"]
  assert runner.kinds() == setup + ["train", "state", "train", "state", "train", "delete"]


def test_the_launchers_requeue_on_the_trainers_preemption_exit_code():
  assert PREEMPTED_EXIT_CODE == preemption.PREEMPTED_EXIT_CODE
  _, script = readme_example("slurm 4 nodes")
  assert f'if [ "$status" -eq {PREEMPTED_EXIT_CODE} ]; then scontrol requeue "$SLURM_JOB_ID"; fi' in script
  assert "#SBATCH --signal=TERM@180" in script


def test_the_slurm_script_requeues_on_exit_75_and_keeps_other_codes(tmp_path):
  """Runs the written batch script with srun and scontrol replaced by stubs: 75 requeues."""
  argv, _ = readme_example("slurm 4 nodes")
  a = slurm.parse_args([x for x in argv if x not in ("--dry_run",) and not x.startswith("--venv")])
  body = slurm.batch_script(a)
  stubs = tmp_path / "bin"
  stubs.mkdir()
  for name, text in {"srun": 'exit "$SRUN_CODE"', "scontrol": 'echo "scontrol $*" >> "$LOG"',
                     "python": "exit 0"}.items():
    (stubs / name).write_text(f"#!/bin/bash\n{text}\n")
    (stubs / name).chmod(0o755)
  for code, requeued in ((75, True), (1, False), (0, False)):
    log = tmp_path / f"log{code}"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SRUN_CODE": str(code),
           "LOG": str(log), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node1"}
    result = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True)
    assert result.returncode == code, result.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    assert ("scontrol requeue 42" in lines) == requeued, lines


def test_retry_loop_stops_after_max_retries():
  a = tpu_vm.parse_args(["train", "--name=x", "--zone=z", "--accelerator_type=v5p-64",
                         "--workdir=/gcs/b/x", "--max_retries=1"])
  runner, log = FakeRunner(failures=5), []
  with pytest.raises(LaunchError, match="after 1 retries; giving up. Raise --max_retries"):
    tpu_vm.train_with_retries(tpu_vm.make_commands(a), runner, a.max_retries, log=log.append)
  assert runner.kinds().count("train") == 2 and len(log) == 1


def test_failure_on_a_healthy_slice_is_not_retried_and_the_job_still_tears_down(capsys):
  runner = FakeRunner(failures=1, state="READY")
  with pytest.raises(SystemExit):
    tpu_vm.main(["job", "--name=x", "--zone=z", "--accelerator_type=v5p-64", "--workdir=/gcs/b/x"],
                runner=runner)
  assert "healthy slice (state READY): not a preemption" in capsys.readouterr().err
  assert runner.kinds() == ["create", "archive", "scp", "install", "train", "state", "delete"]


def test_queued_resource_is_polled_until_active():
  a = tpu_vm.parse_args(["create", "--name=x", "--zone=z", "--accelerator_type=v6e-16", "--queued"])
  commands = tpu_vm.make_commands(a)
  states = iter(["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  calls, sleeps = [], []

  def runner(argv, capture=False):
    calls.append(argv)
    return Result(0, next(states) if "describe" in argv else "")

  for step in commands.create:
    tpu_vm.execute(step, runner, sleep=sleeps.append)
  assert calls[0][3:5] == ("queued-resources", "create") and "--accelerator-type=v6e-16" in calls[0]
  assert len(calls) == 4 and len(sleeps) == 2


@pytest.mark.parametrize("accelerator, chips, hosts", [
    ("v5p-64", 32, 8), ("v5p-8", 4, 1), ("v4-32", 16, 4), ("v5e-8", 8, 1), ("v5e-16", 16, 4),
    ("v5litepod-256", 256, 64), ("v6e-4", 4, 1),
])
def test_topology(accelerator, chips, hosts):
  topo = tpu_vm.parse_topology(accelerator)
  assert (topo.chips, topo.hosts) == (chips, hosts)


def test_launchers_run_without_jax_or_flax():
  """A machine that only launches jobs need not have jax: the dry run works with jax, flax and numpy
  unimportable (a None entry in sys.modules makes `import` fail)."""
  code = ("import sys\n"
          "for name in ('jax', 'flax', 'numpy', 'ml_collections'): sys.modules[name] = None\n"
          "from launch import tpu_vm\n"
          "sys.exit(tpu_vm.main(sys.argv[1:]))")
  argv, expected = readme_example("tpu_vm v5p-64")
  out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout == expected


def test_every_preset_names_a_valid_slice():
  for name in presets.names():
    module = presets.load(name)
    if hasattr(module, "TPU_SLICE"):
      tpu_vm.parse_topology(module.TPU_SLICE)


TPU_JOB = ["job", "--name=x", "--zone=z", "--workdir=/gcs/b/x"]


@pytest.mark.parametrize("args, message", [
    (["--accelerator_type=v5x-64"],
     r"--accelerator_type: unknown TPU accelerator type 'v5x-64'; use one of v4-N .*v5e-N .*v5p-N .*v6e-N"),
    (["--accelerator_type=tpu"], r"unknown TPU accelerator type 'tpu'"),
    (["--accelerator_type=v5p"], r"has no size; write v5p-N"),
    (["--accelerator_type=v5p-63"], r"v5p slices are a multiple of 8 TensorCores.*e.g. v5p-64"),
    (["--accelerator_type=v5e-12"], r"v5e slices are 1, 4, 8, 16"),
    (["--name=Llama_8B"], r"--name='Llama_8B' is not a valid name; use lowercase letters"),
    (["--workdir=gs://"], r"names no bucket; write gs://BUCKET/PATH"),
    (["--workdir=runs/x"], r"must be an absolute path"),
    (["--config=configs/nope.py"], r"not a config file; give a path relative to the repository root"),
    (["--max_retries=-1"], r"--max_retries=-1 must be >= 0"),
    (["--", "steps=3"], r"'steps=3' is not a config override; write it as --config.<section>.<field>=value"),
    (["--", "--config.train.workdir=/x"], r"with the launcher's --workdir"),
])
def test_bad_tpu_arguments_name_the_fix(args, message, capsys):
  exits_naming_the_fix(tpu_vm.main, TPU_JOB + args, message, capsys)


def exits_naming_the_fix(main, argv, message, capsys):
  """The launcher exits with status 2 and an error message matching `message`, running nothing."""
  with pytest.raises(SystemExit) as e:
    main(argv, runner=no_runner)
  assert e.value.code == 2
  assert re.search(message, capsys.readouterr().err)


def test_logs_worker_must_exist_in_the_slice(capsys):
  with pytest.raises(SystemExit):
    tpu_vm.main(["logs", "--name=x", "--zone=z", "--accelerator_type=v5p-64", "--worker=8"], runner=no_runner)
  assert "a v5p-64 slice has workers 0..7" in capsys.readouterr().err


SLURM_JOB = ["--nodes=4", "--job_name=x", "--workdir=/shared/x", "--dry_run"]


@pytest.mark.parametrize("args, message", [
    (["--nodes=0"], r"--nodes=0 must be >= 1"),
    (["--time=2days"], r"not a SLURM time; write \[D-\]HH:MM:SS"),
    (["--gpus_per_node=0"], r"--gpus_per_node=0 must be between 1 and 16"),
    (["--job_name=My Job"], r"not a valid name"),
    (["--", "--steps=3"], r"not a config override"),
])
def test_bad_slurm_arguments_name_the_fix(args, message, capsys):
  exits_naming_the_fix(slurm.main, SLURM_JOB + args, message, capsys)


def test_slurm_writes_the_script_and_submits_it(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  args = ["--nodes=2", "--job_name=x", f"--workdir={workdir}", "--", "--config.train.steps=10"]
  runner = FakeRunner()
  slurm.main(args, runner=runner)
  path = os.path.join(workdir, "x.sbatch")
  assert runner.calls == [("sbatch", path)]
  script = open(path).read()
  assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=8" in script
  assert "--config.train.steps=10 && status=0 || status=$?" in script
  slurm.main(["--nodes=2", "--job_name=x", f"--workdir={workdir}", "--dry_run", "--",
              "--config.train.steps=10"], runner=no_runner)
  assert script in capsys.readouterr().out  # the dry run shows the same script


def test_distributed_initializes_only_when_a_launcher_asks(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert not distributed.maybe_initialize({}) and not distributed.maybe_initialize({"JAXLM_DISTRIBUTED": "0"})
  assert distributed.maybe_initialize({"JAXLM_DISTRIBUTED": "1"}) and calls == [{}]
  with pytest.raises(ConfigError, match="JAXLM_DISTRIBUTED is 'yes'; set it to 1"):
    distributed.maybe_initialize({"JAXLM_DISTRIBUTED": "yes"})
  # by hand: all three JAX variables, and the peer timeout as jax.distributed's heartbeat timeout
  env = {"JAXLM_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
         "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.maybe_initialize(env, peer_timeout_seconds=30)
  assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
                       "heartbeat_timeout_seconds": 30}
  with pytest.raises(ConfigError, match=r"\(or JAX_COORDINATOR_ADDRESS\) unset"):
    distributed.maybe_initialize({**env, "JAX_COORDINATOR_ADDRESS": ""})
  with pytest.raises(ConfigError, match=r"process id 2 \(train.process_id or JAX_PROCESS_ID\) is not in \[0, num_processes=2\)"):
    distributed.maybe_initialize({**env, "JAX_PROCESS_ID": "2"})
