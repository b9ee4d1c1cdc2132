"""Sharded training on 8 simulated CPU devices: every layout gives the single-device numbers, the
arrays really are split as the rules say, FSDP divides parameter+optimizer memory by 8, and mesh
configs that cannot work fail before compiling with a message naming the field.

(tests/conftest.py makes the 8 devices.) Each layout's step is compiled once, in a module fixture.
"""

import math

import jax
import numpy as np
import pytest

from jaxlm.config import ConfigError, base_config, parse_rules, validate
from jaxlm.parallel.mesh import resolve_mesh
from jaxlm.parallel.sharding import global_batch
from jaxlm.train.setup import init_sharded_state, jit_train_step, make_setup

STEPS = 3
AFTER = 2  # steps after a checkpoint restored on another mesh and process count
LAYOUTS = {  # name: mesh sizes (the rest 1)
    "dp8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
    "fsdp2_tp4": dict(data=1, fsdp=2, tensor=4),
    "dp2_tp2_sp2": dict(data=2, tensor=2, sequence=2),
}


def tiny_config(**mesh):
  c = base_config()
  c.model.update(vocab_size=128, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, mlp_dim=64,
                 max_seq_len=16)
  c.tokenizer.vocab_size = 128
  c.data.seq_len = 16
  c.train.update(batch_size=8, steps=10, warmup_steps=0, learning_rate=1e-2)
  c.mesh.update(**mesh)
  return validate(c)


def packed_batch(c, seed=0):
  """Rows of two or three documents each (a cut inside every sequence shard), some padding."""
  rng = np.random.default_rng(seed)
  b, t = c.train.batch_size, c.data.seq_len
  tokens = rng.integers(0, c.model.vocab_size, (b, t + 1)).astype(np.int32)
  segment_ids = np.ones((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = sorted(rng.choice(np.arange(2, t - 2), size=1 + r % 2, replace=False))
    starts = [0, *cuts]
    for s, (lo, hi) in enumerate(zip(starts, [*cuts, t])):
      segment_ids[r, lo:hi] = s + 1
      positions[r, lo:hi] = np.arange(hi - lo)
  segment_ids[::3, -3:] = 0  # padding at the end of every third row
  positions[segment_ids == 0] = 0
  weights = (segment_ids > 0).astype(np.int32)
  return {"inputs": tokens[:, :-1] * weights, "targets": tokens[:, 1:] * weights,
          "segment_ids": segment_ids, "positions": positions, "weights": weights}


def run(c, devices=None):
  """STEPS steps on `devices` (default all 8): losses, final state (host), the compiled step, the
  last step's metrics."""
  setup = make_setup(c, devices)
  state = init_sharded_state(setup)
  step = jit_train_step(setup)
  batch = global_batch(packed_batch(c), setup.batch_sharding)
  compiled = step.lower(state, batch).compile()
  init_params = jax.device_get(state.params)  # the steps donate (delete) the state they are given
  losses = []
  for _ in range(STEPS):
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))
  return {"losses": np.array(losses), "state": state, "init": init_params, "batch": batch,
          "compiled": compiled, "setup": setup, "metrics": jax.device_get(metrics)}


@pytest.fixture(scope="module")
def reference():
  return run(tiny_config(), devices=jax.devices()[:1])


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| over an array (b the reference).

  Norm-wise, not element-wise: the sharded runs sum gradients in another order, and Adam divides
  each gradient by its own magnitude, so an element whose gradient is nearly zero can move by
  ~1e-5 of the largest weight while the array as a whole agrees to ~1e-6 (printed: worst element).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _worst_element(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device_and_is_sharded(reference, name):
  """One test per layout, so each layout compiles once even when xdist splits the module."""
  got = run(tiny_config(**LAYOUTS[name]))
  check_same_numbers(name, got, reference)
  _check_sharded_as_the_rules_say(name, got)
  _check_state_memory(name, got)


def check_same_numbers(name, got, reference):
  assert jax.device_count() == 8 and got["setup"].mesh.size == 8
  np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-5)
  errors, elements = {}, []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["state"].params),
                          jax.tree.leaves(reference["state"].params)):
    a, b = jax.device_get(a), jax.device_get(b)
    errors[jax.tree_util.keystr(path)] = rel_err(a, b)
    elements.append(_worst_element(a, b))
  worst = max(errors, key=errors.get)
  loss_err = np.abs(got["losses"] - reference["losses"]).max() / np.abs(reference["losses"]).max()
  print(f"\n{name}: loss rel error {loss_err:.1e}, max param rel error {errors[worst]:.1e} ({worst}), "
        f"worst element {max(elements):.1e} of its array's max")
  assert errors[worst] <= 1e-5, (worst, errors[worst])
  assert not np.array_equal(jax.device_get(got["state"].params["embed"].value),
                            got["init"]["embed"].value)  # really trained


def expected_shard(shape, logical, mesh_shape, rules):
  """The shard shape the rules promise (first use of a mesh axis wins; indivisible: whole)."""
  table, used, out = dict(rules), set(), []
  for size, name in zip(shape, logical):
    axes = tuple(a for a in (table.get(name) or ()) if a not in used)
    split = math.prod(mesh_shape[a] for a in axes)
    if size % split:
      split, axes = 1, ()
    used.update(axes)
    out.append(size // split)
  return tuple(out)


def _check_sharded_as_the_rules_say(name, got):
  setup, state = got["setup"], got["state"]
  mesh_shape, rules = dict(setup.mesh.shape), setup.rules
  is_var = lambda x: hasattr(x, "get_metadata")  # noqa: E731
  params = jax.tree.leaves(state.params, is_leaf=is_var)
  mu = jax.tree.leaves(state.opt_state[1][0].mu, is_leaf=is_var)  # (clip, adamw(adam, ...))
  for tree in (params, mu):
    for var in tree:
      x, logical = var.get_value(), var.get_metadata()["out_sharding"]
      want = expected_shard(x.shape, logical, mesh_shape, rules)
      assert {s.data.shape for s in x.addressable_shards} == {want}, (name, logical, x.shape)
  # The strategies themselves, spelled out on named parameters:
  p = state.params
  fsdp, tp = mesh_shape["fsdp"], mesh_shape["tensor"]
  assert p["embed"].value.addressable_shards[0].data.shape == (128 // tp, 32 // fsdp)  # [vocab, embed]
  q = p["blocks"]["attn"]["q"].value  # [layers, embed, heads, head_dim]
  assert q.addressable_shards[0].data.shape == (2, 32 // fsdp, 8 // tp, 4)
  up = p["blocks"]["mlp"]["up"].value  # [layers, embed, mlp]: column parallel
  down = p["blocks"]["mlp"]["down"].value  # [layers, mlp, embed]: row parallel
  assert up.addressable_shards[0].data.shape == (2, 32 // fsdp, 64 // tp)
  assert down.addressable_shards[0].data.shape == (2, 64 // tp, 32 // fsdp)
  rows = 8 // (mesh_shape["data"] * fsdp)
  for x in got["batch"].values():
    assert x.addressable_shards[0].data.shape == (rows, 16 // mesh_shape["sequence"])
  if name == "fsdp8":  # ZeRO-3: not one parameter or moment left whole
    for var in params + mu:
      assert var.get_value().sharding.spec != jax.sharding.PartitionSpec(), var.get_metadata()


def _state_bytes_per_device(compiled, batch) -> int:
  """Argument bytes of one device's program, less its rows of the batch = params + optimizer state."""
  batch_bytes = sum(x.addressable_shards[0].data.nbytes for x in batch.values())
  return compiled.memory_analysis().argument_size_in_bytes - batch_bytes


def _check_state_memory(name, got):
  """Per-device params + optimizer state from XLA's memory analysis of the compiled step.

  The replicated figure is the whole state (what dp8 holds on every device, asserted for dp8);
  fsdp8 must hold at most 1/8 of it plus 10%.
  """
  per_device = _state_bytes_per_device(got["compiled"], got["batch"])
  whole = sum(x.nbytes for x in jax.tree.leaves(got["state"][:3]))  # step, params, optimizer state
  print(f"{name}: params + optimizer state {per_device} bytes per device, {whole} replicated")
  if name == "dp8":
    assert whole <= per_device <= whole * 1.01  # + the RNG key
  if name == "fsdp8":
    assert per_device <= whole / 8 * 1.1, (per_device, whole)


# ---------------------------------------------------------------------------------------------
# mesh configs that cannot work: a ConfigError naming the field, before anything compiles


@pytest.mark.parametrize("mesh,model,train,message", [
    (dict(data=3), {}, {}, r"multiply to 3 but there are 8 devices.*-1"),
    (dict(data=-1, tensor=3), {}, {}, r"'mesh.data' is -1, but the other mesh.\* sizes multiply to 3, which does not divide the 8 devices"),
    (dict(data=1, tensor=8), dict(num_heads=12, head_dim=4), {}, r"model.num_heads \(12\) is not divisible by the tensor axis \(8 = mesh.tensor x mesh.dcn_tensor\): tensor parallelism splits whole heads"),
    (dict(data=2, tensor=4), dict(num_kv_heads=2), {}, r"model.num_kv_heads \(2\) is not divisible by the tensor axis \(4"),
    (dict(data=1, fsdp=8), {}, dict(grad_accum_steps=2), r"4 rows per micro-batch is not divisible by the data-like axes \(data x fsdp x expert = 8\)"),
    (dict(data=1, fsdp=4, sequence=2), {}, {}, None),  # fits
    (dict(data=4, sequence=2), dict(max_seq_len=24), {}, None),
])
@pytest.mark.fast
def test_mesh_errors_name_the_axis_and_the_fix(mesh, model, train, message):
  c = tiny_config()
  c.mesh.update(**mesh)
  c.model.update(**model)
  c.train.update(**train)
  validate(c)
  if message is None:
    make_setup(c)
  else:
    with pytest.raises(ConfigError, match=message):
      make_setup(c)


@pytest.mark.fast
def test_sequence_and_stage_errors():
  c = tiny_config(data=4, sequence=2)
  c.data.seq_len = 15
  with pytest.raises(ConfigError, match=r"data.seq_len \(15\) is not divisible by the sequence axis \(2\)"):
    resolve_mesh(c, 8)
  c = tiny_config(data=4)
  c.model.num_layers = 3
  c.mesh.stage = 2
  with pytest.raises(ConfigError, match=r"model.num_layers \(3\) is not divisible by the stage axis \(2\)"):
    resolve_mesh(c, 8)


@pytest.mark.fast
def test_dcn_sizes_multiply_with_in_slice_sizes():
  c = tiny_config(data=2, fsdp=2)  # dcn_data is -1 by default
  ici, dcn = resolve_mesh(c, 8, num_slices=2)
  assert ici == dict(data=2, stage=1, fsdp=2, sequence=1, expert=1, tensor=1) and dcn["data"] == 2
  c.mesh.update(dcn_data=1, dcn_fsdp=3)
  with pytest.raises(ConfigError, match=r"mesh sizes \(mesh.dcn_fsdp=3\) multiply to 3 but there are 2 slices"):
    resolve_mesh(c, 8, num_slices=2)


@pytest.mark.parametrize("field,value,message", [
    ("fsdp", -1, r"\['mesh.data', 'mesh.fsdp'\] are all -1"),
    ("tensor", 0, r"'mesh.tensor' must be a positive size or -1"),
    ("dcn_fsdp", -1, r"\['mesh.dcn_data', 'mesh.dcn_fsdp'\] are all -1"),
    ("rules", "batch:data, embd:fsdp", r"'mesh.rules': 'embd' is not a logical axis"),
    ("rules", "batch:data+model", r"'mesh.rules': 'batch' maps to 'model', not a mesh axis"),
    ("rules", "batch:data, batch:fsdp", r"'batch' is listed twice"),
])
@pytest.mark.fast
def test_bad_mesh_fields_fail_validation(field, value, message):
  c = tiny_config()
  c.mesh[field] = value
  with pytest.raises(ConfigError, match=message):
    validate(c)


@pytest.mark.fast
def test_default_rules_parse():
  rules = dict(parse_rules(base_config().mesh.rules))
  assert rules["batch"] == ("data", "fsdp", "expert") and rules["embed"] == ("fsdp", "expert")
  assert rules["experts"] == ("expert",)  # expert parallelism splits the experts
  assert rules["layers"] == ("stage",) and rules["stage"] == ("stage",)  # pipeline stages own their layers


@pytest.mark.fast
def test_process_rows_must_be_the_block_the_pipelines_give(monkeypatch):
  from jaxlm.parallel import sharding
  c = tiny_config(**LAYOUTS["dp2_fsdp2_tp2"])
  setup = make_setup(c)
  assert sharding.process_rows(setup.batch_sharding, (8, 16)) == (0, 8)  # one process: every row
  # As if 2 processes: this one's devices would hold all 8 rows, not the block [0, 4) it feeds.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"holds batch rows \[0, 8\) of 8.*rows \[0, 4\)"):
    global_batch({"inputs": np.zeros((4, 16), np.int32)}, setup.batch_sharding)


# ---------------------------------------------------------------------------------------------
# two processes x four devices = one process x eight


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(mesh, out, *mode, cache=None):
  """Runs tests/multiprocess_worker.py as 2 processes x 4 devices; returns process 0's JSON.
  cache: a folder for JAX's persistent compilation cache, so a second pair of processes on the
  same mesh loads the programs the first compiled."""
  import json
  import os
  import subprocess
  import sys
  port = _free_port()
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), json.dumps(mesh), str(out), *mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  return json.loads(out.read_text())


# dp2 x fsdp2 x tp2 with data across the processes (each process a DCN "slice": the hybrid mesh),
# fsdp and tensor inside each.
TWO_PROCESS_MESH = {"data": 1, "dcn_data": 2, "fsdp": 2, "tensor": 2}


def _continue_in_one_process(c, state_template_run, ckpt_dir):
  """Restores ckpt_dir into a 1-process run on c's mesh and trains AFTER steps (with the run's
  compiled step: same mesh, same shardings): the losses."""
  from jaxlm.train.checkpoint import Checkpointer
  setup = state_template_run["setup"]
  state = Checkpointer(str(ckpt_dir), c.checkpoint).restore(init_sharded_state(setup))
  step = state_template_run["compiled"]
  batch = global_batch(packed_batch(c), setup.batch_sharding)
  losses = []
  for _ in range(AFTER):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses)


@pytest.mark.heavy
def test_two_processes_match_one_and_checkpoints_cross_process_counts(reference, tmp_path):
  """2 processes x 4 devices give the single-device numbers (as 1 process x 8 devices does above);
  the checkpoint they write restores in 1 process on another mesh (fsdp8), and one written by 1
  process (dp8) restores in 2, each continuing with the same losses as the run that wrote it."""
  cache = tmp_path / "jax_cache"
  got = _two_processes(TWO_PROCESS_MESH, tmp_path / "a.json", "save", str(tmp_path / "two"), cache=cache)
  assert got["mesh"]["data"] == 2 and got["data_of_process"] == [[0], [1]]  # data index i: process i
  assert got["rows"] == [0, 4]  # process 0 fed only its half of the batch
  np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-5)
  embed = jax.device_get(reference["state"].params["embed"].value)
  np.testing.assert_allclose(got["embed_sum"], float(np.abs(embed).sum()), rtol=1e-5)

  # 2 processes -> 1 process, dp2.fsdp2.tp2 -> fsdp8
  c = tiny_config(**LAYOUTS["fsdp8"])
  c.checkpoint.async_save = False
  one = _continue_in_one_process(c, run(c), tmp_path / "two")
  np.testing.assert_allclose(one, got["after"], rtol=1e-5)

  # 1 process (dp8) -> 2 processes: save the dp8 run's state, continue it here and there.
  from jaxlm.train.checkpoint import Checkpointer
  c = tiny_config(**LAYOUTS["dp8"])
  c.checkpoint.async_save = False
  dp8 = run(c)
  saver = Checkpointer(str(tmp_path / "one"), c.checkpoint)
  saver.save(STEPS, dp8["state"])
  saver.wait()
  here = _continue_in_one_process(c, dp8, tmp_path / "one")
  there = _two_processes(TWO_PROCESS_MESH, tmp_path / "b.json", "restore", str(tmp_path / "one"),
                         cache=cache)
  np.testing.assert_allclose(there["after"], here, rtol=1e-5)
