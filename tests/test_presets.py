"""Model presets: parameter counts (a closed form against the abstract model, and against the published
counts), documented targets, CLI overrides."""

import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

from jaxlm import presets
from jaxlm.config import base_config, check_overrides, flat_fields, moe_layers, validate, with_vocab_size

pytestmark = pytest.mark.fast  # unit tests: the `-m fast` tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE_PRESETS = ["mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v3"]
SCALE_PRESETS = ["gpt2_small", "llama_350m", "llama_1b", "llama3_8b", "llama3_70b", "llama3_405b",
                 "mistral_7b", "gemma2_2b", "qwen2_5_7b", *MOE_PRESETS]
TPU_SLICE = re.compile(r"^(v4|v5e|v5p|v6e)-\d+$")
MESH_AXES = {"data", "fsdp", "tensor", "sequence", "stage"}  # and "expert" for MoE presets
OWN_SHAPES = {"gpt2_small", "llama_350m", "llama_1b"}  # no published model: PUBLISHED_PARAMS is ours


def test_every_documented_preset_exists():
  assert set(SCALE_PRESETS + ["shakespeare", "tiny"]) <= set(presets.names())


def closed_form_params(m) -> int:
  """Parameters of the transformer config.model `m` describes, counted from its fields by hand."""
  d, hd = m.d_model, m.head_dim or m.d_model // m.num_heads
  norm = d * (2 if m.norm_kind == "layernorm" else 1)  # scale (+ bias)
  gated = m.mlp_kind in ("swiglu", "geglu")
  attn = d * hd * m.num_heads * 2 + d * hd * m.num_kv_heads * 2  # q and o; k and v
  if m.attention_kind == "mla":  # low-rank q (q_a, its norm, q_b) or a full q; kv_a, its norm, kv_b; o
    qk, h, kvl = m.qk_nope_head_dim + m.qk_rope_head_dim, m.num_heads, m.kv_lora_rank
    q = (d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * qk) if m.q_lora_rank else d * h * qk
    attn = q + d * (kvl + m.qk_rope_head_dim) + kvl + kvl * h * (m.qk_nope_head_dim + m.v_head_dim)
    attn += h * m.v_head_dim * d
  if m.attention_bias:
    attn += hd * (m.num_heads + 2 * m.num_kv_heads)  # on q, k, v
  if m.qk_norm:
    attn += 2 * hd * (2 if m.norm_kind == "layernorm" else 1)
  mlp = d * m.mlp_dim * (3 if gated else 2)  # up (+ gate), down
  if m.mlp_bias:
    mlp += m.mlp_dim * (2 if gated else 1) + d
  layer = attn + mlp + (4 if m.post_norms else 2) * norm  # + the pre- (and post-) attention and MLP norms
  total = m.vocab_size * d + m.num_layers * layer + norm  # embedding, layers, final norm
  if m.moe_num_experts:  # MoE layers: a router (+ its bias), the experts and the shared MLP instead
    e, width = m.moe_num_experts, m.moe_mlp_dim or m.mlp_dim
    moe_mlp = d * e + (e if m.moe_router == "sigmoid" else 0)
    moe_mlp += d * width * (3 if gated else 2) * (e + m.moe_shared_experts)
    total += sum(moe_layers(m)) * (moe_mlp - mlp)
  if m.position_kind == "learned":
    total += m.max_seq_len * d
  if not m.tie_embeddings:
    total += d * m.vocab_size
  return total


@pytest.mark.parametrize("name", presets.names())
def test_abstract_model_has_the_closed_form_count(name):
  c = presets.load(name).get_config()
  if not c.model.vocab_size:  # taken from the tokenizer the run trains: tokenizer.vocab_size ids
    c = with_vocab_size(c, c.tokenizer.vocab_size)
  assert presets.param_count(c.model) == closed_form_params(c.model)


def test_closed_form_covers_every_optional_weight():
  m = base_config().model
  m.update(vocab_size=96, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12, mlp_dim=40,
           mlp_kind="gelu", norm_kind="layernorm", position_kind="learned", max_seq_len=24,
           tie_embeddings=False, qk_norm=True, attention_bias=True, mlp_bias=True, post_norms=True)
  # By hand: q and o 32 x 4 x 12 = 1,536 each, k and v 32 x 2 x 12 = 768 each (4,608); q/k/v biases
  # 48 + 24 + 24 = 96; q/k layernorms 2 x 2 x 12 = 48; MLP 2 x 32 x 40 = 2,560 + biases 40 + 32 =
  # 72; four layernorms (post-norms too) 4 x 64 = 256. A layer: 4,608 + 96 + 48 + 2,560 + 72 + 256
  # = 7,640; three 22,920. Embedding 96 x 32 = 3,072, positions 24 x 32 = 768, final norm 64,
  # unembedding 3,072.
  assert closed_form_params(m) == 29_896 == presets.param_count(m)
  # Without MLP biases (3 x 72 fewer) and MoE in layers 1 and 2 (first 1 dense): each swaps the 2,560
  # of its MLP for a router 32 x 6 = 192 with its bias 6, six experts of 2 x 32 x 16 = 1,024 and one
  # shared MLP of 1,024: 7,366.
  m.update(mlp_bias=False, moe_num_experts=6, moe_mlp_dim=16, moe_shared_experts=1,
           moe_router="sigmoid", moe_first_dense_layers=1)
  assert closed_form_params(m) == 29_896 - 3 * 72 + 2 * (192 + 6 + 7 * 1_024 - 2_560) == presets.param_count(m)


@pytest.mark.parametrize("name", SCALE_PRESETS)
def test_param_count_matches_the_stated_count(name):
  """Published models within 1% of the model card; our own shapes to the 4 figures stated."""
  module = presets.load(name)
  count = closed_form_params(module.get_config().model)
  tolerance = 5e-4 if name in OWN_SHAPES else 0.01
  assert abs(count / module.PUBLISHED_PARAMS - 1) < tolerance, (name, count, module.PUBLISHED_PARAMS)


def test_moe_presets_have_the_published_total_and_active_counts():
  """Total: the exact counts of the published checkpoints (DeepSeek-V3 without its multi-token
  prediction module, which the published 685B include). Active: the model cards' rounded figures
  (12.9B, 3.3B, 37B), within 2%: ours include the input embedding (DeepSeek-V3: 0.93B of its 37.55B);
  Mixtral's 12,879,925,248 is the exact figure its card derives from."""
  exact = {"mixtral_8x7b": 46_702_792_704, "qwen3_30b_a3b": 30_532_122_624,
           "deepseek_v3": 671_026_419_200}
  active = {"mixtral_8x7b": 12_879_925_248, "qwen3_30b_a3b": 3_353_032_704,
            "deepseek_v3": 37_552_297_472}
  for name in MOE_PRESETS:
    module = presets.load(name)
    m = module.get_config().model
    assert presets.param_count(m) == exact[name], name
    count = presets.active_param_count(m)
    assert count == active[name], (name, count)
    assert abs(count / module.PUBLISHED_ACTIVE_PARAMS - 1) < 0.02, (name, count)
  dense = presets.load("llama3_8b").get_config().model
  assert presets.active_param_count(dense) == presets.param_count(dense)


def test_gpt2_small_is_the_size_of_gpt2_small():
  # GPT-2 small (OpenAI's 124M): 124,439,808 parameters with its learned positions and biases.
  count = closed_form_params(presets.load("gpt2_small").get_config().model)
  assert abs(count / 124_439_808 - 1) < 0.01


def test_exact_counts_of_the_published_models():
  """Where every published weight has a counterpart, the count is exact, not merely within 1%."""
  exact = {"llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496, "llama3_405b": 405_853_388_800,
           "mistral_7b": 7_241_732_096, "qwen2_5_7b": 7_615_616_512, "gemma2_2b": 2_614_341_888}
  for name, published in exact.items():
    assert presets.param_count(presets.load(name).get_config().model) == published, name
  assert presets.load("gemma2_2b").PUBLISHED_PARAMS == 2_614_341_888  # stated exactly, not rounded


@pytest.mark.parametrize("name", SCALE_PRESETS)
def test_preset_validates_and_documents_its_target(name):
  module = presets.load(name)
  c = validate(module.get_config())
  assert TPU_SLICE.match(module.TPU_SLICE), module.TPU_SLICE
  axes = MESH_AXES | ({"expert"} if c.model.moe_num_experts else set())
  assert set(module.MESH) == axes and list(module.MESH.values()).count(-1) <= 1
  assert module.GPU_NODES >= 1
  assert c.tokenizer.vocab_size == c.model.vocab_size
  doc = " ".join(module.__doc__.split())
  assert module.TPU_SLICE in doc and "tokens a step" in doc
  # the batch splits evenly over the 8 processes of an 8-GPU node (and so over data-parallel hosts)
  assert c.train.batch_size % 8 == 0


def _parse(argv):
  """Parses flags exactly as `python -m jaxlm.train` does, into a fresh flag registry."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  check_overrides(argv)
  values(argv)
  return values.config


def test_cli_overrides_reach_every_section_of_a_preset():
  c = _parse(["prog", f"--config={ROOT}/configs/llama3_8b.py", "--config.model.num_layers=2",
              "--config.model.rope_scaling=none", "--config.train.batch_size=64",
              "--config.data.seq_len=1024", "--config.checkpoint.every=50"])
  assert (c.model.num_layers, c.model.rope_scaling, c.train.batch_size, c.data.seq_len,
          c.checkpoint.every) == (2, "none", 64, 1024, 50)
  assert c.model.d_model == 4096  # untouched fields keep the preset's value
  validate(c)


def test_every_base_field_is_overridable_on_a_preset():
  """Each preset holds every field of base_config(), so any --config.<field>= override applies."""
  known = set(flat_fields(base_config()))
  for name in SCALE_PRESETS:
    assert set(flat_fields(presets.load(name).get_config())) == known, name


