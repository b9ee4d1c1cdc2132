"""`python -m jaxlm.convert`: a jaxlm run to a Hugging Face directory and back, with the same numbers."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.interop import run_dirs
from jaxlm.config import base_config
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.interop import hf
from jaxlm.models import build_model
from jaxlm.runs import load_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_RUN = os.path.join(ROOT, "tests", "fixtures", "run_before_compute_split")  # vocab 384
CHATML = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "chatml")  # a tokenizer.json of 365 ids


def cli(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def logits(model, ids):
  return np.asarray(jax.jit(lambda m, x: m(x))(model, ids))


def test_a_run_exported_to_hugging_face_computes_the_same_logits(tmp_path):
  out = cli("jaxlm.convert", f"--workdir={OLD_RUN}", f"--to_hf={tmp_path / 'hf'}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "hf")) == [
      "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
      "tokenizer.model", "tokenizer_config.json"]
  ids = np.random.default_rng(0).integers(0, 384, (2, 32)).astype(np.int32)
  exported, _ = hf.load_model(str(tmp_path / "hf"))
  np.testing.assert_allclose(logits(exported, ids), logits(load_params(OLD_RUN).model(), ids),
                             atol=1e-5)


def test_a_hugging_face_model_becomes_a_run_that_samples(tmp_path):
  c = base_config()
  c.model.update(vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 max_seq_len=128, init_std=0.1)
  source = build_model(c, seed=3)
  hf.save_model(source, str(tmp_path / "hf"))
  shutil.copyfile(os.path.join(OLD_RUN, "tokenizer.model"), tmp_path / "hf" / "tokenizer.model")

  out = cli("jaxlm.convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
  assert out.returncode == 0, out.stderr[-2000:]
  run = load_params(str(tmp_path / "run"))
  assert run.step == 0
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(run.params)),
                  jax.tree.leaves(nnx.to_pure_dict(nnx.state(source, nnx.Param)))):
    np.testing.assert_array_equal(a, b)
  out = cli("jaxlm.generate", f"--workdir={tmp_path / 'run'}", "--max_new_tokens=4", "--prompt=ROMEO:")
  assert out.returncode == 0 and out.stdout.startswith("ROMEO:"), out.stderr[-2000:]


@pytest.mark.fast
def test_bad_invocations_name_the_fix(tmp_path):
  out = cli("jaxlm.convert", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "exactly one of --from_hf=DIR or --to_hf=DIR" in out.stderr
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "llama3"), tmp_path / "hf")
  out = cli("jaxlm.convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
  assert out.returncode == 1 and "no tokenizer.json or tokenizer.model in" in out.stderr


def test_a_hugging_face_model_with_a_tokenizer_json_goes_both_ways(tmp_path):
  """Qwen-style: tokenizer.json only, and more embedding rows (384) than tokenizer ids (365)."""
  c = base_config()
  c.model.update(vocab_size=384, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64,
                 max_seq_len=64, init_std=0.1)
  hf.save_model(build_model(c, seed=4), str(tmp_path / "hf"),
                tokenizer=load_tokenizer(CHATML))
  run_dirs.from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))  # in this process: the CLI is tested above
  run = load_params(str(tmp_path / "run"))
  assert run.config.model.vocab_size == 384 and run.tokenizer.vocab_size == 365
  assert run.tokenizer.chat_template is not None
  run_dirs.to_hf(str(tmp_path / "run"), str(tmp_path / "back"), None)
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    with open(os.path.join(CHATML, name), "rb") as a, open(tmp_path / "back" / name, "rb") as b:
      assert a.read() == b.read(), name
