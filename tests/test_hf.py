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
  c.model.update(**{**dict(vocab_size=250, vocab_multiple=128, d_model=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, mlp_dim=128, max_seq_len=600, init_std=0.1), **model_fields})
  return build_model(c)


GEMMA = dict(mlp_kind="geglu", norm_plus_one=True, scale_embeddings=True)
GEMMA2 = dict(GEMMA, post_norms=True, num_layers=4, layer_pattern="LG", sliding_window=64,
              query_pre_attn_scalar=24.0, attn_logit_softcap=5.0, final_logit_softcap=2.0)
GEMMA3 = dict(GEMMA, post_norms=True, qk_norm=True, num_layers=7, layer_pattern="LLLLLG",
              sliding_window=64, rope_theta=1e6, rope_scaling="linear", rope_scaling_factor=8.0,
              rope_local_theta=1e4)
MIXTRAL = dict(moe_num_experts=4, moe_experts_per_token=2, sliding_window=64)
QWEN3_MOE = dict(qk_norm=True, num_layers=3, moe_num_experts=8, moe_experts_per_token=2,
                 moe_mlp_dim=32, moe_norm_topk=False, moe_first_dense_layers=1)
DEEPSEEK_V3 = dict(attention_kind="mla", num_layers=3, num_kv_heads=4, q_lora_rank=32,
                   kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   rope_scaling="yarn", rope_scaling_factor=8.0, rope_original_max_len=64, yarn_mscale=0.8,
                   yarn_mscale_all_dim=1.0, moe_num_experts=8, moe_experts_per_token=2,
                   moe_mlp_dim=32, moe_shared_experts=1, moe_router="sigmoid", moe_groups=4,
                   moe_topk_groups=2, moe_routed_scale=2.5, moe_first_dense_layers=1)
EXPORTED = {"llama": {}, "qwen2": dict(attention_bias=True, tie_embeddings=False),
            "qwen3": dict(qk_norm=True, sliding_window=0), "gemma": dict(GEMMA, head_dim=32),
            "gemma2": GEMMA2, "gemma3": GEMMA3, "mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE,
            "deepseek_v3": DEEPSEEK_V3}


@pytest.mark.parametrize("fields", list(EXPORTED.values()), ids=list(EXPORTED))
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


def _fixture_config(family: str, **changes) -> dict:
  with open(os.path.join(FIXTURES, family, "config.json")) as f:
    return {**json.load(f), **changes}


@pytest.mark.fast
def test_what_gemma_cannot_load_exactly_is_refused_by_name():
  refused = [
      (_fixture_config("gemma", hidden_act="relu"), r"hidden_act 'relu'.*gelu_pytorch_tanh"),
      (_fixture_config("gemma2", hidden_activation="gelu"), r"hidden_activation 'gelu'"),
      (_fixture_config("gemma2", attention_bias=True), r"attention_bias.*output projection"),
      (_fixture_config("gemma2", layer_types=["sliding_attention"] * 3), r"layer_types.*4 layers"),
      (_fixture_config("gemma3", attn_logit_softcapping=50.0),
       r"attn_logit_softcapping 50.0.*does not apply"),
      (_fixture_config("gemma3", use_bidirectional_attention=True), r"use_bidirectional_attention"),
      (_fixture_config("gemma3", architectures=["Gemma3ForConditionalGeneration"]), r"text-only"),
      (_fixture_config("gemma3", rope_parameters={
          "full_attention": {"rope_type": "default", "rope_theta": 1e6},
          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
       r"sliding_attention RoPE.*plain RoPE"),
  ]
  for config, message in refused:
    with pytest.raises(hf.InteropError, match=message):
      hf.config_from_hf(config)


@pytest.mark.fast
def test_gemma_configs_read_as_transformers_reads_them():
  """Left-out fields take transformers' defaults; the transformers 4 spellings read alike."""
  gemma2 = hf.config_from_hf({k: v for k, v in _fixture_config("gemma2").items()
                              if k not in ("layer_types", "final_logit_softcapping")}).model
  assert (gemma2.layer_pattern, gemma2.final_logit_softcap) == ("LG", 30.0)  # alternating, capped at 30
  v4 = {k: v for k, v in _fixture_config("gemma3").items() if k not in ("rope_parameters", "layer_types")}
  v4.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
  assert hf.config_from_hf(v4).model == hf.config_from_hf(_fixture_config("gemma3")).model
  gemma3 = hf.config_from_hf(_fixture_config("gemma3")).model
  assert (gemma3.layer_pattern, gemma3.rope_theta, gemma3.rope_local_theta, gemma3.rope_scaling) == (
      "LLLLLG", 1e6, 1e4, "linear")
  every_global = hf.config_from_hf(_fixture_config("gemma2", layer_types=["full_attention"] * 4)).model
  assert (every_global.layer_pattern, every_global.sliding_window) == ("", 0)


@pytest.mark.fast
def test_what_no_gemma_architecture_expresses_is_refused_on_export():
  from jaxlm.config import base_config
  m = base_config().model
  m.update(vocab_size=256, norm_plus_one=True)
  with pytest.raises(hf.InteropError, match=r"Gemma.*\['mlp_kind', 'scale_embeddings'\]"):
    hf.config_to_hf(m)
  m.update(**GEMMA3)
  m.rope_local_theta = 0.0  # the local layers would share the global layers' linear scaling
  with pytest.raises(hf.InteropError, match=r"set model.rope_local_theta"):
    hf.config_to_hf(m)
  m.update(**GEMMA, qk_norm=False, post_norms=False, layer_pattern="", sliding_window=64)
  with pytest.raises(hf.InteropError, match=r"GemmaForCausalLM \(Gemma 1\).*\['sliding_window'\]"):
    hf.config_to_hf(m)


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


@pytest.mark.fast
def test_the_gemma2_2b_preset_is_the_published_gemma2_2b_architecture():
  """Gemma-2-2B's published config.json (Google's, as transformers 4.42 wrote it)."""
  from jaxlm import presets
  from jaxlm.config import flat_fields
  published = {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "head_dim": 256,
               "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
               "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
               "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
               "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
               "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000}
  theirs = flat_fields(hf.config_from_hf(published).model)
  ours = flat_fields(presets.load("gemma2_2b").get_config().model)
  assert {k for k in ours if ours[k] != theirs[k]} == {"vocab_multiple"}  # 256000 = 2000 x 128


# The published config.json files (DeepSeek-V3's as its bf16 conversions carry it: no
# quantization_config), fields transformers does not read left out.
PUBLISHED_MOE = {
    "mixtral_8x7b": {
        "architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 1e6, "sliding_window": None,
        "tie_word_embeddings": False, "vocab_size": 32000},
    "qwen3_30b_a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "mlp_only_layers": [], "moe_intermediate_size": 768,
        "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936},
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
        "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
        "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
        "v_head_dim": 128, "vocab_size": 129280},
}


@pytest.mark.fast
@pytest.mark.parametrize("preset", list(PUBLISHED_MOE))
def test_the_moe_presets_are_the_published_moe_architectures(preset):
  from jaxlm import presets
  from jaxlm.config import flat_fields
  theirs = flat_fields(hf.config_from_hf(PUBLISHED_MOE[preset]).model)
  ours = flat_fields(presets.load(preset).get_config().model)
  # jaxlm's own: the vocabulary's padding multiple, and DeepSeek-V3's all-to-all buffer size (a
  # memory setting of expert parallelism, not of the architecture)
  assert {k for k in ours if ours[k] != theirs[k]} <= {"vocab_multiple", "moe_exchange_factor"}
  assert "vocab_multiple" in {k for k in ours if ours[k] != theirs[k]}


@pytest.mark.fast
def test_moe_layer_patterns_read_as_transformers_builds_them():
  """Qwen3-MoE: layer i is MoE unless in mlp_only_layers, and when (i + 1) % decoder_sparse_step
  == 0; DeepSeek-V3: from first_k_dense_replace on; one expert group is no group limit."""
  def layers(family, **changes):
    m = hf.config_from_hf(_fixture_config(family, num_hidden_layers=4, **changes)).model
    return m.moe_first_dense_layers, m.moe_every
  assert layers("qwen3_moe", decoder_sparse_step=2) == (0, 2)
  assert layers("qwen3_moe", mlp_only_layers=[1, 0]) == (2, 1)
  assert layers("deepseek_v3", first_k_dense_replace=2) == (2, 1)
  all_dense = hf.config_from_hf(_fixture_config("deepseek_v3", first_k_dense_replace=3)).model
  assert all_dense.moe_num_experts == 0
  ungrouped = hf.config_from_hf(_fixture_config("deepseek_v3", n_group=1, topk_group=1)).model
  assert (ungrouped.moe_groups, ungrouped.moe_topk_groups) == (0, 0)


@pytest.mark.fast
def test_what_the_moe_families_cannot_load_exactly_is_refused_by_name():
  yarn = _fixture_config("deepseek_v3")["rope_parameters"]
  refused = [
      (_fixture_config("mixtral", router_jitter_noise=0.1), r"router_jitter_noise 0.1"),
      (_fixture_config("qwen3_moe", mlp_only_layers=[1]), r"mlp_only_layers \[1\]"),
      (_fixture_config("qwen3_moe", mlp_only_layers=[0], decoder_sparse_step=2),
       r"mlp_only_layers \[0\] and decoder_sparse_step 2"),
      (_fixture_config("qwen3_moe", use_sliding_window=True), r"use_sliding_window"),
      (_fixture_config("deepseek_v3", topk_method="greedy"), r"topk_method 'greedy'.*'noaux_tc'"),
      (_fixture_config("deepseek_v3", scoring_func="softmax"), r"scoring_func 'softmax'"),
      (_fixture_config("deepseek_v3", moe_layer_freq=2), r"moe_layer_freq 2"),
      (_fixture_config("deepseek_v3", attention_bias=True), r"attention_bias"),
      (_fixture_config("deepseek_v3", hidden_act="gelu"), r"hidden_act 'gelu'"),
      (_fixture_config("deepseek_v3", rope_parameters={**yarn, "mscale": 0}),
       r"mscale_all_dim 1.0 without mscale"),
  ]
  for config, message in refused:
    with pytest.raises(hf.InteropError, match=message):
      hf.config_from_hf(config)


@pytest.mark.fast
def test_what_no_moe_architecture_expresses_is_refused_on_export():
  from jaxlm.config import base_config
  m = base_config().model
  m.update(vocab_size=256, **MIXTRAL)
  assert hf.config_to_hf(m)["architectures"] == ["MixtralForCausalLM"]
  for changes, message in [
      (dict(MIXTRAL, moe_shared_experts=1), r"MixtralForCausalLM.*\['moe_shared_experts'\]"),
      (dict(MIXTRAL, moe_norm_topk=False), r"MixtralForCausalLM.*\['moe_norm_topk'\]"),
      (dict(MIXTRAL, moe_every=2), r"MixtralForCausalLM.*\['moe_every'\]"),
      (dict(MIXTRAL, moe_router="sigmoid"), r"MixtralForCausalLM.*\['moe_router'\]"),
      (dict(QWEN3_MOE, moe_every=2), r"Qwen3MoeForCausalLM.*\['moe_first_dense_layers'\]"),
      (dict(DEEPSEEK_V3, moe_every=2), r"DeepseekV3ForCausalLM.*\['moe_every'\]"),
      (dict(DEEPSEEK_V3, yarn_mscale_all_dim=0.0), r"DeepseekV3ForCausalLM.*\['yarn_mscale'\]"),
  ]:
    c = base_config().model
    c.update(vocab_size=256, **changes)
    with pytest.raises(hf.InteropError, match=message):
      hf.config_to_hf(c)
