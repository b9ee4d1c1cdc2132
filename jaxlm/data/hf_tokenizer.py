"""Hugging Face tokenizers (tokenizer.json) with the ids transformers gives, and their chat templates.

A tokenizer.json holds the whole pipeline (normalizer, pre-tokenizer, model, post-processor,
decoder, added tokens) and the `tokenizers` library runs it; what transformers 5 adds on top comes
from the files beside it, read here the same way:
  - tokenizer_config.json names the special tokens (bos_token, eos_token, pad_token, unk_token,
    model-specific ones such as image_token, and additional/extra_special_tokens); entries may be
    strings or serialized AddedTokens. special_tokens_map.json is read only when the config has
    no "added_tokens_decoder" (older repositories), and then its values win. Named tokens the
    tokenizer.json lacks are added after its vocabulary, as transformers adds them, so
    `vocab_size` (len(tokenizer) in transformers) counts them.
  - add_bos_token / add_eos_token in tokenizer_config.json are ignored when a tokenizer.json
    exists (transformers 5 drops them too): the post-processor in tokenizer.json decides what
    `encode(text, add_special_tokens=True)` adds (Llama 3's adds <|begin_of_text|>, Qwen2's
    nothing).
  - split_special_tokens: true makes special-token strings in text encode as text.
  - the chat template: chat_template.jinja wins over tokenizer_config.json's "chat_template";
    additional_chat_templates/<name>.jinja add named ones.
generation_config.json is not read: transformers' tokenizer does not read it either (it holds the
model's stop ids, which may be several).

Decoding never applies clean_up_tokenization_spaces (transformers 5 skips it for BPE too; it
alters text).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from jaxlm.data import chat_template as chat

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# transformers' named special tokens; a config may add model-specific *_token names.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level characters -> the byte each stands for.

  The 188 printable Latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for themselves; the other 68
  (controls, space, DEL, NBSP, soft hyphen, ...) are shifted, in byte order, to U+0100 onwards, so
  every byte is one visible character ("Ġ" is the space).
  """
  printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
  out, shifted = {}, 0
  for b in range(256):
    if b in printable:
      out[chr(b)] = b
    else:
      out[chr(0x100 + shifted)] = b
      shifted += 1
  return out


_ALPHABET = byte_level_alphabet()


def _token_text(value) -> str | None:
  """A special token as a config stores it: a string, or a serialized AddedToken (a dict)."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class _Decoded:
  """token_bytes' reading of a decoder: what one token adds to the decoded bytes."""

  def __init__(self, decoder: dict | None):
    if decoder is None:
      raise ValueError("this tokenizer.json has no decoder, so jaxlm cannot tell the bytes each "
                       "token decodes to (needed for bits per byte); use a tokenizer with one")
    self.steps = []
    self.strips_leading_space = False  # the decoder drops one leading space of the whole text
    self._add(decoder, fused=False)

  def _add(self, d: dict, fused: bool) -> bool:
    kind = d["type"]
    if kind == "Sequence":
      for sub in d["decoders"]:
        fused = self._add(sub, fused)
    elif kind == "Fuse":
      fused = True  # later steps see the whole text
    elif kind == "Strip":
      if fused:  # whole-text strip: the dummy-prefix space of SentencePiece-style tokenizers
        self.strips_leading_space |= d.get("start", 0) > 0 and d.get("content") == " "
      else:
        self.steps.append(("strip", d.get("content", " "), d.get("start", 0), d.get("stop", 0)))
    elif kind == "Metaspace":
      self.steps.append(("replace", d.get("replacement", "\u2581"), " "))
      self.strips_leading_space |= d.get("prepend_scheme", "always") != "never" and d.get(
          "add_prefix_space", True)
    elif kind == "Replace":
      pattern = d["pattern"]
      if "String" in pattern:
        self.steps.append(("replace", pattern["String"], d["content"]))
      else:
        self.steps.append(("regex", re.compile(pattern["Regex"]), d["content"]))
    elif kind in ("ByteFallback", "ByteLevel"):
      self.steps.append((kind,))
    else:
      raise ValueError(f"tokenizer.json decoder {kind!r} is not supported by jaxlm (it cannot tell "
                       "the bytes each token decodes to); byte-level and SentencePiece-style "
                       "(Metaspace, Replace, ByteFallback, Fuse, Strip) decoders are")
    return fused

  def nbytes(self, token: str) -> int:
    value: str | bytes = token
    for step in self.steps:
      kind = step[0]
      if isinstance(value, bytes):
        continue  # bytes are final: later text steps do not touch them
      if kind == "replace":
        value = value.replace(step[1], step[2])
      elif kind == "regex":
        value = step[1].sub(step[2], value)
      elif kind == "strip":
        content, start, stop = step[1:]
        for _ in range(start):
          value = value[1:] if value.startswith(content) else value
        for _ in range(stop):
          value = value[:-1] if value.endswith(content) else value
      elif kind == "ByteFallback":
        m = _BYTE_PIECE.fullmatch(value)
        value = bytes([int(m.group(1), 16)]) if m else value
      elif kind == "ByteLevel":
        # A token with a character outside the byte alphabet decodes to its own UTF-8 bytes.
        if all(c in _ALPHABET for c in value):
          value = bytes(_ALPHABET[c] for c in value)
        else:
          value = value.encode("utf-8")
    return len(value) if isinstance(value, bytes) else len(value.encode("utf-8"))


class HFTokenizer:
  """A Hugging Face tokenizer.json with the interface of jaxlm's SentencePiece Tokenizer.

  Attributes:
    path: the tokenizer.json it was loaded from; directory: the folder holding it and its configs.
    vocab_size: ids the model needs: len(tokenizer) in transformers (vocabulary plus added tokens).
    pad_id, unk_id, bos_id, eos_id: special ids, None when the tokenizer names no such token.
    special_tokens: {"bos_token": "<|begin_of_text|>", ...}, the named tokens that are set.
    chat_template: the template text, {name: text} when there are several, or None.
    token_bytes: [vocab_size] int32, UTF-8 bytes each id adds to decoded text (special tokens 0).
      Summed over a text's ids it gives the decoded text's byte length, plus one where the decoder
      drops a leading space (SentencePiece-style dummy prefix: `strips_leading_space`).
  """

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, TOKENIZER_FILE)
    self.path = path
    self.directory = os.path.dirname(os.path.abspath(path))
    self._backend = Backend.from_file(path)
    config = self._config()
    self.chat_template = self._chat_templates(config)
    self.special_tokens = self._add_special_tokens(config)
    self._backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

    vocab = self._backend.get_vocab(with_added_tokens=True)  # token -> id
    self.vocab_size = max(self._backend.get_vocab_size(with_added_tokens=True),
                          max(vocab.values(), default=-1) + 1)
    ids = {name[:-len("_token")]: self._backend.token_to_id(token)
           for name, token in self.special_tokens.items()}
    self.bos_id, self.eos_id = ids.get("bos"), ids.get("eos")
    self.pad_id, self.unk_id = ids.get("pad"), ids.get("unk")
    self._special_ids = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
    decoded = _Decoded(json.loads(self._backend.to_str()).get("decoder"))
    self.strips_leading_space = decoded.strips_leading_space
    self.token_bytes = np.zeros([self.vocab_size], np.int32)  # [vocab_size]
    for token, i in vocab.items():
      if i not in self._special_ids:
        self.token_bytes[i] = decoded.nbytes(token)

  def _file(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def _config(self) -> dict:
    """tokenizer_config.json, with special_tokens_map.json over it where transformers reads that."""
    config = _read_json(self._file(CONFIG_FILE)) if os.path.isfile(self._file(CONFIG_FILE)) else {}
    if "added_tokens_decoder" not in config and os.path.isfile(self._file(SPECIAL_TOKENS_MAP_FILE)):
      for key, value in _read_json(self._file(SPECIAL_TOKENS_MAP_FILE)).items():
        if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
          old = list(config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])
          config["extra_special_tokens"] = old + [t for t in value if t not in old]
        else:
          config[key] = value
    return config

  def _chat_templates(self, config: dict):
    templates = {}
    if os.path.isfile(self._file(CHAT_TEMPLATE_FILE)):
      with open(self._file(CHAT_TEMPLATE_FILE), encoding="utf-8") as f:
        templates["default"] = f.read()
    if os.path.isdir(self._file(CHAT_TEMPLATE_DIR)):
      for name in sorted(os.listdir(self._file(CHAT_TEMPLATE_DIR))):
        if name.endswith(".jinja"):
          with open(os.path.join(self._file(CHAT_TEMPLATE_DIR), name), encoding="utf-8") as f:
            templates[name[:-len(".jinja")]] = f.read()
    if templates:  # template files win over the config's entry
      return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
      return {t["name"]: t["template"] for t in template}
    return template

  def _add_special_tokens(self, config: dict) -> dict[str, str]:
    """The named special tokens; adds to the backend those of the config it lacks, as transformers does."""
    named = {}
    for key, value in config.items():
      text = _token_text(value)
      if key.endswith("_token") and text is not None:  # bos_token, ..., and model-specific ones
        named[key] = text
    extra = config.get("extra_special_tokens")
    if not extra:
      extra = config.get("additional_special_tokens")
    if isinstance(extra, Mapping):  # {name: token}: named, model-specific tokens
      named.update({k: _token_text(v) for k, v in extra.items() if _token_text(v) is not None})
      extra = []
    extra = [_token_text(t) for t in extra or [] if _token_text(t) is not None]

    to_add = []
    for _, props in sorted(((int(i), p) for i, p in (config.get("added_tokens_decoder") or {}).items()),
                           key=lambda item: item[0]):
      props = {k: v for k, v in props.items() if k != "__type"}
      to_add.append(AddedToken(props.pop("content"), **props))
    present = {t.content for t in self._backend.get_added_tokens_decoder().values()}
    present |= {t.content for t in to_add}
    for text in [*named.values(), *extra]:
      if text not in present:
        to_add.append(AddedToken(text, special=True, normalized=False))
        present.add(text)
    if to_add:
      self._backend.add_tokens(to_add)
    return named

  # --- the interface the data pipeline, training and sampling use -------------------------------

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids for `text`. add_special_tokens=False (the default, as jaxlm's pipeline adds bos/eos
    itself) is transformers' encode(text, add_special_tokens=False); True is tokenizer(text)
    ["input_ids"]: what the tokenizer.json's post-processor adds (Llama 3: bos). Special-token
    strings in the text become their ids either way, as in transformers."""
    return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)`'s ids and each one's (start, end) character offsets in `text`, as the
    `tokenizers` library reports them (the byte tokens of one character share its span)."""
    encoding = self._backend.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """`encode` over many texts, in the library's Rust threads."""
    return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """Text for `ids` (list or int array); special tokens (bos, eos, chat markers) are dropped unless
    skip_special_tokens=False."""
    return self._backend.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=skip_special_tokens)

  def id_to_piece(self, i: int) -> str | None:
    return self._backend.id_to_token(int(i))

  def token_to_id(self, token: str) -> int | None:
    return self._backend.token_to_id(token)

  def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                          tokenize: bool = True, *, tools: Sequence[Mapping] | None = None,
                          documents: Sequence[Mapping] | None = None,
                          chat_template: str | None = None, **kwargs) -> list[int] | str:
    """A conversation in the model's chat format: its ids (tokenize=True) or its text.

    Same text and ids as transformers' apply_chat_template(messages, add_generation_prompt=...,
    tokenize=..., tools=..., documents=..., **kwargs): the template sees the special tokens by name
    (bos_token, ...) and kwargs; the text is encoded without the post-processor's additions (the
    template writes bos itself where the model wants it). chat_template: a template's name or
    text, instead of the tokenizer's own.
    """
    template = chat.pick_template(self.chat_template, chat_template, tools)
    text = chat.render(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                       documents=documents, special_tokens=self.special_tokens, **kwargs)
    return self.encode(text) if tokenize else text

  # --- files ------------------------------------------------------------------------------------

  def files(self) -> list[str]:
    """Names (in `directory`) of the files this tokenizer was read from: what `save` copies."""
    names = [os.path.basename(self.path)]
    for name in (CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR):
      if os.path.exists(self._file(name)):
        names.append(name)
    return names

  def save(self, directory: str) -> list[str]:
    """Copies the tokenizer's files into `directory` (tokenizer.json, tokenizer_config.json, and
    special_tokens_map.json, chat_template.jinja, additional_chat_templates/ where present), which
    transformers' AutoTokenizer then loads as this tokenizer. Returns the names written."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in self.files():
      source = self._file(name)
      target = os.path.join(directory, TOKENIZER_FILE if source == os.path.abspath(self.path) else name)
      if not (os.path.exists(target) and os.path.samefile(source, target)):
        if os.path.isdir(source):
          shutil.copytree(source, target, dirs_exist_ok=True)
        else:
          shutil.copyfile(source, target)
      written.append(os.path.basename(target))
    return written

  def __repr__(self) -> str:
    return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

