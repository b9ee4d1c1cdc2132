"""Model presets: published parameter counts (from the abstract model), documented targets, CLI overrides."""

import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

from jaxlm import presets
from jaxlm.config import base_config, check_overrides, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE_PRESETS = ["gpt2_small", "llama_350m", "llama_1b", "llama3_8b", "llama3_70b", "llama3_405b",
                 "mistral_7b", "gemma2_2b", "qwen2_5_7b"]
TPU_SLICE = re.compile(r"^(v4|v5e|v5p|v6e)-\d+$")
MESH_AXES = {"data", "fsdp", "tensor", "sequence", "stage"}


def test_every_issue_preset_exists():
  assert set(SCALE_PRESETS + ["shakespeare", "tiny"]) <= set(presets.names())


@pytest.mark.parametrize("name", SCALE_PRESETS)
def test_param_count_matches_published_within_1_percent(name):
  module = presets.load(name)
  count = presets.param_count(module.get_config().model)
  assert abs(count / module.PUBLISHED_PARAMS - 1) < 0.01, (name, count, module.PUBLISHED_PARAMS)


def test_exact_counts_of_the_published_models():
  """Where every published weight has a counterpart, the count is exact, not merely within 1%."""
  exact = {"llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496, "llama3_405b": 405_853_388_800,
           "mistral_7b": 7_241_732_096, "qwen2_5_7b": 7_615_616_512}
  for name, published in exact.items():
    assert presets.param_count(presets.load(name).get_config().model) == published, name
  # Gemma-2-2B lacks exactly its post-attention and post-MLP norm scales: 26 layers x 2 x 2304.
  gemma = presets.param_count(presets.load("gemma2_2b").get_config().model)
  assert gemma == 2_614_341_888 - 26 * 2 * 2304


@pytest.mark.parametrize("name", SCALE_PRESETS)
def test_preset_validates_and_documents_its_target(name):
  module = presets.load(name)
  c = validate(module.get_config())
  assert TPU_SLICE.match(module.TPU_SLICE), module.TPU_SLICE
  assert set(module.MESH) == MESH_AXES and list(module.MESH.values()).count(-1) <= 1
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
  known = set(_flat(base_config()))
  for name in SCALE_PRESETS:
    assert set(_flat(presets.load(name).get_config())) == known, name


def _flat(cfg, prefix=""):
  for k, v in cfg.items():
    if hasattr(v, "items"):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"
