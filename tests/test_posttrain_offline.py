"""DPO, IPO, KTO and reward models through jaxlm's own trainer (`jaxlm.train.loop.train` with
posttrain.objective): their batches row by row, DPO's ln 2 at step 0 with either kind of reference,
the reward model's score of the whole sequence, a fresh score head on a pretrained model, and the
config errors."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, base_config, validate
from jaxlm.data import load_tokenizer
from jaxlm.posttrain import addition, record_data
from jaxlm.posttrain.byte_tokenizer import VOCAB_SIZE, write_byte_tokenizer
from jaxlm.posttrain.objectives import sequence_scores
from jaxlm.train.loop import train


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return write_byte_tokenizer(str(tmp_path_factory.mktemp("byte_tokenizer")))


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def config(tok_dir, objective, train_path, eval_path="", workdir="", steps=3, **posttrain):
  c = base_config()
  c.tokenizer.path = tok_dir
  c.posttrain.objective = objective
  c.posttrain.update(**posttrain)
  c.data.update(train_paths=train_path, eval_paths=eval_path, seq_len=16)
  c.model.update(vocab_size=VOCAB_SIZE, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, max_seq_len=16)
  c.compute.scan_layers = False
  c.train.update(batch_size=4, steps=steps, warmup_steps=0, learning_rate=1e-2, weight_decay=0.0,
                 log_every=1, progress_bar=False, workdir=workdir)
  c.checkpoint.async_save = False
  return c


def train_lines(workdir):
  """The logged training metrics of every step, without their "train/" prefix."""
  with open(f"{workdir}/metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  return [{k[len("train/"):]: v for k, v in m.items() if k.startswith("train/")}
          for m in lines if "train/loss" in m]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("records")
  return {
      "preference": write_jsonl(d / "pref.jsonl", addition.preference_records(12, digits=2)),
      "preference_eval": write_jsonl(d / "pref_eval.jsonl",
                                     addition.preference_records(8, digits=2, split="eval")),
      "kto": write_jsonl(d / "kto.jsonl", addition.kto_records(12, digits=2)),
  }


@pytest.mark.fast
def test_pair_rows_hold_prompt_and_completion_with_weights_on_the_completion(tok_dir, files):
  tok = load_tokenizer(tok_dir)
  c = config(tok_dir, "dpo", files["preference"])
  records = addition.preference_records(12, digits=2)
  examples, stats = record_data.read_split(c, tok, "train")
  assert stats.examples == 12 and stats.truncated == 0
  rows = next(record_data.train_iterator(c, examples, 0, 1))  # train.batch_size = 4 examples
  assert rows["inputs"].shape == (8, 16)
  known = {(r["prompt"], r["chosen"], r["rejected"]) for r in records}
  for i in range(4):  # rows 2i / 2i + 1: one example's chosen / rejected (in shuffled order)
    texts = []
    for row in (2 * i, 2 * i + 1):
      n = int(rows["segment_ids"][row].sum())
      ids = [*rows["inputs"][row, :n], rows["targets"][row, n - 1]]
      trained = rows["targets"][row][rows["weights"][row] > 0]
      assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id == trained[-1]
      texts.append((tok.decode(ids[1:len(ids) - len(trained)]), tok.decode(list(trained[:-1]))))
    (prompt, chosen), (same_prompt, rejected) = texts
    assert prompt == same_prompt and (prompt, chosen, rejected) in known
  first = examples[0]  # by record: the completion's tokens exactly
  r = records[0]
  for side, row in (("chosen", 0), ("rejected", 1)):
    trained = first["targets"][row][first["weights"][row] > 0]
    assert list(trained) == tok.encode(r[side]) + [tok.eos_id]
    n = int(first["segment_ids"][row].sum())
    assert tok.decode(list(first["inputs"][row, 1:n]) + [int(first["targets"][row, n - 1])]).startswith(
        r["prompt"] + r[side])


@pytest.mark.fast
def test_kto_rows_pair_each_example_with_the_next_completion(tok_dir, files):
  tok = load_tokenizer(tok_dir)
  c = config(tok_dir, "kto", files["kto"])
  records = addition.kto_records(12, digits=2)
  examples, _ = record_data.read_split(c, tok, "train")
  for i in (0, 5, 11):
    e = examples[i]
    assert (e["desirable"] == int(records[i]["label"])).all()
    real = e["targets"][0][e["weights"][0] > 0]
    mismatched = e["targets"][1][e["weights"][1] > 0]
    assert list(real) == tok.encode(records[i]["completion"]) + [tok.eos_id]
    assert list(mismatched) == tok.encode(records[(i + 1) % 12]["completion"]) + [tok.eos_id]


@pytest.mark.fast
def test_an_example_whose_completion_is_cut_away_names_the_record(tok_dir, tmp_path):
  path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "9" * 40, "chosen": "1\n", "rejected": "2\n"}])
  c = config(tok_dir, "dpo", path)
  with pytest.raises(ConfigError, match=r"long.jsonl:1 .*raise data.seq_len"):
    record_data.read_split(c, load_tokenizer(tok_dir), "train")
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "completion": "2\n", "label": True}])
  with pytest.raises(ConfigError, match=r"bad.jsonl:1 \(from data.train_paths\) lacks \['chosen', 'rejected'\]"):
    record_data.read_split(config(tok_dir, "dpo", bad), load_tokenizer(tok_dir), "train")


@pytest.mark.fast
def test_posttrain_config_errors(tok_dir, files):
  c = config(tok_dir, "dpo", files["preference"])
  c.lora.rank = 4
  with pytest.raises(ConfigError, match="lora.rank=0"):
    validate(c)
  c = config(tok_dir, "reward", files["preference"], reference="precomputed")
  with pytest.raises(ConfigError, match="posttrain.reference='model'"):
    validate(c)
  c = config(tok_dir, "kto", "")
  with pytest.raises(ConfigError, match="data.train_paths is empty"):
    validate(c)
  c = config(tok_dir, "grpo", files["preference"], group_size=3)
  with pytest.raises(ConfigError, match="multiple of posttrain.group_size"):
    validate(c)


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_dpo_starts_at_ln2_and_learns_the_preference(tok_dir, files, tmp_path, reference, module_compile_cache):
  c = config(tok_dir, "dpo", files["preference"], files["preference_eval"], str(tmp_path / reference),
             steps=12, reference=reference)
  result = train(c)
  lines = train_lines(c.train.workdir)
  assert abs(lines[0]["loss"] - math.log(2)) < 1e-5  # step 1's loss: policy = reference
  assert lines[-1]["loss"] < lines[0]["loss"] - 0.05
  assert result["metrics"]["eval_rewards/accuracies"] >= 0.5
  assert result["frozen"] is None  # the reference is not part of the model


def test_model_and_precomputed_references_train_alike(tok_dir, files, tmp_path, module_compile_cache):
  losses = {}
  for reference in ("model", "precomputed"):
    c = config(tok_dir, "ipo", files["preference"], workdir=str(tmp_path / reference), steps=4,
               reference=reference)
    train(c)
    losses[reference] = [m["loss"] for m in train_lines(c.train.workdir)]
  np.testing.assert_allclose(losses["model"], losses["precomputed"], rtol=1e-5)


def test_kto_trains_and_logs_its_kl(tok_dir, files, tmp_path, module_compile_cache):
  c = config(tok_dir, "kto", files["kto"], workdir=str(tmp_path / "kto"), steps=3)
  train(c)
  lines = train_lines(c.train.workdir)
  assert abs(lines[0]["loss"] - 0.5) < 1e-5  # policy = reference: 1 - sigmoid(0) for every example
  assert lines[0]["kl"] == 0.0 and {"rewards/desirable", "examples"} <= set(lines[0])


def test_reward_model_from_a_language_model_scores_whole_sequences(tok_dir, files, tmp_path, module_compile_cache):
  lm = config(tok_dir, "dpo", files["preference"], workdir=str(tmp_path / "lm"), steps=2)
  lm.train.batch_size = 8  # rows, one an example
  lm.posttrain.objective = "lm"
  lm.data.update(source="jsonl", train_paths=files["preference"], jsonl_field="prompt")
  base = train(lm)
  c = config(tok_dir, "reward", files["preference"], files["preference_eval"],
             str(tmp_path / "rm"), steps=8)
  c.checkpoint.init_from = lm.train.workdir
  result = train(c)
  params = nnx.to_pure_dict(result["state"].params)
  assert params["score"].shape == (32, 1)
  base_params = nnx.to_pure_dict(base["state"].params)
  lines = train_lines(c.train.workdir)
  assert lines[-1]["loss"] < lines[0]["loss"]
  assert 0.0 <= result["metrics"]["eval_accuracy"] <= 1.0
  # started from the language model: step 1's gradient was taken at its weights (the embeddings
  # moved by one Adam step of at most the learning rate per entry from them)
  assert np.max(np.abs(np.asarray(params["embed"]) - np.asarray(base_params["embed"]))) <= 8 * 1e-2 + 1e-6

  # the score of a padded row is the score at its final token with the whole sequence fed
  graphdef = result["graphdef"]
  tok = load_tokenizer(tok_dir)
  examples, _ = record_data.read_split(c, tok, "train")
  e = examples[0]
  batch = {k: jax.numpy.asarray(v) for k, v in e.items()}
  got = np.asarray(sequence_scores(graphdef, result["state"].params, batch))
  model = nnx.merge(graphdef, result["state"].params)
  for row in range(2):
    n = int(e["segment_ids"][row].sum())
    ids = np.asarray([*e["inputs"][row, :n], e["targets"][row, n - 1]])[None]
    _, scores = model.logits_and_scores(jax.numpy.asarray(ids))
    np.testing.assert_allclose(got[row], np.asarray(scores)[0, -1, 0], rtol=1e-5, atol=1e-6)
