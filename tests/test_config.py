"""Bad configs fail early with a message that names the field and the fix."""

import json
import os
import subprocess
import sys

import pytest

from jaxlm import presets
from jaxlm.config import ConfigError, base_config, check_overrides, validate, with_vocab_size
from jaxlm.runs import from_saved

pytestmark = pytest.mark.fast  # unit tests: the `-m fast` tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_base_config_is_valid():
  validate(base_config())


def test_presets_are_valid():
  for name in ("shakespeare", "tiny"):
    validate(presets.load(name).get_config())


def test_unknown_field_in_a_config_file_is_named():
  c = base_config()
  with pytest.raises(AttributeError, match=r"num_layer.*num_layers"):  # locked: fails where it is set
    c.model.num_layer = 3  # typo of num_layers
  c.unlock()
  c.model.num_layer = 3
  with pytest.raises(ConfigError, match=r"unknown config field 'model.num_layer'.*num_layers"):
    validate(c)


def test_unknown_override_flag_is_named():
  with pytest.raises(ConfigError, match="unknown config field 'train.stpes'"):
    check_overrides(["prog", "--config=x.py", "--config.train.stpes=3"])
  check_overrides(["prog", "--config.train.steps=3"])  # a real field passes


def test_cli_reports_unknown_override_without_a_traceback():
  out = subprocess.run(
      [sys.executable, "-m", "jaxlm.train", "--config=configs/tiny.py", "--config.model.foo=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "unknown config field 'model.foo'" in out.stderr
  assert "Traceback" not in out.stderr


def test_cli_reports_a_mesh_that_does_not_fit_before_compiling(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "jaxlm.train", "--config=configs/tiny.py", "--config.mesh.tensor=3",
       f"--config.train.workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)  # 8 devices (tests/conftest.py)
  assert out.returncode != 0
  assert "'mesh.data' is -1, but the other mesh.* sizes multiply to 3, which does not divide the 8 devices per slice" in out.stderr
  assert "Traceback" not in out.stderr and not os.listdir(tmp_path)  # stopped before anything ran


@pytest.mark.parametrize("field, value, message", [
    ("data.seq_len", 512, r"data.seq_len \(512\) exceeds model.max_seq_len \(256\)"),
    ("model.num_kv_heads", 3, r"model.num_heads \(4\) must be a multiple of model.num_kv_heads \(3\)"),
    ("model.mlp_kind", "relu", r"model.mlp_kind.*swiglu"),
    ("train.grad_accum_steps", 3, r"train.batch_size \(16\) must be divisible by train.grad_accum_steps"),
    ("train.steps", 0, r"train.steps' must be > 0"),
    ("compute.attention", "fast", r"compute.attention.*splash"),
    ("checkpoint.resume", "yes", r"checkpoint.resume"),
])
def test_bad_values_name_the_field(field, value, message):
  c = base_config()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=message):
    validate(c)


def test_file_sources_need_paths():
  c = base_config()
  c.data.source = "jsonl"
  with pytest.raises(ConfigError, match="data.train_paths is empty"):
    validate(c)


def test_vocab_size_comes_from_the_tokenizer_and_a_set_one_must_match():
  c = base_config()
  assert c.model.vocab_size == 0
  assert with_vocab_size(c, 4000).model.vocab_size == 4000
  assert c.model.vocab_size == 0  # a copy: the caller's config is untouched
  c.model.vocab_size = 32000
  assert with_vocab_size(c, 32000).model.vocab_size == 32000
  with pytest.raises(ConfigError, match=r"model.vocab_size is 32000 but the tokenizer has 4000"):
    with_vocab_size(c, 4000)


def test_a_config_saved_before_the_compute_section_migrates_on_read():
  saved = json.loads(base_config().to_json())
  saved.pop("compute")
  saved["model"].update(attention="flash", remat_policy="dots", scan_layers=False, vocab_size=512)
  saved["model"].pop("vocab_multiple")  # a field added later takes its default
  c = from_saved(saved)
  validate(c)
  assert (c.compute.attention, c.compute.remat_policy, c.compute.scan_layers) == ("flash", "dots", False)
  assert "attention" not in c.model and c.model.vocab_size == 512 and c.model.vocab_multiple == 1
  saved["model"]["colour"] = "red"
  with pytest.raises(ConfigError, match="unknown config field 'model.colour'"):
    from_saved(saved)
