"""Prompt files in, JSONL completions out: the text side of batch generation.

A prompts file is either JSON lines (`.jsonl`: one object per line with a "prompt" string) or plain
text (one prompt per line; blank lines are skipped, and `\\n` inside a line stands for a newline so
multi-line prompts fit on one line).
"""

from __future__ import annotations

import json
import os

import numpy as np


def read_prompts(path: str) -> list[str]:
  """The prompts of a file; ValueError naming the file and line when it holds none or a bad one."""
  if not os.path.exists(path):
    raise ValueError(f"prompts file {path} does not exist")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      if path.endswith(".jsonl"):
        try:
          prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{n} is not a JSON object with a \"prompt\" string "
                           f"({type(e).__name__})") from e
        if not isinstance(prompt, str):
          raise ValueError(f"{path}:{n}: \"prompt\" must be a string")
      else:
        prompt = line.rstrip("\n").replace("\\n", "\n")
      prompts.append(prompt)
  if not prompts:
    raise ValueError(f"prompts file {path} holds no prompts; write one per line (or JSONL with "
                     "a \"prompt\" field)")
  return prompts


def encode(tokenizer, text: str) -> list[int]:
  """[bos] + the text's ids (no bos where the tokenizer has none)."""
  bos = tokenizer.bos_id
  return ([] if bos is None or bos < 0 else [int(bos)]) + list(tokenizer.encode(text))


def decode_new(tokenizer, prompt_ids, new_ids) -> str:
  """The text the new ids add to the prompt's. Decoded together with the prompt: tokenizers like
  SentencePiece drop a leading space when a piece is decoded on its own."""
  prompt_ids, new_ids = [int(i) for i in prompt_ids], [int(i) for i in new_ids]
  head, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
  return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)


def result_line(tokenizer, prompt_index, prompt, prompt_ids, sample, tokens, logprobs, finish) -> dict:
  """One JSONL result line. The eos that ended a row is counted in `tokens` but not decoded."""
  ids = list(tokens)
  if finish == "eos":
    ids = ids[:-1]
  return {"index": prompt_index, "sample": sample, "prompt": prompt,
          "completion": decode_new(tokenizer, prompt_ids, ids), "tokens": len(tokens),
          "finish": finish, "logprob": float(np.sum(logprobs))}
