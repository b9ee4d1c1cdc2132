"""A fixed byte-level tokenizer: one token per UTF-8 byte, plus <pad>, <s> and </s>.

Why: the arithmetic task (jaxlm/posttrain/addition.py) needs every digit to be its own token, so
the model sees numbers digit by digit and an answer is graded digit by digit. A trained
SentencePiece or BPE vocabulary would merge characters unpredictably (and SentencePiece refuses
vocabulary sizes its text cannot fill); a vocabulary of the 256 bytes has no merges at all, needs
no training, encodes any text, and is the same on every machine.

It is written as a Hugging Face tokenizer.json (a BPE model with no merges over GPT-2's byte
alphabet, byte-level pre-tokenizer and decoder) with a tokenizer_config.json naming its special
tokens, so jaxlm loads it like any other (`jaxlm.data.load_tokenizer(directory)`), a run directory
keeps a copy, and transformers reads the same ids. Ids: <pad> 0, <s> 1, </s> 2, byte b -> b + 3
(259 ids in all). It has no chat template: chats use jaxlm's default (jaxlm/posttrain/chat.py).
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from jaxlm.data.hf_tokenizer import CONFIG_FILE, TOKENIZER_FILE, byte_level_alphabet

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
BYTE_OFFSET = len(SPECIAL_TOKENS)  # byte b has id b + BYTE_OFFSET
VOCAB_SIZE = BYTE_OFFSET + 256


def _backend() -> Tokenizer:
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
  for char, byte in byte_level_alphabet().items():
    vocab[char] = byte + BYTE_OFFSET
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  return tok


def write_byte_tokenizer(directory: str) -> str:
  """Writes tokenizer.json and tokenizer_config.json into `directory`; returns the directory.

  The files' bytes depend only on this module, so writing them again changes nothing.
  """
  os.makedirs(directory, exist_ok=True)
  _backend().save(os.path.join(directory, TOKENIZER_FILE))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "pad_token": SPECIAL_TOKENS[0], "bos_token": SPECIAL_TOKENS[1], "eos_token": SPECIAL_TOKENS[2],
      "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return directory
