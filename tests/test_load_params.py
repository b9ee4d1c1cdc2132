"""Reading a run's parameters back (jaxlm.runs.load_params) and sampling from them with the CLI.

* A run directory written before the config split (tests/fixtures/run_before_compute_split, made by
  jaxlm at 6fd92cc: `python -m jaxlm.train --config=configs/tiny.py --config.train.steps=2
  --config.train.warmup_steps=1 --config.model.d_model=32 --config.model.mlp_dim=64
  --config.model.vocab_size=384 --config.tokenizer.vocab_size=384 --config.model.max_seq_len=32
  --config.data.seq_len=32 --config.model.scan_layers=False --config.checkpoint.async_save=False`)
  loads with its config migrated, its parameters equal to the saved ones, on one device or split
  over a mesh, and the CLI samples from it.
* Missing or damaged run directories and checkpoints fail with a CheckpointError naming the fix.
* A ~100M-parameter run trained on an fsdp mesh: a fresh `jaxlm.generate` process reads from disk
  about the parameters' bytes (the checkpoint holds 3x that: Adam's two moments beside them), keeps
  peak RSS growth while loading under 2x them, and samples.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlm.config import base_config, parse_rules
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import tree_shardings
from jaxlm.runs import CheckpointError, load_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "run_before_compute_split")


@pytest.fixture
def old_run(tmp_path):
  """A copy of the fixture run, free to damage."""
  return shutil.copytree(FIXTURE, tmp_path / "run")


def flat(tree) -> dict:
  """'blocks/0/attn/q' -> numpy array, for nnx.State (leaves end in .value) and orbax's raw dicts
  (leaves end in ['value']) alike."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    out["/".join(n for n in names if n != "value")] = np.asarray(leaf)
  return out


def generate_cli(workdir, *flags):
  return subprocess.run(
      [sys.executable, "-m", "jaxlm.generate", f"--workdir={workdir}", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.fast
def test_run_from_before_the_compute_split_loads_its_saved_parameters(old_run):
  run = load_params(old_run)
  assert run.step == 2
  assert run.config.compute.scan_layers is False  # was model.scan_layers: the layer tree depends on it
  saved = ocp.PyTreeCheckpointer().restore(os.path.join(old_run, "checkpoints", "2", "state"))
  assert "opt_state" in saved  # the optimizer state is there, and load_params left it
  expected, got = flat(saved["params"]), flat(run.params)
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert got[name].dtype == value.dtype

  mesh_config = run.config.copy_and_resolve_references()
  mesh_config.mesh.data, mesh_config.mesh.fsdp = 1, -1
  mesh = make_mesh(mesh_config)
  split = load_params(old_run, mesh=mesh)
  want = tree_shardings(split.params, mesh, parse_rules(run.config.mesh.rules))
  shardings = [x.sharding for x in jax.tree.leaves(split.params)]
  assert shardings == jax.tree.leaves(want)
  assert any(not s.is_fully_replicated for s in shardings)  # fsdp really splits some parameters
  for name, value in flat(split.params).items():
    np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_cli_samples_from_a_run_from_before_the_compute_split(old_run):
  out = generate_cli(old_run, "--max_new_tokens=4", "--temperature=0")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("ROMEO:") and len(out.stdout.rstrip("\n")) > len("ROMEO:"), out.stdout


@pytest.mark.fast
def test_missing_or_damaged_runs_name_the_fix(old_run, tmp_path):
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 5 .*saved steps: \[2\].*pick a saved"):
    load_params(old_run, step=5)
  for data in (old_run / "checkpoints" / "2" / "state" / "ocdbt.process_0" / "d").iterdir():
    data.write_bytes(b"")  # truncated array files
  with pytest.raises(CheckpointError, match=r"(?s)checkpoint .*2 could not be read.*delete that step's folder"):
    load_params(old_run)
  shutil.rmtree(old_run / "checkpoints")
  with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints .*train the run"):
    load_params(old_run)
  out = generate_cli(old_run)
  assert out.returncode == 1 and "jaxlm: no checkpoint in" in out.stderr, out.stderr[-2000:]
  os.remove(old_run / "tokenizer.model")
  with pytest.raises(CheckpointError, match=r"no tokenizer.json or tokenizer.model in .*copy the files"):
    load_params(old_run)
  with pytest.raises(CheckpointError, match=r"config.json not found: is .* the train.workdir"):
    load_params(tmp_path / "nowhere")


# Runs the CLI in a fresh process, recording during load_params the peak resident memory against the
# resident memory just before it (backend started, modules imported), the bytes read, and what it
# returned.
_MEASURED_CLI = """
import json, sys
import jax
from absl import app
import jaxlm.generate as cli
from jaxlm import runs

def proc(name, field):
  with open(f"/proc/self/{name}") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

load = runs.load_params

def measured_load(*args, **kwargs):
  jax.devices()
  rss, read = proc("status", "VmRSS"), proc("io", "rchar")
  run = jax.block_until_ready(load(*args, **kwargs))
  leaves = jax.tree.leaves(run.params)
  with open(sys.argv[1], "w") as f:
    json.dump({"rss_growth": (proc("status", "VmHWM") - rss) * 1024, "read": proc("io", "rchar") - read,
               "leaves": len(leaves), "bytes": sum(x.nbytes for x in leaves)}, f)
  return run

runs.load_params = measured_load
app.run(cli.main, argv=["jaxlm.generate", *sys.argv[2:]])
"""


def test_a_100m_parameter_run_loads_without_its_optimizer_state(tmp_path):
  from jaxlm.train.loop import train

  c = base_config()
  c.model.update(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=2560,
                 max_seq_len=32)
  c.tokenizer.path = os.path.join(FIXTURE, "tokenizer.model")  # 384 pieces, nothing to train
  c.data.seq_len = 16
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.train.update(steps=2, warmup_steps=1, batch_size=8, eval_batches=1, progress_bar=False,
                 workdir=str(tmp_path / "run"))
  c.checkpoint.async_save = False
  # Stopped after step 1, as a preemption would: the checkpoint (parameters and both Adam moments)
  # is what a finished run writes, and the second step and the final evaluation (a compile and a
  # forward pass of the 100M model) add nothing the load is measured on.
  state = train(c, stop_at_step=1)["state"]
  params = jax.tree.leaves(state.params)
  param_bytes = sum(x.nbytes for x in params)
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  assert 95e6 < sum(x.size for x in params) < 105e6
  del state  # the subprocess gets the machine's memory to itself

  report = tmp_path / "load.json"
  out = subprocess.run(
      [sys.executable, "-c", _MEASURED_CLI, str(report), f"--workdir={tmp_path / 'run'}",
       "--max_new_tokens=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  loaded = json.loads(report.read_text())
  ratio = loaded["rss_growth"] / param_bytes
  print(f"parameters {param_bytes / 2**20:.1f} MiB (optimizer state {opt_bytes / 2**20:.1f} MiB); "
        f"while loading: read {loaded['read'] / 2**20:.1f} MiB, peak RSS growth "
        f"{loaded['rss_growth'] / 2**20:.1f} MiB = {ratio:.2f}x the parameters")
  assert (loaded["leaves"], loaded["bytes"]) == (len(params), param_bytes)  # parameters, nothing else
  assert loaded["read"] < 1.2 * param_bytes  # (compressed) parameters only: the rest stayed on disk
  assert ratio < 2
  assert out.stdout.startswith(c.sample.prompt) and len(out.stdout.rstrip("\n")) > len(c.sample.prompt)


@pytest.mark.fast
def test_inference_imports_nothing_from_train():
  """Sampling a run must not need the optimizer or the loop (nor their dependencies)."""
  code = ("import sys, jaxlm.runs, jaxlm.inference.decode, jaxlm.inference.sampling, jaxlm.generate; "
          "print([m for m in sys.modules if m.startswith('jaxlm.train')])")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
