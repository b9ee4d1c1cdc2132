"""Hugging Face checkpoints load into jaxlm with transformers' numbers.

Fixtures (tests/fixtures/hf/<family>/, written by tests/fixtures/make_hf_refs.py with torch and
transformers, so CI needs neither): a tiny random HF model in safetensors and `refs.npz` with 512
input ids, transformers' float32 logits for them and its greedy 16-token continuation.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.inference.decode import generate
from jaxlm.interop import hf

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
FAMILIES = sorted(os.listdir(FIXTURES))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_continuation_match_transformers(family):
  path = os.path.join(FIXTURES, family)
  refs = np.load(os.path.join(path, "refs.npz"))
  model, config = hf.load_model(path)
  ids = refs["ids"][None]  # [1, 512]
  logits = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))[0]
  diff = float(np.abs(logits[:, :config.model.vocab_size] - refs["logits"]).max())
  print(f"\n{family}: {ids.shape[1]} tokens, max |logit difference| {diff:.2e}")
  assert diff <= 1e-4
  graphdef, params = nnx.split(model)
  greedy = generate(graphdef, params, ids, max_new_tokens=len(refs["greedy"]), key=None)
  np.testing.assert_array_equal(np.asarray(greedy)[0], refs["greedy"])


@pytest.mark.fast
def test_what_cannot_load_exactly_is_refused_by_name(tmp_path):
  path = tmp_path / "m"
  shutil.copytree(os.path.join(FIXTURES, "llama3"), path)
  original = json.loads((path / "config.json").read_text())

  def with_config(**changes):
    (path / "config.json").write_text(json.dumps({**original, **changes}))
    return str(path)

  with pytest.raises(hf.InteropError, match=r"'FalconForCausalLM' is not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
    hf.load_model(with_config(architectures=["FalconForCausalLM"]))
  with pytest.raises(hf.InteropError, match="rope_scaling type 'dynamic'"):
    hf.load_model(with_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
  with pytest.raises(hf.InteropError, match=r"rope_scaling fields \['mscale'\]"):
    hf.load_model(with_config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 2.0,
                                            "original_max_position_embeddings": 128}))
  with pytest.raises(hf.InteropError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \[64, 128\] .* implies \[64, 96\]"):
    hf.load_model(with_config(intermediate_size=96))
  (path / "model.safetensors").unlink()
  with pytest.raises(hf.InteropError, match="no model.safetensors"):
    hf.load_model(with_config())
  with pytest.raises(hf.InteropError, match="nowhere is not a directory"):
    hf.load_model(str(tmp_path / "nowhere"))  # more broken checkpoints: test_hf_checkpoint_errors.py


def test_loads_straight_into_a_mesh_with_the_rules_shardings():
  from jaxlm.parallel.mesh import make_mesh

  path = os.path.join(FIXTURES, "llama3")
  refs = np.load(os.path.join(path, "refs.npz"))
  with open(os.path.join(path, "config.json")) as f:
    config = hf.config_from_hf(json.load(f))
  config.mesh.update(data=1, fsdp=4, tensor=2)
  model, _ = hf.load_model(path, mesh=make_mesh(config))
  q = nnx.state(model, nnx.Param)["blocks"]["attn"]["q"][...]  # [layers, embed, heads, head_dim]
  assert q.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)
  logits = np.asarray(jax.jit(lambda m, x: m(x))(model, refs["ids"][None]))[0]
  assert float(np.abs(logits - refs["logits"]).max()) <= 1e-4


def _safetensors(path):
  from safetensors import safe_open
  out = {}
  for file in sorted(os.listdir(path)):
    if file.endswith(".safetensors"):
      with safe_open(os.path.join(path, file), framework="numpy") as f:
        out.update({name: f.get_tensor(name) for name in f.keys()})
  return out


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_back_the_same_bytes(family, tmp_path):
  source = os.path.join(FIXTURES, family)
  model, _ = hf.load_model(source)
  hf.save_model(model, str(tmp_path / "out"), max_shard_bytes=100_000)  # several shards + index
  assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) > 1
  before, after = _safetensors(source), _safetensors(tmp_path / "out")
  assert sorted(after) == sorted(before)
  for name, value in before.items():
    assert after[name].dtype == value.dtype and after[name].tobytes() == value.tobytes(), name
  again, _ = hf.load_model(str(tmp_path / "out"))  # and the exported config.json reads back
  assert again.cfg == model.cfg


def _native_model(**model_fields):
  """A randomly initialised jaxlm model of the kind training writes (tied, padded vocabulary)."""
  from jaxlm.config import base_config
  from jaxlm.models import build_model
  c = base_config()
  c.model.update(vocab_size=250, vocab_multiple=128, d_model=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, mlp_dim=128, max_seq_len=600, init_std=0.1, **model_fields)
  return build_model(c)


@pytest.mark.parametrize("fields", [{}, dict(attention_bias=True, tie_embeddings=False),
                                    dict(qk_norm=True, sliding_window=0)], ids=["llama", "qwen2", "qwen3"])
def test_a_jaxlm_model_exported_runs_in_transformers_with_the_same_logits(fields, tmp_path):
  transformers = pytest.importorskip("transformers")  # the bench extra; CI runs the byte checks above
  import torch
  model = _native_model(**fields)
  hf.save_model(model, str(tmp_path / "out"))
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), output_loading_info=True, dtype=torch.float32)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  ids = np.random.default_rng(0).integers(0, 250, (1, 512)).astype(np.int32)
  with torch.no_grad():
    theirs = loaded.eval()(torch.from_numpy(ids).long()).logits[0].numpy()
  ours = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))[0, :, :250]
  diff = float(np.abs(ours - theirs).max())
  print(f"\nexported {loaded.config.architectures[0]}: max |logit difference| {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.fast
def test_the_mistral_preset_is_the_published_mistral_architecture():
  """Mistral-7B-v0.1's published config.json, as README's init_from example relies on."""
  from jaxlm import presets
  from jaxlm.config import flat_fields
  published = {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 32768,
               "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
               "tie_word_embeddings": False}
  theirs = flat_fields(hf.config_from_hf(published).model)
  ours = flat_fields(presets.load("mistral_7b").get_config().model)
  assert {k for k in ours if ours[k] != theirs[k]} == {"vocab_multiple"}  # 32000 is a multiple of 128


def test_a_bfloat16_checkpoint_loads_into_float32_master_weights(tmp_path):
  import jax.numpy as jnp
  from safetensors.flax import save_file
  source = os.path.join(FIXTURES, "llama3")
  shutil.copytree(source, tmp_path / "bf16")
  tensors = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _safetensors(source).items()}
  save_file(tensors, str(tmp_path / "bf16" / "model.safetensors"))
  model, _ = hf.load_model(str(tmp_path / "bf16"))
  embed = nnx.state(model, nnx.Param)["embed"][...]
  assert embed.dtype == jnp.float32
  np.testing.assert_array_equal(embed, tensors["model.embed_tokens.weight"].astype(jnp.float32))
