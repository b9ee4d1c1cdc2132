"""`python -m jaxlm.generate --prompts_file`: batches of prompts of any lengths to JSONL, with
several samples a prompt, speculative decoding and sharded parameters giving the same greedy
text; bad requests fail with one line naming the fix. Runs on the committed tiny run directory
(tests/fixtures/run_before_compute_split, see tests/test_load_params.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "run_before_compute_split")
PROMPTS = ["ROMEO:", "JULIET:\\nO Romeo, Romeo", "A"]


def generate_cli(*flags):
  return subprocess.run([sys.executable, "-m", "jaxlm.generate", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("gen")
  run = shutil.copytree(FIXTURE, d / "run")
  (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
  (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p.replace("\\n", "\n")}) + "\n"
                                           for p in PROMPTS))
  return d, run


def read_lines(path):
  return [json.loads(line) for line in open(path)]


def test_prompts_file_gives_one_line_per_completion_and_draft_and_sharding_change_nothing(files):
  d, run = files
  common = [f"--workdir={run}", "--temperature=0", "--max_new_tokens=6", "--num_samples=2",
            "--batch_size=4"]
  plain = generate_cli(*common, f"--prompts_file={d / 'prompts.txt'}", f"--output={d / 'a.jsonl'}")
  assert plain.returncode == 0, plain.stderr[-2000:]
  lines = read_lines(d / "a.jsonl")
  assert [(r["index"], r["sample"]) for r in lines] == [(i, j) for i in range(3) for j in range(2)]
  assert lines[2]["prompt"] == "JULIET:\nO Romeo, Romeo"
  for r in lines:
    assert r["finish"] in ("eos", "length") and 1 <= r["tokens"] <= 6 and r["logprob"] < 0
  fast = generate_cli(*common, f"--prompts_file={d / 'prompts.jsonl'}", f"--output={d / 'b.jsonl'}",
                      f"--draft_workdir={run}", "--draft_k=3", "--sharded")
  assert fast.returncode == 0, fast.stderr[-2000:]
  assert "draft acceptance 1.00" in fast.stderr
  other = read_lines(d / "b.jsonl")
  assert [r["completion"] for r in other] == [r["completion"] for r in lines]
  for a, b in zip(lines, other):
    assert abs(a["logprob"] - b["logprob"]) < 1e-4


def test_bad_requests_fail_with_one_line_naming_the_fix(files, tmp_path):
  d, run = files
  (tmp_path / "empty.txt").write_text("\n\n")
  out = generate_cli(f"--workdir={run}", f"--prompts_file={tmp_path / 'empty.txt'}")
  assert out.returncode != 0 and "holds no prompts" in out.stderr.strip().splitlines()[-1]
  (tmp_path / "long.txt").write_text("word " * 80 + "\n")
  out = generate_cli(f"--workdir={run}", f"--prompts_file={tmp_path / 'long.txt'}")
  assert out.returncode != 0 and "exceeds model.max_seq_len (32)" in out.stderr, out.stderr[-1500:]
  (tmp_path / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
  out = generate_cli(f"--workdir={run}", f"--prompts_file={tmp_path / 'bad.jsonl'}")
  assert out.returncode != 0 and 'bad.jsonl:1 is not a JSON object with a "prompt"' in out.stderr


def test_a_draft_with_another_vocabulary_is_refused(monkeypatch, capsys):
  """In-process, with load_params returning a tiny model (target) or one of another vocabulary."""
  from absl import app, flags
  from absl.testing import flagsaver
  from flax import nnx

  import jaxlm.generate as cli
  from jaxlm import runs
  from jaxlm.config import base_config
  from jaxlm.models import build_model

  def fake_run(workdir, step=None, mesh=None):
    c = base_config()
    c.model.update(vocab_size=64 if workdir == "target" else 80, d_model=32, num_layers=1, mlp_dim=64)
    tok = type("Tok", (), dict(bos_id=1, eos_id=2, encode=lambda self, t: [3, 4],
                               decode=lambda self, ids: "x" * len(ids)))()
    return runs.LoadedParams(*nnx.split(build_model(c)), c, tok, 0)

  monkeypatch.setattr(runs, "load_params", fake_run)
  with flagsaver.flagsaver(), pytest.raises(app.UsageError, match="draft's vocabulary .80 ids. differs"):
    flags.FLAGS(["generate", "--workdir=target", "--draft_workdir=draft", "--temperature=0"])
    cli.main(["generate"])
