"""Tokenizers: loading either kind, and SentencePiece models trained here (cached by content hash).

`load_tokenizer(path)` takes a SentencePiece .model, a Hugging Face tokenizer.json
(jaxlm/data/hf_tokenizer.py), or a directory holding either; a directory with both is read as
its tokenizer.json, which is what transformers loads and what carries the added tokens and the
chat template. Both kinds have the same interface (vocab_size, pad/unk/bos/eos ids, token_bytes,
encode, encode_batch, decode, id_to_piece, save).

SentencePiece training options are chosen so that `decode(encode(text)) == text` for any text: identity
normalization (no NFKC), no dummy prefix, no collapsing of whitespace, whitespace-only pieces
allowed (indentation, markdown's two trailing spaces), `\n` as a dedicated piece (SentencePiece
trains on lines, so it never sees a newline otherwise), and byte fallback so characters never seen
in training become their UTF-8 bytes instead of `<unk>`. Digits are split so numbers tokenize
uniformly. Ids are fixed: pad=0, unk=1, bos=2, eos=3.

Known limit: U+2581 ("▁") is SentencePiece's internal space marker, so a literal "▁" in the
input decodes as a space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from jaxlm.config import ConfigError
from jaxlm.data import sources
from jaxlm.data.hf_tokenizer import CONFIG_FILE, TOKENIZER_FILE, HFTokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_FILE = "tokenizer.model"  # a SentencePiece model's name in a run or Hugging Face directory
_NEWLINE = "\n"
_SPACE_MARKER = "\u2581"  # "▁"
# Bump when the trainer options below change: it is part of the cache key.
_TRAINER_VERSION = 2
# Line-end pieces SentencePiece cannot learn from lines alone: a Markdown hard break ("  \n",
# written with the space marker since symbols match after whitespace escaping), a paragraph break
# and a plain newline. On the Shakespeare eval plays they raise bytes per token from 2.83 to 3.07.
_LINE_END_SYMBOLS = [_SPACE_MARKER * 2 + _NEWLINE, _NEWLINE * 2, _NEWLINE]

log = logging.getLogger(__name__)


class Tokenizer:
  """A thin wrapper over a SentencePiece processor with the fields the trainer needs.

  Attributes:
    path: the .model file it was loaded from.
    vocab_size: number of ids, including control and byte-fallback pieces.
    pad_id, unk_id, bos_id, eos_id: special ids.
    token_bytes: [vocab_size] int32, how many UTF-8 bytes each id adds to decoded text (control
      and unknown ids 0, byte-fallback ids 1); sums over a sequence to the decoded byte length,
      which turns a loss in nats/token into bits per byte.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self._sp = spm.SentencePieceProcessor(model_file=self.path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.unk_id = int(self._sp.unk_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.token_bytes = self._token_bytes()

  def _token_bytes(self) -> np.ndarray:
    sp = self._sp
    out = np.zeros([self.vocab_size], np.int32)  # [vocab_size]
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        continue  # decodes to nothing (unk: the original bytes are unknown)
      if sp.is_byte(i):
        out[i] = 1  # "<0xNN>" stands for one byte
      else:
        out[i] = len(sp.id_to_piece(i).replace(_SPACE_MARKER, " ").encode("utf-8"))
    return out

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids for `text`, without bos/eos; "" -> []. add_special_tokens=True puts bos first, as jaxlm
    trains (and as the tokenizer_config.json `save` writes tells transformers to)."""
    ids = self._sp.encode(text)
    return [self.bos_id, *ids] if add_special_tokens and self.bos_id >= 0 else ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """`encode` over many texts at once, in SentencePiece's C++ threads (the GIL is released)."""
    out = self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)
    return [[self.bos_id, *ids] for ids in out] if add_special_tokens and self.bos_id >= 0 else out

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)`'s ids and each one's (start, end) character offsets in `text`.

    SentencePiece reports UTF-8 byte offsets; they are turned into character offsets. The
    byte-fallback pieces of one character share its span (the first ones start and end at its
    start)."""
    try:
      pieces = self._sp.encode(text, out_type="proto").pieces
    except ValueError:  # releases that predate out_type="proto" call it "immutable_proto"
      pieces = self._sp.encode(text, out_type="immutable_proto").pieces
    char_at = np.zeros(len(text.encode("utf-8")) + 1, np.int64)  # byte offset -> character offset
    byte = 0
    for i, char in enumerate(text):
      width = len(char.encode("utf-8"))
      char_at[byte:byte + width] = i
      byte += width
    char_at[byte] = len(text)
    return ([int(p.id) for p in pieces],
            [(int(char_at[p.begin]), int(char_at[p.end])) for p in pieces])

  def decode(self, ids) -> str:
    """Text for `ids` (list or int array); control ids (pad/bos/eos) decode to nothing."""
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def save(self, directory: str) -> list[str]:
    """Writes tokenizer.model and a tokenizer_config.json naming its special tokens, the layout
    transformers 5's AutoTokenizer loads (as a generic fast tokenizer built from the model's own
    normalizer settings: ids equal to `encode`'s, except that transformers reads the special
    tokens' strings in text as those tokens). No tokenizer.json is written: making one takes
    transformers' converter. Returns the names written."""
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, MODEL_FILE)
    if not (os.path.exists(target) and os.path.samefile(self.path, target)):
      shutil.copyfile(self.path, target)
    named = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
             "pad_token": self.pad_id}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # not LlamaTokenizer: that one adds a prefix space
        **{name: self.id_to_piece(i) for name, i in named.items() if i >= 0},
        "add_bos_token": self.bos_id >= 0, "add_eos_token": False,  # jaxlm's documents start with bos
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
    return [MODEL_FILE, CONFIG_FILE]

  def __repr__(self) -> str:
    return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


AnyTokenizer = Tokenizer | HFTokenizer


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
  """A SentencePiece .model, a Hugging Face tokenizer.json, or a directory holding either
  (tokenizer.json first). A missing path is a FileNotFoundError naming it."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    for name in (TOKENIZER_FILE, MODEL_FILE):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise FileNotFoundError(
        f"no {TOKENIZER_FILE} or {MODEL_FILE} in '{path}'; set tokenizer.path to a directory "
        "holding a tokenizer, or to the tokenizer file itself")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"tokenizer '{path}' does not exist; set tokenizer.path to an existing SentencePiece "
        ".model file, a Hugging Face tokenizer.json, or a directory holding either, or leave it "
        "empty to train one on the training split")
  return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def _trainer_options(tok_cfg) -> dict:
  """Every SentencePiece option that shapes the model; all of it goes into the cache key."""
  return dict(
      model_type=tok_cfg.model_type,
      vocab_size=int(tok_cfg.vocab_size),
      byte_fallback=bool(tok_cfg.byte_fallback),
      # Without byte fallback every training character needs a piece of its own.
      character_coverage=0.9995 if tok_cfg.byte_fallback else 1.0,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      user_defined_symbols=_LINE_END_SYMBOLS,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      max_sentence_length=1 << 16,
  )


def _capped(texts: Iterable[str], max_bytes: int) -> list[str]:
  """The texts in order until `max_bytes` UTF-8 bytes (the last one truncated)."""
  out, total = [], 0
  for text in texts:
    size = len(text.encode("utf-8"))
    if max_bytes and total + size > max_bytes:
      if total < max_bytes:
        out.append(text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore"))
      break
    out.append(text)
    total += size
  return out


def _cache_key(texts: Sequence[str], options: dict) -> str:
  h = hashlib.sha256()
  h.update(json.dumps({"v": _TRAINER_VERSION, **options}, sort_keys=True).encode())
  for text in texts:
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab", "c"] != ["a", "bc"]
    h.update(data)
  return h.hexdigest()[:20]


def _cache_dir(tok_cfg) -> Path:
  return Path(os.path.expanduser(tok_cfg.cache_dir or "~/.cache/jaxlm/tokenizers"))


def train_tokenizer(texts: Iterable[str], tok_cfg) -> Tokenizer:
  """Trains a SentencePiece model on `texts` (capped at tok_cfg.train_max_bytes), or reuses it.

  The model is cached as `<cache_dir>/<model_type>-<vocab_size>-<hash>.model`, the hash covering
  the (capped) text and every trainer option, so a second call with the same input loads the file
  without training. Writes are atomic (temp dir + rename), so concurrent trainers do not clash.
  """
  options = _trainer_options(tok_cfg)
  texts = _capped(texts, int(tok_cfg.train_max_bytes))
  key = _cache_key(texts, options)
  cache_dir = _cache_dir(tok_cfg)
  path = cache_dir / f"{options['model_type']}-{options['vocab_size']}-{key}.model"
  if path.is_file():
    return Tokenizer(path)

  # SentencePiece reads sentences; it treats each line as one, so we feed lines and `\n` is a
  # user-defined piece. Empty lines carry nothing to learn.
  lines = [line for text in texts for line in text.split(_NEWLINE) if line]
  if not lines:
    raise ValueError("train_tokenizer got no text to train on")
  cache_dir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
    prefix = os.path.join(tmp, "spm")
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_prefix=prefix, num_threads=os.cpu_count() or 1,
          minloglevel=2, **options)
    except RuntimeError as e:
      raise ConfigError(
          f"SentencePiece training failed ({e}); if the vocabulary is too large for this text, "
          f"lower tokenizer.vocab_size (now {options['vocab_size']}) and model.vocab_size "
          "together") from e
    os.replace(prefix + ".model", path)
  log.info("trained %s tokenizer (vocab %d) on %d lines in %.1fs -> %s", options["model_type"],
           options["vocab_size"], len(lines), time.perf_counter() - start, path)
  return Tokenizer(path)


def get_tokenizer(config) -> AnyTokenizer:
  """The run's tokenizer: tokenizer.path if set, else one trained on the training documents.

  model.vocab_size is matched against it by jaxlm.config.with_vocab_size, in one place.
  """
  tok_cfg = config.tokenizer
  if tok_cfg.path:
    return load_tokenizer(tok_cfg.path)
  docs = sources.documents(config.data, "train")
  return train_tokenizer((docs[i] for i in range(len(docs))), tok_cfg)
