"""Hugging Face tokenizers give transformers' ids, decoded text, special tokens and chat templates.

The references in tests/fixtures/tokenizers/refs.json were written by transformers
(tests/fixtures/make_tokenizer_refs.py) for three tiny tokenizers: Llama 3 style (byte-level BPE,
bos from the post-processor), ChatML / Qwen2 style (NFC, no bos, chat_template.jinja) and
SentencePiece / Llama 2 style (Metaspace, byte fallback). The tests at the end compare with
transformers itself where it is installed.
"""

import json
import os
import shutil
from datetime import datetime

import jinja2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, pre_tokenizers

from jaxlm.config import ConfigError, base_config, with_vocab_size
from jaxlm.data import chat_template
from jaxlm.data.hf_tokenizer import HFTokenizer, byte_level_alphabet
from jaxlm.data.pipeline import document_tokens
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer
from jaxlm.runs import read_tokenizer, write_run_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
NAMES = ("llama3", "chatml", "sentencepiece")
CHAT_NAMES = ("llama3", "chatml")
with open(os.path.join(FIXTURES, "refs.json"), encoding="utf-8") as _f:
  REFS = json.load(_f)
# Text without surrogates (not encodable) and without U+2581, SentencePiece's space marker.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=60)


def fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


_LOADED = {}


def tok(name: str) -> HFTokenizer:
  if name not in _LOADED:
    _LOADED[name] = HFTokenizer(fixture(name))
  return _LOADED[name]


def decoded_bytes_match(t: HFTokenizer, ids) -> bool:
  """sum(token_bytes) == the decoded text's UTF-8 bytes, counting the leading space a dummy-prefix
  decoder drops (measured by decoding after a token "a", which then takes the drop: nothing)."""
  expected = len(t.decode(ids).encode("utf-8"))
  if t.strips_leading_space:
    expected = len(t.decode([t.token_to_id("a"), *ids]).encode("utf-8")) - 1
  return int(t.token_bytes[ids].sum()) == expected


# --- against the committed references -------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_ids_and_special_tokens_match_transformers(name):
  t, ref = tok(name), REFS[name]
  assert t.vocab_size == ref["len"] == len(t.token_bytes)
  assert {"bos": t.bos_id, "eos": t.eos_id, "pad": t.pad_id, "unk": t.unk_id} == ref["special_ids"]
  for text, ids, with_special in zip(ref["texts"], ref["ids"], ref["ids_with_special_tokens"]):
    assert t.encode(text) == ids, text
    assert t.encode(text, add_special_tokens=True) == with_special, text
  assert t.encode_batch(ref["texts"]) == ref["ids"]
  assert t.encode_batch(ref["texts"], add_special_tokens=True) == ref["ids_with_special_tokens"]


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_transformers(name):
  t, ref = tok(name), REFS[name]
  for ids, text in zip(ref["ids"], ref["decoded"]):
    assert t.decode(ids) == text
    assert t.decode(np.asarray(ids, np.int32)) == text  # arrays as well as lists


@pytest.mark.fast
def test_bos_comes_from_the_post_processor():
  llama3, chatml = tok("llama3"), tok("chatml")
  assert llama3.encode("Hi", add_special_tokens=True) == [llama3.bos_id, *llama3.encode("Hi")]
  assert chatml.bos_id is None and chatml.encode("Hi", add_special_tokens=True) == chatml.encode("Hi")
  assert llama3.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_token_bytes_sum_to_the_decoded_bytes(name):
  t = tok(name)
  assert t.token_bytes.dtype == np.int32 and t.token_bytes.shape == (t.vocab_size,)
  for text in REFS[name]["texts"]:
    assert decoded_bytes_match(t, t.encode(text)), text
  special = [i for i in (t.bos_id, t.eos_id, t.pad_id, t.unk_id) if i is not None]
  assert not t.token_bytes[special].any()  # decode drops them


@pytest.mark.fast
@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_token_bytes_on_any_text(text):
  for name in NAMES:
    assert decoded_bytes_match(tok(name), tok(name).encode(text)), name


@pytest.mark.fast
def test_byte_level_alphabet_is_the_pre_tokenizers():
  alphabet = byte_level_alphabet()
  assert sorted(alphabet.values()) == list(range(256))
  assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  for text in ["Hello world\n\t", "naïve", "東京😀", "".join(map(chr, range(1, 0x800, 7)))]:
    (piece, _), = byte_level.pre_tokenize_str(text)
    assert bytes(alphabet[c] for c in piece) == text.encode("utf-8")
  assert decoders.ByteLevel().decode(["Ġa"]) == " a"


@pytest.mark.fast
def test_byte_fallback_pieces_count_one_byte():
  t = tok("sentencepiece")
  for i in range(t.vocab_size):
    piece = t.id_to_piece(i)
    if piece.startswith("<0x"):
      assert t.token_bytes[i] == 1, piece


@pytest.mark.fast
@pytest.mark.parametrize("name", CHAT_NAMES)
@pytest.mark.parametrize("index", range(3))
def test_chat_template_matches_transformers(name, index):
  chat = REFS[name]["chats"][index]
  kwargs = dict(add_generation_prompt=chat["add_generation_prompt"], tools=chat.get("tools"),
                **chat["kwargs"])
  assert tok(name).apply_chat_template(chat["messages"], tokenize=False, **kwargs) == chat["text"]
  assert tok(name).apply_chat_template(chat["messages"], **kwargs) == chat["ids"]


@pytest.mark.fast
def test_chat_templates_come_from_the_config_or_the_jinja_file():
  assert "<|start_header_id|>" in tok("llama3").chat_template  # tokenizer_config.json
  with open(os.path.join(fixture("chatml"), "chat_template.jinja"), encoding="utf-8") as f:
    assert tok("chatml").chat_template == f.read()
  with pytest.raises(ValueError, match="no chat template"):
    tok("sentencepiece").apply_chat_template([{"role": "user", "content": "hi"}])


# --- the template environment ---------------------------------------------------------------------


def render(template, messages=({"role": "user", "content": "hi"},), **kwargs):
  return chat_template.render(template, list(messages), **kwargs)


@pytest.mark.fast
def test_template_globals_and_filters():
  before = datetime.now().strftime("%Y-%m-%d")
  assert render("{{ strftime_now('%Y-%m-%d') }}") in (before, datetime.now().strftime("%Y-%m-%d"))
  with pytest.raises(jinja2.exceptions.TemplateError, match="no system"):
    render("{{ raise_exception('no system') }}")
  value = {"b": "é<&>", "a": [1, 2]}
  assert render("{{ x | tojson }}", x=value) == '{"b": "é<&>", "a": [1, 2]}'  # no HTML escaping
  assert render("{{ x | tojson(indent=2, sort_keys=true) }}", x=value) == json.dumps(
      value, ensure_ascii=False, indent=2, sort_keys=True)
  assert render("{{ x | tojson(separators=(',', ':'), ensure_ascii=true) }}", x=value) == json.dumps(
      value, separators=(",", ":"))
  assert render("{% set d = dict(a=1) %}{{ d['a'] }}{{ dict.fromkeys(['k'], 2) }}") == "1{'k': 2}"
  assert render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% endfor %}{{ ns.n }}") == "1"
  assert render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "1"
  assert render("a{% generation %}b{% endgeneration %}c") == "abc"
  assert render("{{ bos_token }}|{{ x }}", special_tokens={"bos_token": "<s>"}, x=1) == "<s>|1"


@pytest.mark.fast
def test_trim_and_lstrip_blocks():
  template = "{% for m in messages %}\n    {% if m['role'] == 'user' %}\nU:{{ m['content'] }}\n    {% endif %}\n{% endfor %}"
  assert render(template) == "U:hi\n"


@pytest.mark.fast
def test_the_sandbox_holds():
  with pytest.raises(jinja2.exceptions.SecurityError):
    render("{{ ''.__class__.__mro__[1].__subclasses__() }}")
  with pytest.raises(jinja2.exceptions.SecurityError):
    render("{% set ns = namespace() %}{% set ns._x = 1 %}")
  with pytest.raises(jinja2.exceptions.SecurityError):
    render("{% set l = [1] %}{{ l.append(2) }}")  # immutable: no mutating methods


@pytest.mark.fast
def test_messages_are_plain_data():
  # A None value is dropped (templates test `is defined`); reasoning is offered under both names.
  out = render("{{ messages[0].keys() | list | sort | join(',') }}|{{ messages[0]['thinking'] }}",
               [{"role": "assistant", "content": "x", "tool_calls": None, "reasoning": "why"}])
  assert out == "content,reasoning,reasoning_content,role,thinking|why"
  assert render("{{ x }}", x=np.bool_(False)) == "False"
  with pytest.raises(TypeError, match="JSON schemas"):
    render("", tools=[len])
  with pytest.raises(ValueError, match="at least one message"):
    render("x", [])


@pytest.mark.fast
def test_named_templates():
  templates = {"default": "D", "tool_use": "T"}
  assert chat_template.pick_template(templates) == "D"
  assert chat_template.pick_template(templates, tools=[{}]) == "T"
  assert chat_template.pick_template(templates, "tool_use") == "T"
  assert chat_template.pick_template(templates, "{{ 1 }}") == "{{ 1 }}"  # a template's own text
  with pytest.raises(ValueError, match="none is named 'default'"):
    chat_template.pick_template({"a": "A"})


# --- special tokens as transformers resolves them -----------------------------------------------


def variant(directory, name="llama3", **config_changes) -> str:
  """A copy of a fixture with tokenizer_config.json changed (a value None removes the key)."""
  d = directory
  shutil.copytree(fixture(name), d)
  with open(d / "tokenizer_config.json", encoding="utf-8") as f:
    config = json.load(f)
  for key, value in config_changes.items():
    if value is None:
      config.pop(key, None)
    else:
      config[key] = value
  (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  return str(d)


VARIANTS = {
    # a pad token the vocabulary lacks is added after it, and counts in vocab_size
    "new_pad": dict(pad_token="<|pad|>"),
    # an AddedToken dict, as older configs store them
    "dict_token": dict(eos_token={"__type": "AddedToken", "content": "<|end_of_text|>", "lstrip": False,
                                  "normalized": False, "rstrip": False, "single_word": False}),
    # special-token strings in text stay text
    "split_special": dict(split_special_tokens=True),
    # a model-specific named token, offered to the template
    "model_specific": dict(image_token="<|reserved_special_token_0|>"),
    # legacy layout: no added_tokens_decoder, special_tokens_map.json decides
    "legacy_map": dict(added_tokens_decoder=None),
}


def make_variant(tmp_path, key) -> str:
  d = variant(tmp_path / key, **VARIANTS[key])
  if key == "legacy_map":
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
      json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                 "additional_special_tokens": ["<|extra|>"]}, f)
  return d


@pytest.mark.fast
def test_special_token_resolution(tmp_path):
  base = tok("llama3")
  t = HFTokenizer(make_variant(tmp_path, "new_pad"))
  assert t.vocab_size == base.vocab_size + 1 and t.pad_id == base.vocab_size
  assert t.token_bytes[t.pad_id] == 0
  t = HFTokenizer(make_variant(tmp_path, "dict_token"))
  assert t.eos_id == base.token_to_id("<|end_of_text|>")
  t = HFTokenizer(make_variant(tmp_path, "split_special"))
  assert base.eos_id in base.encode("a<|eot_id|>") and base.eos_id not in t.encode("a<|eot_id|>")
  t = HFTokenizer(make_variant(tmp_path, "model_specific"))
  assert t.special_tokens["image_token"] == "<|reserved_special_token_0|>"
  assert t.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                               chat_template="{{ image_token }}") == "<|reserved_special_token_0|>"
  t = HFTokenizer(make_variant(tmp_path, "legacy_map"))
  assert t.eos_id == base.token_to_id("<|end_of_text|>") and t.vocab_size == base.vocab_size + 1


# --- loading, saving, run directories ---------------------------------------------------------------


@pytest.mark.fast
def test_load_tokenizer_picks_the_kind(tmp_path):
  assert isinstance(load_tokenizer(fixture("sentencepiece")), HFTokenizer)  # tokenizer.json first
  assert isinstance(load_tokenizer(os.path.join(fixture("llama3"), "tokenizer.json")), HFTokenizer)
  sp_only = tmp_path / "sp"
  sp_only.mkdir()
  shutil.copy(os.path.join(fixture("sentencepiece"), "tokenizer.model"), sp_only)
  assert isinstance(load_tokenizer(sp_only), Tokenizer)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model in"):
    load_tokenizer(tmp_path)


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_saved_files_load_back_the_same_tokenizer(tmp_path, name):
  written = tok(name).save(str(tmp_path / "out"))
  assert "tokenizer.json" in written and "tokenizer_config.json" in written
  again = load_tokenizer(tmp_path / "out")
  texts = REFS[name]["texts"]
  assert again.vocab_size == tok(name).vocab_size
  assert again.encode_batch(texts) == tok(name).encode_batch(texts)
  assert again.chat_template == tok(name).chat_template


@pytest.mark.fast
def test_sentencepiece_save_names_its_special_tokens(tmp_path):
  sp = Tokenizer(os.path.join(ROOT, "tests", "fixtures", "run_before_compute_split", "tokenizer.model"))
  assert sorted(sp.save(str(tmp_path))) == ["tokenizer.model", "tokenizer_config.json"]
  with open(tmp_path / "tokenizer_config.json") as f:
    config = json.load(f)
  assert {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token")} == {
      "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
      "add_bos_token": True}
  assert sp.encode("To be", add_special_tokens=True) == [sp.bos_id, *sp.encode("To be")]


@pytest.mark.fast
def test_a_run_directory_keeps_the_tokenizer_it_was_given(tmp_path):
  config = base_config()
  write_run_files(str(tmp_path), config, tok("chatml"))
  assert sorted(os.listdir(tmp_path)) == ["chat_template.jinja", "config.json", "tokenizer.json",
                                          "tokenizer_config.json"]
  again = read_tokenizer(str(tmp_path))
  assert isinstance(again, HFTokenizer) and again.chat_template == tok("chatml").chat_template
  write_run_files(str(tmp_path), config, str(tmp_path))  # the run's own copy: rewritten in place
  assert read_tokenizer(str(tmp_path)).encode("Hi") == tok("chatml").encode("Hi")
  # Another kind of tokenizer replaces the old files, so the run never reads back the old one.
  write_run_files(str(tmp_path), config, os.path.join(fixture("sentencepiece"), "tokenizer.model"))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "tokenizer.model", "tokenizer_config.json"]
  assert isinstance(read_tokenizer(str(tmp_path)), Tokenizer)


@pytest.mark.fast
def test_documents_get_bos_only_from_a_tokenizer_that_has_one(tmp_path):
  (tmp_path / "doc.txt").write_text("To be, or not to be", encoding="utf-8")
  config = base_config()
  config.data.source, config.data.train_paths = "text", str(tmp_path / "doc.txt")
  for name in ("chatml", "llama3"):
    t = tok(name)
    docs, _ = document_tokens(config, t, "train")
    bos = [] if t.bos_id is None else [t.bos_id]
    assert docs[0].tolist() == [*bos, *t.encode("To be, or not to be"), t.eos_id]


@pytest.mark.fast
def test_a_model_may_have_rows_its_hugging_face_tokenizer_never_uses():
  c = base_config()
  c.model.vocab_size = 384
  assert with_vocab_size(c, 365, extra_rows_ok=True).model.vocab_size == 384
  with pytest.raises(ConfigError, match="model.vocab_size is 384 but the tokenizer has 365"):
    with_vocab_size(c, 365)
  with pytest.raises(ConfigError, match="model.vocab_size is 384 but the tokenizer has 400"):
    with_vocab_size(c, 400, extra_rows_ok=True)  # fewer rows than ids: never


# --- against transformers itself, where it is installed ------------------------------------------


def _hf(path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(text=TEXT)
def test_live_ids_match_transformers(name, text):
  hf, t = _hf(fixture(name)), tok(name)
  assert t.encode(text) == hf.encode(text, add_special_tokens=False)
  assert t.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
  assert t.decode(t.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False),
                                               skip_special_tokens=True)


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_live_chat_templates_match_transformers(name):
  hf, t = _hf(fixture(name)), tok(name)
  for chat in REFS[name]["chats"]:  # no date_string: the template asks strftime_now for today
    kwargs = dict(add_generation_prompt=chat["add_generation_prompt"], tools=chat.get("tools"))
    assert t.apply_chat_template(chat["messages"], tokenize=False, **kwargs) == \
        hf.apply_chat_template(chat["messages"], tokenize=False, **kwargs)
    assert t.apply_chat_template(chat["messages"], **kwargs) == \
        hf.apply_chat_template(chat["messages"], return_dict=False, **kwargs)


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_live_special_token_resolution_matches_transformers(tmp_path, key):
  d = make_variant(tmp_path, key)
  hf, t = _hf(d), HFTokenizer(d)
  assert t.vocab_size == len(hf)
  assert {"bos": t.bos_id, "eos": t.eos_id, "pad": t.pad_id, "unk": t.unk_id} == {
      k: getattr(hf, f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")}
  for text in REFS["llama3"]["texts"]:
    assert t.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
  assert t.special_tokens == hf.special_tokens_map


def test_live_an_exported_sentencepiece_tokenizer_loads_in_transformers(tmp_path):
  sp = Tokenizer(os.path.join(ROOT, "tests", "fixtures", "run_before_compute_split", "tokenizer.model"))
  sp.save(str(tmp_path))
  hf = _hf(str(tmp_path))
  assert len(hf) == sp.vocab_size
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
      sp.bos_id, sp.eos_id, sp.pad_id, sp.unk_id)
  # Text holding the special tokens' strings ("<s>") is where they differ: transformers reads them
  # as the special tokens, SentencePiece as text.
  texts = [t for t in REFS["llama3"]["texts"] if "<s>" not in t]
  for text in texts:
    assert hf.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert hf(text)["input_ids"] == sp.encode(text, add_special_tokens=True), text
    assert hf.decode(sp.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))
