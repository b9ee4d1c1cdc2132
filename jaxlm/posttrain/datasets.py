"""Examples for the preference, KTO and RL objectives, as plain numpy batches.

Records (one JSON object a line in a .jsonl file, or dicts built in Python, e.g. by
jaxlm/posttrain/addition.py):

  preference  {"prompt", "chosen", "rejected"}    chosen/rejected: completions of the prompt
  kto         {"prompt", "completion", "label"}   label: true (desirable) or false
  rl          {"prompt", "answer"?}               prompts to sample from; answer for a reward

A prompt and its completions are strings (plain text) or lists of messages (a chat), as in
jaxlm/posttrain/chat.py: each sequence is the prompt and one completion tokenized together, with
the completion's tokens (and the eos that ends a plain-text one) as the mask.

Batches are one sequence a row, right-padded to seq_len, in the trainer's format (int32
[rows, seq_len] inputs, targets, segment_ids (1, 0 on padding), positions, weights), weights 1 on
the completion's targets. A sequence's log-probability under a model is then
sum(weights * log p(targets)) over its row (what DPO and KTO compare). Sequences longer than
seq_len + 1 tokens keep their beginning and are counted in `truncated`.

  preference_batch -> {"chosen": Batch, "rejected": Batch, "truncated": [n] bool}: row i of
                      both is pair i.
  kto_batch        -> Batch + {"labels": [n] bool, "truncated": [n] bool}.
  rl_prompts       -> RLPrompts(prompt ids for generate_batch, answers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from jaxlm.posttrain import chat
from jaxlm.posttrain.sft import unpacked_batch

REQUIRED = {
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "rl": ("prompt",),
}


def check_records(records: Sequence, kind: str, where: Sequence[str] | None = None) -> list[dict]:
  """The records as dicts; a ChatError naming the record (where[i]) when a field is missing."""
  if kind not in REQUIRED:
    raise ValueError(f"kind must be one of {sorted(REQUIRED)}, got {kind!r}")
  out = []
  for i, record in enumerate(records):
    name = where[i] if where else f"record {i}"
    if not isinstance(record, Mapping):
      raise chat.ChatError(f"{name} must be an object, got {type(record).__name__}")
    missing = [k for k in REQUIRED[kind] if k not in record]
    if missing:
      raise chat.ChatError(f"{name} lacks {missing}; a {kind} record has {list(REQUIRED[kind])}")
    if kind == "kto" and not isinstance(record["label"], bool):
      raise chat.ChatError(f"{name}: label must be true or false, got {record['label']!r}")
    out.append(dict(record))
  if not out:
    raise chat.ChatError(f"no {kind} records")
  return out


def read_records(path: str, kind: str) -> list[dict]:
  """A JSONL file of `kind` records, checked; errors name the file and line."""
  lines = chat.read_jsonl(path)
  return check_records([r for _, r in lines], kind, [f"{path}:{n}" for n, _ in lines])


def _completions_batch(tokenizer, prompts, completions, seq_len: int, chat_template: str):
  encoded = [chat.encode_prompt_completion(tokenizer, p, c, max_len=seq_len + 1,
                                           chat_template=chat_template)
             for p, c in zip(prompts, completions)]
  return unpacked_batch(encoded, seq_len), np.asarray([e.truncated for e in encoded])


def preference_batch(tokenizer, records: Sequence[Mapping], seq_len: int, chat_template: str = ""
                     ) -> dict:
  """{"chosen": Batch, "rejected": Batch, "truncated": [n] bool (either side was)}."""
  records = check_records(records, "preference")
  prompts = [r["prompt"] for r in records]
  chosen, cut_c = _completions_batch(tokenizer, prompts, [r["chosen"] for r in records], seq_len,
                                     chat_template)
  rejected, cut_r = _completions_batch(tokenizer, prompts, [r["rejected"] for r in records], seq_len,
                                       chat_template)
  return {"chosen": chosen, "rejected": rejected, "truncated": cut_c | cut_r}


def kto_batch(tokenizer, records: Sequence[Mapping], seq_len: int, chat_template: str = "") -> dict:
  """A Batch of prompt + completion rows, with "labels" [n] bool and "truncated" [n] bool."""
  records = check_records(records, "kto")
  batch, truncated = _completions_batch(tokenizer, [r["prompt"] for r in records],
                                        [r["completion"] for r in records], seq_len, chat_template)
  return {**batch, "labels": np.asarray([r["label"] for r in records], bool), "truncated": truncated}


@dataclasses.dataclass(frozen=True)
class RLPrompts:
  """prompt_ids[i]: token ids to generate from (jaxlm.inference.decode.generate_batch takes the
  list as is); answers[i]: the record's "answer" (None when it has none)."""
  prompt_ids: list
  answers: list


def rl_prompts(tokenizer, records: Sequence[Mapping], chat_template: str = "") -> RLPrompts:
  """Prompts as a model trained on the same format continues them: [bos] + text for a string, the
  chat with its generation prompt for a list of messages (chat.prompt_ids)."""
  records = check_records(records, "rl")
  return RLPrompts([chat.prompt_ids(tokenizer, r["prompt"], chat_template) for r in records],
                   [r.get("answer") for r in records])
