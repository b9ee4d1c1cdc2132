"""A broken Hugging Face directory is refused with one error that names what is wrong and the fix.

Each case damages a copy of the Llama fixture (tests/fixtures/hf/llama3) in one way.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.flax import save_file as save_jax
from safetensors.numpy import save_file

from jaxlm.interop import hf

pytestmark = pytest.mark.fast

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf", "llama3")


@pytest.fixture
def copy(tmp_path):
  path = tmp_path / "m"
  shutil.copytree(SOURCE, path)
  return path


def _tensors(file):
  with safe_open(str(file), framework="numpy") as f:
    return {name: f.get_tensor(name) for name in f.keys()}


def _sharded(path):
  """Rewrites path's model.safetensors as three shards and an index; returns {file: [names]}."""
  tensors = _tensors(path / "model.safetensors")
  (path / "model.safetensors").unlink()
  names = sorted(tensors)
  files = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
  for file, held in files.items():
    save_file({n: tensors[n] for n in held}, str(path / file))
  weight_map = {n: file for file, held in files.items() for n in held}
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return files


def test_a_path_that_is_not_a_model_directory(tmp_path, copy):
  with pytest.raises(hf.InteropError, match="nowhere is not a directory: point at a Hugging Face"):
    hf.load_model(str(tmp_path / "nowhere"))
  (copy / "config.json").unlink()
  with pytest.raises(hf.InteropError, match="config.json not found"):
    hf.load_model(str(copy))


def test_no_weights_at_all(copy):
  (copy / "model.safetensors").unlink()
  with pytest.raises(hf.InteropError, match="no model.safetensors or model.safetensors.index.json"):
    hf.load_model(str(copy))


def test_a_shard_the_index_names_is_missing(copy):
  files = _sharded(copy)
  assert hf.load_model(str(copy))[0] is not None  # the sharded copy itself loads
  file = sorted(files)[1]
  (copy / file).unlink()
  first = sorted(files[file])[0]
  with pytest.raises(hf.InteropError, match=rf"{file} is missing: .* puts {len(files[file])} "
                     rf"tensors in it \('{first}'.*download that file"):
    hf.load_model(str(copy))


def test_the_index_and_a_shard_disagree(copy):
  files = _sharded(copy)
  index = json.loads((copy / "model.safetensors.index.json").read_text())
  name = files[sorted(files)[0]][0]
  index["weight_map"][name] = sorted(files)[1]  # the index points at a file without it
  (copy / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(hf.InteropError, match=rf"names tensors that are not in the file it gives: '{name}'"):
    hf.load_model(str(copy))


def test_a_tensor_missing_from_the_files(copy):
  tensors = _tensors(copy / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"], tensors["lm_head.weight"]
  save_file(tensors, str(copy / "model.safetensors"))
  with pytest.raises(hf.InteropError, match=r"2 tensors the architecture in config.json needs are "
                     r"missing .*'model.layers.1.mlp.up_proj.weight', 'lm_head.weight'"):
    hf.load_model(str(copy))


@pytest.mark.parametrize("dtype,stored", [(jnp.int32, "I32"), (jnp.float8_e4m3fn, "F8_E4M3")])
def test_a_quantized_or_integer_weight_is_refused_by_name(copy, dtype, stored):
  tensors = {k: jnp.asarray(v) for k, v in _tensors(copy / "model.safetensors").items()}
  tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"].astype(dtype)
  save_jax(tensors, str(copy / "model.safetensors"))
  with pytest.raises(hf.InteropError, match=rf"'model.layers.0.self_attn.k_proj.weight' is stored "
                     rf"as {stored} .* quantized checkpoints are not supported"):
    hf.load_model(str(copy))


def test_a_tensor_of_the_wrong_shape_names_both_shapes(copy):
  tensors = _tensors(copy / "model.safetensors")
  tensors["model.layers.1.self_attn.o_proj.weight"] = np.zeros((64, 48), np.float32)
  save_file(tensors, str(copy / "model.safetensors"))
  with pytest.raises(hf.InteropError, match=r"'model.layers.1.self_attn.o_proj.weight' has shape "
                     r"\[64, 48\] in .*model.safetensors, but the config.json beside it implies \[64, 64\]"):
    hf.load_model(str(copy))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_file_is_named(copy, damage):
  file = copy / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:-1000] if damage == "truncated" else b"<html>rate limited</html>")
  with pytest.raises(hf.InteropError, match=r"model.safetensors is not a readable safetensors file "
                     r".*truncated or corrupt; download it again"):
    hf.load_model(str(copy))


def test_a_corrupt_index_is_named(copy):
  _sharded(copy)
  (copy / "model.safetensors.index.json").write_text("{")
  with pytest.raises(hf.InteropError, match="model.safetensors.index.json is not a safetensors index"):
    hf.load_model(str(copy))
