"""The tokenizer round-trips any text exactly, counts bytes, caches, and fails clearly."""

import os

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlm.config import ConfigError, base_config, with_vocab_size
from jaxlm.data import sources
from jaxlm.data.tokenizer import Tokenizer, get_tokenizer, load_tokenizer, train_tokenizer

pytestmark = pytest.mark.fast  # unit tests: the `-m fast` tier

VOCAB = 400
SAMPLES = [
    "naïve café — 東京 😀",
    "line one\nline two\n\n\nafter blank lines\n",
    "  leading, multiple   inner spaces, trailing  ",
    "\ttabs\tand\r\nwindows line ends\r\n",
    "**HAMLET**  \nTo be, or not to be: that is the question:  \n",
    "digits 1234567890 and 3.14159",
    " ", "\n", "a", "",
]


def _corpus() -> list[str]:
  plays = sources.shakespeare_plays()
  return [plays["comedies/the-comedy-of-errors"][:40_000], plays["roman/julius-caesar"][:40_000]]


def _tok_cfg(cache_dir, **overrides):
  cfg = base_config().tokenizer
  cfg.vocab_size = VOCAB
  cfg.cache_dir = str(cache_dir)
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def tok(cache_dir) -> Tokenizer:
  return train_tokenizer(_corpus(), _tok_cfg(cache_dir))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text  # arrays as well as lists


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",))))
def test_round_trip_any_text(tok, text):  # "▁" is SentencePiece's space marker (documented limit)
  assert tok.decode(tok.encode(text)) == text


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == VOCAB
  assert tok.encode("") == []
  ids = tok.encode("To be")
  assert tok.bos_id not in ids and tok.eos_id not in ids  # encode adds no specials
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "To be"


def test_newline_is_one_token_and_unseen_text_uses_bytes(tok):
  ids = tok.encode("\n")
  assert len(ids) == 1 and tok.id_to_piece(ids[0]) == "\n"
  ids = tok.encode("東京")  # never in the training text: UTF-8 byte fallback, never <unk>
  assert tok.unk_id not in ids and len(ids) == len("東京".encode())


@pytest.mark.parametrize("text", SAMPLES + ["Friends, Romans, countrymen, lend me your ears;\n"])
def test_token_bytes_sum_to_utf8_length(tok, text):
  assert int(tok.token_bytes[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_token_bytes_table(tok):
  assert tok.token_bytes.shape == (tok.vocab_size,) and tok.token_bytes.dtype == np.int32
  assert tok.token_bytes[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]  # pad, unk, bos, eos
  byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
  assert len(byte_ids) == 256 and set(tok.token_bytes[byte_ids].tolist()) == {1}


def test_second_train_reuses_the_cached_model(tok, cache_dir, monkeypatch):
  mtime = os.path.getmtime(tok.path)

  def no_training(*args, **kwargs):
    raise AssertionError("trained again instead of reusing the cache")

  monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
  again = train_tokenizer(_corpus(), _tok_cfg(cache_dir))
  assert again.path == tok.path and os.path.getmtime(again.path) == mtime
  with pytest.raises(AssertionError, match="trained again"):  # other text: a new model
    train_tokenizer(_corpus()[:1], _tok_cfg(cache_dir))


def test_cache_key_covers_options_and_respects_the_byte_cap(tmp_path):
  corpus = _corpus()
  capped = _tok_cfg(tmp_path, train_max_bytes=30_000)
  a = train_tokenizer(corpus, capped)
  # Only the first 30 kB count: changing text after the cap gives the same (cached) model.
  b = train_tokenizer([corpus[0][:30_000], "anything after the cap"], capped)
  assert a.path == b.path
  c = train_tokenizer(corpus, _tok_cfg(tmp_path, train_max_bytes=30_000, model_type="unigram"))
  assert c.path != a.path and c.vocab_size == VOCAB


def test_load_missing_path_names_it(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    load_tokenizer(str(missing))


def test_load_existing(tok):
  loaded = load_tokenizer(tok.path)
  assert loaded.vocab_size == tok.vocab_size and loaded.encode("To be") == tok.encode("To be")


def _text_config(tmp_path, cache_dir):
  train = tmp_path / "train.txt"
  train.write_text("".join(_corpus()), encoding="utf-8")
  held_out = tmp_path / "eval.txt"
  held_out.write_text("a held-out document that must not shape the vocabulary\n", encoding="utf-8")
  c = base_config()
  c.data.source, c.data.train_paths, c.data.eval_paths = "text", str(train), str(held_out)
  c.tokenizer.vocab_size = c.model.vocab_size = VOCAB
  c.tokenizer.cache_dir = str(cache_dir)
  return c


def test_get_tokenizer_trains_on_the_training_documents(tmp_path, cache_dir):
  c = _text_config(tmp_path, cache_dir)
  tok = get_tokenizer(c)
  # Same cache entry as training directly on the train split: nothing else went in.
  assert tok.path == train_tokenizer(sources.documents(c.data, "train"), c.tokenizer).path
  c.tokenizer.path = tok.path  # and a given path is loaded as is
  assert get_tokenizer(c).path == tok.path


def test_the_model_takes_the_tokenizers_vocabulary_and_a_mismatch_names_the_fix(tmp_path, tok):
  c = base_config()
  c.tokenizer.path = tok.path  # 400 tokens
  assert with_vocab_size(c, get_tokenizer(c).vocab_size).model.vocab_size == 400
  c.model.vocab_size = 4096
  with pytest.raises(ConfigError, match=r"model\.vocab_size is 4096.*model\.vocab_size=400"):
    with_vocab_size(c, get_tokenizer(c).vocab_size)
