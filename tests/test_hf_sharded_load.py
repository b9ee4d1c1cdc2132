"""Hugging Face weights load straight into a mesh, each device's shard read as a slice of the file.

On 8 simulated devices the sharded arrays equal the whole tensors converted by hand, and every part
of every tensor is read exactly once; in two processes of 4 devices each, each process reads exactly
the slices its own devices hold and the logits still match transformers'.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open

from jaxlm.interop import hf
from jaxlm.interop.safetensors_reader import Checkpoint
from jaxlm.interop.sharded_load import Layout, read_param
from jaxlm.parallel.mesh import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "hf", "llama3")  # embed 64, 4 heads, 2 kv heads of 16, mlp 128


def _tensors():
  with safe_open(os.path.join(FIXTURE, "model.safetensors"), framework="numpy") as f:
    return {name: f.get_tensor(name) for name in f.keys()}


def _by_hand() -> dict:
  """The fixture's parameters in jaxlm layout, converted whole with explicit transposes."""
  t = _tensors()

  def stack(name, convert):
    return np.stack([convert(t[f"model.layers.{i}.{name}"]) for i in range(2)])

  return {
      ("embed",): t["model.embed_tokens.weight"], ("unembed",): t["lm_head.weight"].T,
      ("final_norm", "scale"): t["model.norm.weight"],
      ("blocks", "attn", "q"): stack("self_attn.q_proj.weight", lambda w: w.T.reshape(64, 4, 16)),
      ("blocks", "attn", "k"): stack("self_attn.k_proj.weight", lambda w: w.T.reshape(64, 2, 16)),
      ("blocks", "attn", "v"): stack("self_attn.v_proj.weight", lambda w: w.T.reshape(64, 2, 16)),
      ("blocks", "attn", "o"): stack("self_attn.o_proj.weight", lambda w: w.T.reshape(4, 16, 64)),
      ("blocks", "mlp", "gate"): stack("mlp.gate_proj.weight", lambda w: w.T),
      ("blocks", "mlp", "up"): stack("mlp.up_proj.weight", lambda w: w.T),
      ("blocks", "mlp", "down"): stack("mlp.down_proj.weight", lambda w: w.T),
      ("blocks", "attn_norm", "scale"): stack("input_layernorm.weight", lambda w: w),
      ("blocks", "mlp_norm", "scale"): stack("post_attention_layernorm.weight", lambda w: w),
  }


@pytest.mark.fast
@pytest.mark.parametrize("layout", [dict(fsdp=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)],
                         ids=["fsdp8", "fsdp4_tp2", "dp2_fsdp2_tp2"])
def test_sharded_arrays_equal_the_whole_tensors_and_each_slice_is_read_once(layout):
  config = hf.read_config(FIXTURE)
  config.mesh.update(**{"data": 1, **layout})
  mesh = make_mesh(config)
  reads = []
  model, _ = hf.load_model(FIXTURE, mesh=mesh, recorder=lambda name, index: reads.append((name, index)))
  expected = _by_hand()
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert sorted(params) == sorted(expected)
  for path, var in params.items():
    array = var.get_value()
    assert array.sharding.mesh == mesh and array.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(array), expected[path], err_msg=str(path))
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected[path][shard.index])
  q = params[("blocks", "attn", "q")].get_value()  # [layers, embed, heads, head_dim]
  assert q.addressable_shards[0].data.shape == (2, 64 // layout["fsdp"], 4 // layout.get("tensor", 1), 16)
  # Devices holding the same slice share one read; the slices of a tensor tile it exactly.
  assert len(reads) == len(set(reads))
  read = {}
  for name, index in reads:
    read[name] = read.get(name, 0) + int(np.prod([b - a for a, b in index]))
  assert read == {name: value.size for name, value in _tensors().items()}


@pytest.mark.fast
def test_a_split_inner_axis_reads_whole_heads_and_cuts_them():
  """head_dim split (no rule does it, but a custom one could): an HF row block holds whole heads,
  so the reader takes the heads' rows and cuts head_dim after the transpose."""
  devices = np.array(jax.devices()[:8]).reshape(2, 4)
  mesh = jax.sharding.Mesh(devices, ("x", "y"))
  checkpoint = Checkpoint(FIXTURE)
  names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
  layout = Layout.of((("heads", "head_dim"), "embed"), ("embed", "heads", "head_dim"), (64, 4, 16))
  for spec in [PartitionSpec(None, "x", None, "y"), PartitionSpec("x", "y", None, None),
               PartitionSpec(None, None, "x", "y")]:
    q = read_param(checkpoint, names, layout, (2, 64, 4, 16), np.float32, NamedSharding(mesh, spec))
    np.testing.assert_array_equal(np.asarray(q), _by_hand()[("blocks", "attn", "q")], err_msg=str(spec))
  out = Layout.of(("embed", ("heads", "head_dim")), ("heads", "head_dim", "embed"), (4, 16, 64))
  o = _tensors()["model.layers.0.self_attn.o_proj.weight"]
  np.testing.assert_array_equal(out.to_hf(out.from_hf(o)), o)


@pytest.mark.fast
def test_an_elementwise_formula_applies_per_slice():
  """A table entry's (from_hf, to_hf) pair, e.g. a norm HF stores as scale - 1, acts on each slice."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
  layout = Layout.of(("embed",), ("embed",), (64,))
  names = [f"model.layers.{i}.input_layernorm.weight" for i in range(2)]
  scale = read_param(Checkpoint(FIXTURE), names, layout, (2, 64), np.float32,
                     NamedSharding(mesh, PartitionSpec(None, "x")), from_hf=lambda w: w + 1)
  np.testing.assert_array_equal(np.asarray(scale), _by_hand()[("blocks", "attn_norm", "scale")] + 1)


@pytest.mark.fast
def test_a_bfloat16_checkpoint_casts_per_shard():
  """dtype= casts each slice as it is read: bfloat16 master weights from the float32 fixture."""
  import jax.numpy as jnp
  config = hf.read_config(FIXTURE)
  config.mesh.update(data=1, fsdp=8)
  model, _ = hf.load_model(FIXTURE, mesh=make_mesh(config), dtype="bfloat16")
  embed = nnx.state(model, nnx.Param)["embed"][...]
  assert embed.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(embed), _tensors()["model.embed_tokens.weight"].astype(jnp.bfloat16))


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Which dimension of each HF tensor is `embed` (the one fsdp splits): torch's Linear is [out, in].
EMBED_DIM = {"embed_tokens": 1, "lm_head": 1, "norm": 0, "layernorm": 0, "q_proj": 1, "k_proj": 1,
             "v_proj": 1, "gate_proj": 1, "up_proj": 1, "o_proj": 0, "down_proj": 0}


def _embed_dim(name: str) -> int:
  return next(d for key, d in EMBED_DIM.items() if name.split(".")[-2].endswith(key))


def test_two_processes_each_read_only_the_slices_their_devices_hold(tmp_path):
  port, out = _free_port(), tmp_path / "out.json"
  worker = os.path.join(HERE, "hf_sharded_load_worker.py")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  results = [json.loads((tmp_path / f"out.json.{i}").read_text()) for i in range(2)]
  shapes = {name: value.shape for name, value in _tensors().items()}
  owner = results[0]["fsdp_process"]  # process holding each of the 8 fsdp positions
  assert sorted(owner) == [0] * 4 + [1] * 4 and owner == results[1]["fsdp_process"]
  for p, result in enumerate(results):
    reads = [(name, tuple(map(tuple, index))) for name, index in result["reads"]]
    expected = set()
    for name, shape in shapes.items():  # fsdp splits embed (64) into 8 chunks of 8
      dim = _embed_dim(name)
      for k in [k for k in range(8) if owner[k] == p]:
        expected.add((name, tuple((8 * k, 8 * k + 8) if d == dim else (0, n) for d, n in enumerate(shape))))
    assert len(reads) == len(set(reads)) and set(reads) == expected, f"process {p}"
    assert result["shard_diff"] == 0.0
  assert results[0]["logits_diff"] <= 1e-4
