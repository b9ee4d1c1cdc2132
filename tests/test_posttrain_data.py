"""Post-training data: assistant-token masks from chat templates, SFT rows that train exactly like
one example a row, preference/KTO/RL batches, and the addition task (split, near misses, grading)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm.config import ConfigError, base_config, validate
from jaxlm.data import load_tokenizer
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.models import build_model
from jaxlm.posttrain import addition, chat, datasets, sft
from jaxlm.posttrain.byte_tokenizer import VOCAB_SIZE, write_byte_tokenizer
from jaxlm.train.step import init_state, loss_sums, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
# A SentencePiece model trained by jaxlm (no dummy prefix), which has no chat template.
SENTENCEPIECE = os.path.join(ROOT, "tests", "fixtures", "run_before_compute_split", "tokenizer.model")

TURNS = (("What is 2+2?", "4."), ("And 3+3?", "It is 6."), ("Thanks!", "You are welcome."))
CONVERSATION = [m for q, a in TURNS for m in ({"role": "user", "content": q},
                                              {"role": "assistant", "content": a})]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
  return load_tokenizer(write_byte_tokenizer(str(tmp_path_factory.mktemp("byte_tokenizer"))))


def masked_runs(encoded):
  """The ids of each maximal run of trained tokens."""
  runs, current = [], []
  for token, m in zip(encoded.ids.tolist(), encoded.mask.tolist()):
    if m:
      current.append(token)
    elif current:
      runs.append(current)
      current = []
  return runs + ([current] if current else [])


# --- masks from chat templates ------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("name,close", [("llama3", ["<|eot_id|>"]), ("chatml", ["<|im_end|>", "\n"])])
def test_mask_is_exactly_the_assistant_tokens_of_a_template(name, close):
  tok = load_tokenizer(os.path.join(FIXTURES, name))
  encoded = chat.encode_chat(tok, CONVERSATION)
  assert encoded.ids.tolist() == tok.apply_chat_template(CONVERSATION)  # the template's own ids
  # Each assistant turn: its content and what the template closes it with, nothing else.
  expected = [tok.encode(answer) + [i for piece in close for i in tok.encode(piece)] for _, answer in TURNS]
  assert masked_runs(encoded) == expected
  assert not encoded.truncated


@pytest.mark.fast
@pytest.mark.parametrize("path", [SENTENCEPIECE, os.path.join(FIXTURES, "llama3")])
def test_offsets_are_character_spans(path):
  tok = load_tokenizer(path)
  text = "héllo wörld\n12 ✓ naïve"
  ids, offsets = tok.encode_with_offsets(text)
  assert ids == tok.encode(text)
  # spans start where the previous one ended (the byte tokens of one character share its span)
  assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
  assert all(b[0] in (a[0], a[1]) for a, b in zip(offsets, offsets[1:]))
  assert "".join(text[s:e] for (s, e), nxt in zip(offsets, [*offsets[1:], (None, None)])
                 if (s, e) != nxt) == text


@pytest.mark.fast
def test_default_template_with_sentencepiece():
  tok = Tokenizer(SENTENCEPIECE)
  encoded = chat.encode_chat(tok, CONVERSATION)
  assert encoded.ids[0] == tok.bos_id
  assert masked_runs(encoded) == [tok.encode(answer) + [tok.eos_id] for _, answer in TURNS]
  text = "".join(f"<|user|>\n{q}\n<|assistant|>\n{a}" + "</s>\n" for q, a in TURNS)[:-1]
  assert tok.decode(encoded.ids) == text.replace("</s>", "")  # control ids decode to nothing
  # The generation prompt continues the conversation the way training rendered it.
  prompt = chat.prompt_ids(tok, CONVERSATION[:3])
  assert encoded.ids[:len(prompt)].tolist() == prompt


@pytest.mark.fast
def test_default_template_with_the_byte_tokenizer(byte_tok):
  encoded = chat.encode_chat(byte_tok, CONVERSATION)
  assert masked_runs(encoded) == [byte_tok.encode(a) + [byte_tok.eos_id] for _, a in TURNS]
  assert byte_tok.decode(encoded.ids, skip_special_tokens=False).startswith("<s><|user|>\nWhat is 2+2?\n")


@pytest.mark.fast
def test_prompt_completion_pairs(byte_tok):
  plain = chat.encode_example(byte_tok, {"prompt": "12+30=", "completion": "42\n"})
  assert plain.ids.tolist() == [byte_tok.bos_id, *byte_tok.encode("12+30=42\n"), byte_tok.eos_id]
  assert masked_runs(plain) == [byte_tok.encode("42\n") + [byte_tok.eos_id]]
  # A chat pair trains only the completion: the assistant turn inside the prompt is context.
  pair = {"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:4]}
  encoded = chat.encode_example(byte_tok, pair)
  assert masked_runs(encoded) == [byte_tok.encode("It is 6.") + [byte_tok.eos_id]]
  assert encoded.ids.tolist() == chat.encode_chat(byte_tok, CONVERSATION[:4]).ids.tolist()


@pytest.mark.fast
def test_truncation_keeps_the_start_and_is_flagged(byte_tok):
  full = chat.encode_chat(byte_tok, CONVERSATION)
  cut = chat.encode_chat(byte_tok, CONVERSATION, max_len=20)
  assert cut.truncated and cut.ids.tolist() == full.ids[:20].tolist()
  assert cut.mask.tolist() == full.mask[:20].tolist()
  records = [{"messages": CONVERSATION}, {"prompt": "x" * 40, "completion": "y"},
             {"prompt": "1+1=", "completion": "2\n"}]
  examples, stats = sft.encode_examples(byte_tok, records, seq_len=40)
  # the first is cut but keeps trained tokens; the second is cut to its prompt only: dropped
  assert (stats.examples, stats.truncated, stats.dropped) == (3, 2, 1) and len(examples) == 2
  assert stats.trained_tokens == sum(int(e.mask[1:].sum()) for e in examples)


@pytest.mark.fast
@pytest.mark.parametrize("messages,match", [
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}], "role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty assistant"),
    ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}], "starts with an assistant"),
    ([{"role": "user", "content": ["an", "image"]}, {"role": "assistant", "content": "ok"}], "must be a string"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([], "non-empty list"),
])
def test_malformed_conversations_are_refused(byte_tok, messages, match):
  with pytest.raises(chat.ChatError, match=match):
    chat.encode_chat(byte_tok, messages)


@pytest.mark.fast
def test_malformed_records_and_templates_are_refused(byte_tok, tmp_path):
  with pytest.raises(chat.ChatError, match="needs 'messages', or 'prompt' and 'completion'"):
    chat.encode_example(byte_tok, {"text": "hello"})
  with pytest.raises(chat.ChatError, match="both be strings"):
    chat.encode_example(byte_tok, {"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]})
  with pytest.raises(chat.ChatError, match="completion is empty"):
    chat.encode_example(byte_tok, {"prompt": "hi", "completion": ""})
  # A template that writes the newest message first cannot be read as a growing text.
  reverse = tmp_path / "reverse.jinja"
  reverse.write_text("{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
  with pytest.raises(chat.ChatError, match="continuation of its beginning"):
    chat.encode_chat(byte_tok, CONVERSATION, chat_template=str(reverse))
  with pytest.raises(chat.ChatError, match="Unknown role"):  # the Llama 3 template's own check
    chat.encode_chat(load_tokenizer(os.path.join(FIXTURES, "llama3")),
                     [*CONVERSATION[:2], {"role": "tool", "content": "{}"}, CONVERSATION[3]])


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def chat_config(tokenizer_dir, train, eval_paths="", seq_len=32, **train_fields):
  c = base_config()
  c.data.update(source="chat", train_paths=train, eval_paths=eval_paths, seq_len=seq_len)
  c.tokenizer.path = tokenizer_dir
  c.model.update(vocab_size=VOCAB_SIZE, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, max_seq_len=seq_len)
  c.train.update(batch_size=8, **train_fields)
  return validate(c)


@pytest.mark.fast
def test_chat_source_config_and_file_errors(byte_tok, tmp_path):
  good = write_jsonl(tmp_path / "good.jsonl", [{"messages": CONVERSATION[:2]}])
  c = chat_config(byte_tok.directory, good)
  c.tokenizer.path = ""
  with pytest.raises(ConfigError, match="tokenizer.path is empty"):
    validate(c)
  c = chat_config(byte_tok.directory, good)
  c.data.chat_template = "chatml"
  with pytest.raises(ConfigError, match="data.chat_template"):
    validate(c)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"messages": CONVERSATION[:2]}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  with pytest.raises(ConfigError, match=r"bad.jsonl:3 \(from data.train_paths\): .*no assistant"):
    sft.make_sft_iterator(chat_config(byte_tok.directory, str(bad)), byte_tok)


# --- SFT rows through the real train step ---------------------------------------------------------


def varied_examples(tok, n=12):
  """Conversations of different lengths (2 to 6 messages), as Encoded."""
  out = []
  for i in range(n):
    turns = [("%d+%d=" % (i, 7 * i), str(8 * i)), ("twice?", str(16 * i)), ("and minus one?", str(16 * i - 1))]
    messages = [m for q, a in turns[:1 + i % 3] for m in ({"role": "user", "content": q},
                                                         {"role": "assistant", "content": a})]
    out.append(chat.encode_chat(tok, messages))
  return out


def tiny_model(seq_len=64):
  c = base_config()
  c.model.update(vocab_size=VOCAB_SIZE, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, max_seq_len=seq_len)
  return nnx.split(build_model(c), nnx.Param)


def loss_and_grads(graphdef, params, batch):
  def objective(p):
    nll, _, count = loss_sums(graphdef, p, jax.tree.map(jnp.asarray, batch), 0.0)
    return nll, count
  (nll, count), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  return float(nll), float(count), grads


def max_relative_difference(a_tree, b_tree):
  worst = 0.0
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)))
  return worst


def test_packed_rows_give_the_loss_and_gradients_of_one_example_a_row(byte_tok):
  seq_len = 128
  examples = varied_examples(byte_tok)
  rows = list(sft.packed_rows(examples, seq_len, bins=4))
  packed = {k: np.stack([r[k] for r in rows]) for k in sft.FEATURES}
  unpacked = sft.unpacked_batch(examples, seq_len)
  assert len(rows) < len(examples)  # several examples share rows
  assert packed["segment_ids"].max() > 1
  # The packed rows hold every example's pairs once: same trained targets.
  assert packed["weights"].sum() == unpacked["weights"].sum() == sum(e.trained_tokens for e in examples)
  graphdef, params = tiny_model(seq_len)
  nll_p, count_p, grads_p = loss_and_grads(graphdef, params, packed)
  nll_u, count_u, grads_u = loss_and_grads(graphdef, params, unpacked)
  assert count_p == count_u
  assert abs(nll_p - nll_u) <= 1e-6 * abs(nll_u)
  assert max_relative_difference(grads_p, grads_u) <= 1e-6


def keep_gradients():
  """An optimizer that applies nothing and keeps the step's gradient as its state: what any
  optimizer is given, compared without the rounding of params + update."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_grad_accumulation_gives_the_same_update_on_sft_rows(byte_tok, tmp_path):
  records = [{"messages": m} for m in
             [[{"role": "user", "content": f"{i}+{i}="}, {"role": "assistant", "content": str(2 * i)}]
              for i in range(40)]]
  train = write_jsonl(tmp_path / "train.jsonl", records)
  results = []
  for accum in (1, 4):
    c = chat_config(byte_tok.directory, train, seq_len=64, grad_accum_steps=accum)
    it, stats = sft.make_sft_iterator(c, byte_tok)
    assert stats.examples == 40 and stats.truncated == 0
    batch = next(it)
    assert len(set(batch["weights"].reshape(4, -1).sum(1).tolist())) > 1  # uneven micro-batches
    graphdef, params = tiny_model(c.data.seq_len)
    tx = keep_gradients()
    new, metrics = jax.jit(make_train_step(graphdef, tx, c.train))(init_state(params, tx, 0), batch)
    results.append((new.opt_state, float(metrics["loss"])))
  (one, loss_one), (four, loss_four) = results
  assert abs(loss_one - loss_four) <= 1e-6 * loss_one
  assert max_relative_difference(four, one) <= 1e-6


@pytest.mark.fast
def test_sft_batches_weight_only_trained_targets_and_resume(byte_tok, tmp_path):
  records = [{"prompt": f"{i}+{i + 1}=", "completion": f"{2 * i + 1}\n"} for i in range(50)]
  train = write_jsonl(tmp_path / "train.jsonl", records)
  held = write_jsonl(tmp_path / "eval.jsonl", records[:5])
  c = chat_config(byte_tok.directory, train, held)
  it, _ = sft.make_sft_iterator(c, byte_tok)
  batch = next(it)
  assert sorted(batch) == sorted(sft.FEATURES)
  assert all(v.shape == (8, 32) and v.dtype == np.int32 for v in batch.values())
  # weights mark the answer digits, the newline and eos, never the prompt or padding
  newline, eos = byte_tok.encode("\n")[0], byte_tok.eos_id
  trained = batch["targets"][batch["weights"] == 1]
  assert set(trained.tolist()) <= set(byte_tok.encode("0123456789")) | {newline, eos}
  assert (batch["weights"] <= (batch["segment_ids"] > 0)).all()
  for row in range(8):  # positions restart at 0 in every example of a row
    seg, pos = batch["segment_ids"][row], batch["positions"][row]
    for s in set(seg.tolist()) - {0}:
      assert pos[seg == s].tolist() == list(range((seg == s).sum()))
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  again, _ = sft.make_sft_iterator(c, byte_tok)
  again.set_state(state)
  for want in expected:
    got = next(again)
    assert all(np.array_equal(got[k], want[k]) for k in sft.FEATURES)
  batches, stats = sft.sft_eval_batches(c, byte_tok)
  batches = list(batches)
  assert stats.examples == 5 and len(batches) == 1
  assert batches[0]["weights"].sum() == stats.trained_tokens


@pytest.mark.fast
def test_sft_global_batches_are_the_same_for_any_process_count(byte_tok, tmp_path):
  records = [{"prompt": f"{i}*{i}=", "completion": f"{i * i}"} for i in range(40)]
  c = chat_config(byte_tok.directory, write_jsonl(tmp_path / "train.jsonl", records))
  one, stats = sft.make_sft_iterator(c, byte_tok)
  want = [next(one) for _ in range(6)]
  for count in (2, 4):
    its = [sft.make_sft_iterator(c, byte_tok, p, count) for p in range(count)]
    assert all(it[1] == stats for it in its)  # every process: the whole split's stats
    for batch in want:
      parts = [next(it) for it, _ in its]
      assert all(np.array_equal(batch[k], np.concatenate([p[k] for p in parts])) for k in sft.FEATURES)
  # A position written on 4 processes continues on 1.
  state = json.loads(json.dumps(its[0][0].get_state()))
  assert (state["stream"], state["process_count"], state["batches"]) == ("global", 4, 6)
  again, _ = sft.make_sft_iterator(c, byte_tok)
  again.set_state(state)
  for batch in [next(one) for _ in range(2)]:
    got = next(again)
    assert all(np.array_equal(batch[k], got[k]) for k in sft.FEATURES)


@pytest.mark.fast
def test_chat_bad_lines_follow_on_bad_record(byte_tok, tmp_path):
  good = [json.dumps({"messages": CONVERSATION[:2]}).encode(), json.dumps({"prompt": "1+1=", "completion": "2"}).encode()]
  bad = {"invalid_utf8": b'{"prompt": "caf\xe9", "completion": "x"}', "invalid_json": b'{"prompt": ',
         "not_an_object": b'[1, 2]', "invalid_example": json.dumps({"messages": CONVERSATION[:1]}).encode()}
  path = tmp_path / "chat.jsonl"
  path.write_bytes(b"\n".join([good[0], *bad.values(), good[1]]) + b"\n")
  c = chat_config(byte_tok.directory, str(path))
  with pytest.raises(ConfigError, match=r"chat\.jsonl:2 \(from data\.train_paths\): is not valid UTF-8"):
    sft.make_sft_iterator(c, byte_tok)
  c.data.on_bad_record = "skip"
  it, stats = sft.make_sft_iterator(c, byte_tok)
  assert stats.examples == 3  # two good lines and the example encode_example rejects
  assert it.stats == {"skipped_records": 4, **{f"skipped_{k}": 1 for k in bad}}
  from jaxlm.train.loop import train_batches  # what the loop logs once, as data/* metrics
  logged = train_batches(c, byte_tok)[1]
  assert logged["examples"] == 3.0 and logged["skipped_records"] == 4.0
  for i, line in enumerate(bad.values()):  # each kind alone, as an error: its line
    path.write_bytes(b"\n".join([good[0], line, good[1]]) + b"\n")
    c.data.on_bad_record = "error"
    with pytest.raises(ConfigError, match=r"chat\.jsonl:2 \(from data\.train_paths\)"):
      sft.make_sft_iterator(c, byte_tok)
    c.data.on_bad_record = "skip"
    assert sft.make_sft_iterator(c, byte_tok)[0].stats["skipped_records"] == 1


# --- preference, KTO and RL batches ----------------------------------------------------------------


@pytest.mark.fast
def test_preference_kto_and_rl_batches(byte_tok, tmp_path):
  prefs = addition.preference_records(6, digits=2)
  batch = datasets.preference_batch(byte_tok, prefs, seq_len=16)
  for side in ("chosen", "rejected"):
    rows = batch[side]
    assert rows["inputs"].shape == (6, 16)
    for i, record in enumerate(prefs):
      want = byte_tok.encode(record[side]) + [byte_tok.eos_id]
      assert rows["targets"][i][rows["weights"][i] == 1].tolist() == want
      prompt = [byte_tok.bos_id, *byte_tok.encode(record["prompt"])]
      assert rows["inputs"][i, :len(prompt)].tolist() == prompt
  assert not batch["truncated"].any()
  kto = datasets.kto_batch(byte_tok, addition.kto_records(4, digits=2), seq_len=16)
  assert kto["labels"].tolist() == [True, False, True, False]
  rl = datasets.rl_prompts(byte_tok, addition.rl_records(3, digits=2))
  assert rl.prompt_ids[0] == [byte_tok.bos_id, *byte_tok.encode(addition.rl_records(3, digits=2)[0]["prompt"])]
  path = write_jsonl(tmp_path / "prefs.jsonl", [prefs[0], {"prompt": "1+1=", "chosen": "2\n"}])
  with pytest.raises(chat.ChatError, match=r"prefs.jsonl:2 lacks \['rejected'\]"):
    datasets.read_records(path, "preference")
  with pytest.raises(chat.ChatError, match="label must be true or false"):
    datasets.check_records([{"prompt": "a", "completion": "b", "label": "yes"}], "kto")


# --- the addition task ------------------------------------------------------------------------------


@pytest.mark.fast
def test_byte_tokenizer_gives_one_token_per_digit(byte_tok):
  assert byte_tok.vocab_size == VOCAB_SIZE
  ids = byte_tok.encode("123+456=579\n")
  assert len(ids) == 12 and byte_tok.decode(ids) == "123+456=579\n"
  assert (byte_tok.bos_id, byte_tok.eos_id, byte_tok.pad_id) == (1, 2, 0)


@pytest.mark.fast
def test_addition_split_never_overlaps():
  # every 2-digit problem is on exactly one side, with its mirror image, about 10% held out
  sides = {(a, b): addition.split_of(a, b) for a in range(100) for b in range(100)}
  assert all(sides[a, b] == sides[b, a] for a, b in sides)
  held_out = sum(s == "eval" for s in sides.values()) / len(sides)
  assert 0.08 < held_out < 0.12
  train = addition.problems(5000, "train", seed=1, digits=3)
  held = addition.problems(500, "eval", seed=1, digits=3)
  assert not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in held}
  assert all(addition.split_of(p.a, p.b) == "train" for p in train)
  assert len(set(held)) == 500
  assert addition.problems(50, "eval", seed=1) == held[:50]  # deterministic from the seed
  lines = [line for doc in addition.pretrain_documents(200, seed=3) for line in doc.splitlines()]
  assert len(lines) == 1600
  for line in lines:
    a, rest = line.split("+")
    b, total = rest.split("=")
    assert int(a) + int(b) == int(total) and addition.split_of(int(a), int(b)) == "train"


@pytest.mark.fast
def test_near_misses_are_wrong_answers():
  rng = np.random.default_rng(0)
  for p in addition.problems(2000, "train", seed=2, digits=3) + [addition.Problem(0, 0)]:
    wrong = addition.near_miss(p, rng)
    assert wrong != p.answer and int(wrong) >= 0 and str(int(wrong)) == wrong  # no leading zero
    off = abs(int(wrong) - int(p.answer))
    one_digit = len(wrong) == len(p.answer) and sum(x != y for x, y in zip(wrong, p.answer)) == 1
    assert one_digit or off <= 2 or off in (10, 100, 1000, 10000)
  for record in addition.preference_records(50):
    assert record["chosen"] != record["rejected"]
    assert addition.reward(record["chosen"], str(eval(record["prompt"][:-1]))) == 1.0
    assert addition.reward(record["rejected"], str(eval(record["prompt"][:-1]))) == 0.0


@pytest.mark.fast
def test_accuracy_grades_exact_answers():
  probs = addition.problems(4, "eval", digits=2)
  assert addition.accuracy([p.answer for p in probs], probs) == 1.0
  assert addition.accuracy([probs[0].answer, "0", probs[2].answer + " ", ""], probs) == 0.25
  assert addition.reward("579\n123", "579") == 1.0 and addition.reward(" 579", "579") == 0.0


def test_exact_match_on_a_model_taught_its_answers(byte_tok):
  """A tiny model fine-tuned (SFT rows, the real train step) on 8 held-out problems answers them,
  and exact_match grades its greedy completions."""
  probs = addition.problems(8, "eval", seed=5, digits=2)
  examples = [chat.encode_prompt_completion(byte_tok, p.prompt, p.completion) for p in probs]
  batch = sft.unpacked_batch(examples, 16)
  c = base_config()
  c.model.update(vocab_size=VOCAB_SIZE, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                 mlp_dim=128, max_seq_len=16)
  c.train.update(batch_size=8, steps=150, warmup_steps=10, learning_rate=1e-2, weight_decay=0.0)
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  from jaxlm.train.optimizer import make_optimizer
  tx = make_optimizer(c.train)
  state = init_state(params, tx, 0)
  step = jax.jit(make_train_step(graphdef, tx, c.train))
  assert addition.exact_match(graphdef, state.params, byte_tok, probs) == 0.0  # untrained
  for _ in range(c.train.steps):
    state, metrics = step(state, batch)
  assert float(metrics["loss"]) < 0.01
  answers = addition.answers(graphdef, state.params, byte_tok, probs)
  assert answers == [p.answer for p in probs]
  assert addition.exact_match(graphdef, state.params, byte_tok, probs) == 1.0


@pytest.mark.fast
def test_addition_pretrain_config_writes_its_data_and_validates(tmp_path, monkeypatch):
  import importlib.util
  from jaxlm.data import sources
  monkeypatch.chdir(tmp_path)  # the config writes its corpus under runs/ of the working directory
  spec = importlib.util.spec_from_file_location("addition_pretrain", os.path.join(ROOT, "configs", "addition_pretrain.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = validate(module.get_config())
  assert load_tokenizer(c.tokenizer.path).vocab_size == VOCAB_SIZE
  for split, side in (("train", "train"), ("eval", "eval")):
    docs = sources.documents(c.data, split)
    for doc in docs[:100]:
      for line in doc.splitlines():
        a, b = line.split("=")[0].split("+")
        assert addition.split_of(int(a), int(b)) == side
  manifest = os.path.join(os.path.dirname(c.data.train_paths), addition.MANIFEST)
  written = os.path.getmtime(manifest)
  module.get_config()  # the second load finds the same settings and writes nothing
  assert os.path.getmtime(manifest) == written
