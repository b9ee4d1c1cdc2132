"""Conversations -> token ids and the mask of the tokens the model is trained to produce.

Two kinds of example (one JSON object a line in a .jsonl file):

  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
      A chat, rendered by the chat template; every assistant message is trained on.
  {"prompt": ..., "completion": ...}
      Both strings: plain text, no template: [bos] + prompt + completion + [eos] (each where the
      tokenizer has one); the completion and the eos are trained on.
      Both lists of messages: a chat of prompt + completion; only the completion's assistant
      messages are trained on (earlier assistant turns in the prompt are context).

The chat template: the tokenizer's own (a Hugging Face tokenizer's chat_template), else
DEFAULT_TEMPLATE (a SentencePiece tokenizer, or a tokenizer.json without one). `chat_template=
"default"` forces DEFAULT_TEMPLATE; a path to a .jinja file uses that file. DEFAULT_TEMPLATE writes

  <s><|user|>\\n{content}\\n<|assistant|>\\n{content}</s>\\n<|user|>\\n...

(bos/eos where the tokenizer has them; the role markers are plain text), and its generation prompt
is "\\n<|assistant|>\\n" (just "<|assistant|>\\n" on an empty conversation).

Where the mask comes from: the template's own text, never from tokenizing pieces separately (a
token can span a boundary, and separate pieces would tokenize differently from the whole). For
each trained assistant message i the conversation is rendered up to message i with the generation
prompt and up to and including message i; the characters between the two renderings are that
message's span (its content and whatever the template closes it with: Llama 3's <|eot_id|>,
ChatML's <|im_end|> and newline, the default template's </s>). The whole conversation is then
tokenized once, with character offsets (`encode_with_offsets`), and a token is trained on when
its first character lies in a span. This needs a template whose text for a conversation starts
with its text for every beginning of it (true of Llama, Mistral, ChatML/Qwen2 templates); one that
rewrites earlier turns (e.g. dropping past reasoning) is refused with a ChatError.

A template's special-token strings (bos, eos, ...) become their ids: a Hugging Face tokenizer does
this itself; for SentencePiece the text is cut at the bos/eos strings ("<s>", "</s>"), each piece
between them encoded with offsets, and the strings replaced by their ids (as transformers does for
added tokens; a SentencePiece model that adds a dummy prefix adds one to each such piece).

Truncation: an example longer than max_len tokens keeps its first max_len tokens and is flagged
(`Encoded.truncated`), so a trainer can count it. A row of seq_len (input, target) pairs holds
seq_len + 1 tokens, so jaxlm/posttrain/sft.py passes max_len = seq_len + 1.

Errors (ChatError, naming the message): a role other than system/user/assistant/tool, content that
is not a string, an empty assistant message, no assistant message to train on, a conversation that
starts with an assistant message, a template that fails or is not prefix-stable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence

import jinja2
import numpy as np

from jaxlm.data import chat_template as templates
from jaxlm.data.hf_tokenizer import HFTokenizer
from jaxlm.inference import prompts as prompt_text

ROLES = ("system", "user", "assistant", "tool")
TRAINED_ROLE = "assistant"

# Separators go before a message, not after, so an assistant message's span ends at its eos.
DEFAULT_TEMPLATE = r"""{{ bos_token | default('') }}
{%- for message in messages %}
{%- if not loop.first %}{{ '\n' }}{% endif %}
{{- '<|' + message['role'] + '|>\n' + message['content'] }}
{%- if message['role'] == 'assistant' %}{{ eos_token | default('') }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{% if messages %}{{ '\n' }}{% endif %}{{ '<|assistant|>\n' }}{% endif %}"""


class ChatError(ValueError):
  """A conversation (or prompt/completion pair) cannot be trained on; the message says why."""


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One example as tokens.

  ids: [n] int32 token ids.
  mask: [n] int32, 1 on the tokens the model is trained to produce (assistant / completion).
  truncated: the example had more than max_len tokens and lost its end.
  """
  ids: np.ndarray
  mask: np.ndarray
  truncated: bool = False

  def pairs(self) -> dict[str, np.ndarray]:
    """Next-token pairs, each [n - 1]: weights[i] = mask of targets[i] (the token predicted)."""
    return {"inputs": self.ids[:-1], "targets": self.ids[1:], "weights": self.mask[1:]}

  @property
  def trained_tokens(self) -> int:
    return int(self.mask[1:].sum())


# --- the template and the tokenizer's special tokens ------------------------------------------------


def template_for(tokenizer, chat_template: str = "") -> str:
  """The template text: "" the tokenizer's own (DEFAULT_TEMPLATE when it has none), "default"
  DEFAULT_TEMPLATE, or a path to a Jinja file."""
  if chat_template == "default":
    return DEFAULT_TEMPLATE
  if chat_template:
    if not os.path.isfile(chat_template):
      raise ChatError(f"chat template '{chat_template}' is not a file; give a .jinja file, "
                      "'default' (jaxlm's built-in template) or '' (the tokenizer's own)")
    with open(chat_template, encoding="utf-8") as f:
      return f.read()
  own = getattr(tokenizer, "chat_template", None)
  return templates.pick_template(own) if own else DEFAULT_TEMPLATE


def special_tokens(tokenizer) -> dict[str, str]:
  """{"bos_token": "<s>", ...}: the named special tokens a template may write."""
  if isinstance(tokenizer, HFTokenizer):
    return dict(tokenizer.special_tokens)
  named = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
  return {name: tokenizer.id_to_piece(i) for name, i in named.items() if i is not None and i >= 0}


def encode_text(tokenizer, text: str, specials: Mapping[str, str] | None = None
                ) -> tuple[list[int], list[int]]:
  """(ids, start character of each id) of rendered template text, special-token strings as ids."""
  if isinstance(tokenizer, HFTokenizer):
    ids, offsets = tokenizer.encode_with_offsets(text)
    return list(ids), [start for start, _ in offsets]
  by_text = {}
  for name, token in (specials or {}).items():
    if name in ("bos_token", "eos_token") and token:
      by_text[token] = getattr(tokenizer, name[:-len("_token")] + "_id")
  if not by_text:
    ids, offsets = tokenizer.encode_with_offsets(text)
    return list(ids), [start for start, _ in offsets]
  pattern = re.compile("|".join(re.escape(t) for t in sorted(by_text, key=len, reverse=True)))
  ids, starts, at = [], [], 0
  for match in [*pattern.finditer(text), None]:
    end = len(text) if match is None else match.start()
    if end > at:
      piece_ids, offsets = tokenizer.encode_with_offsets(text[at:end])
      ids.extend(piece_ids)
      starts.extend(at + start for start, _ in offsets)
    if match is not None:
      ids.append(int(by_text[match.group()]))
      starts.append(match.start())
      at = match.end()
  return ids, starts


# --- validation ----------------------------------------------------------------------------------


def check_messages(messages, trained_from: int = 0) -> list[dict]:
  """The messages as plain dicts, or a ChatError naming the first problem.

  trained_from: the first message that may be trained on (the completion of a prompt/completion
  pair); at least one assistant message must come at or after it.
  """
  if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
    raise ChatError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
      raise ChatError(f"message {i} must be an object with 'role' and 'content', got {message!r:.80}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
      raise ChatError(f"message {i} has role {role!r}; use one of {ROLES}")
    if not isinstance(content, str):
      raise ChatError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
    if role == TRAINED_ROLE and not content.strip():
      raise ChatError(f"message {i} is an empty assistant message; there is nothing to train on in "
                      "it: give it content or remove it")
    out.append(dict(message))
  if not any(m["role"] == TRAINED_ROLE for m in out[trained_from:]):
    where = "the conversation" if trained_from == 0 else "the completion"
    raise ChatError(f"{where} has no assistant message, so it has no tokens to train on")
  if out[0]["role"] == TRAINED_ROLE:
    raise ChatError("the conversation starts with an assistant message; put the user (or system) "
                    "message it answers first")
  return out


# --- conversations -----------------------------------------------------------------------------


def _render(template: str, messages, specials, add_generation_prompt: bool = False) -> str:
  try:
    return templates.render(template, messages, add_generation_prompt=add_generation_prompt,
                            special_tokens=specials)
  except jinja2.TemplateError as e:
    raise ChatError(f"the chat template failed on this conversation: {e}") from e


def assistant_spans(template: str, messages, specials, trained: Sequence[int]
                    ) -> tuple[str, list[tuple[int, int]]]:
  """The conversation's text and the [start, end) character span of each trained message."""
  text = _render(template, messages, specials)
  spans = []
  for i in trained:
    before = _render(template, messages[:i], specials, add_generation_prompt=True)
    through = _render(template, messages[:i + 1], specials)
    if not (through.startswith(before) and text.startswith(through)):
      raise ChatError(
          f"the chat template does not write this conversation as a continuation of its beginning "
          f"(at message {i}), so its assistant text cannot be located; use a template whose text "
          "grows message by message (chat_template='default', or a .jinja file)")
    spans.append((len(before), len(through)))
  return text, spans


def _truncate(ids, mask, max_len) -> Encoded:
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
  if max_len is not None and len(ids) > max_len:
    return Encoded(ids[:max_len], mask[:max_len], truncated=True)
  return Encoded(ids, mask)


def encode_chat(tokenizer, messages, *, max_len: int | None = None, chat_template: str = "",
                trained_from: int = 0) -> Encoded:
  """A conversation's ids and its assistant-token mask (see the module docstring).

  trained_from: assistant messages before this index are context, not trained on.
  """
  messages = check_messages(messages, trained_from)
  template = template_for(tokenizer, chat_template)
  specials = special_tokens(tokenizer)
  trained = [i for i, m in enumerate(messages) if m["role"] == TRAINED_ROLE and i >= trained_from]
  text, spans = assistant_spans(template, messages, specials, trained)
  ids, starts = encode_text(tokenizer, text, specials)
  starts = np.asarray(starts, np.int64)
  mask = np.zeros(len(ids), np.int32)
  for start, end in spans:
    mask[(starts >= start) & (starts < end)] = 1
  return _truncate(ids, mask, max_len)


def _special(tokenizer, name: str) -> list[int]:
  token_id = getattr(tokenizer, name)
  return [] if token_id is None or token_id < 0 else [int(token_id)]


def encode_prompt_completion(tokenizer, prompt, completion, *, max_len: int | None = None,
                             chat_template: str = "") -> Encoded:
  """A prompt/completion pair: plain text (both strings) or a chat (both lists of messages)."""
  if isinstance(prompt, str) and isinstance(completion, str):
    if not completion:
      raise ChatError("the completion is empty; there is nothing to train on")
    ids, offsets = tokenizer.encode_with_offsets(prompt + completion)
    starts = np.asarray([start for start, _ in offsets], np.int64)
    bos, eos = _special(tokenizer, "bos_id"), _special(tokenizer, "eos_id")
    mask = [0] * len(bos) + (starts >= len(prompt)).astype(np.int32).tolist() + [1] * len(eos)
    return _truncate([*bos, *ids, *eos], mask, max_len)
  if isinstance(prompt, str) or isinstance(completion, str):
    raise ChatError("prompt and completion must both be strings (plain text) or both lists of "
                    f"messages (a chat); got {type(prompt).__name__} and {type(completion).__name__}")
  if not isinstance(prompt, Sequence) or not isinstance(completion, Sequence) or not completion:
    raise ChatError("a chat prompt/completion pair needs lists of messages, the completion non-empty")
  return encode_chat(tokenizer, [*prompt, *completion], max_len=max_len, chat_template=chat_template,
                     trained_from=len(prompt))


def encode_example(tokenizer, record: Mapping, *, max_len: int | None = None,
                   chat_template: str = "") -> Encoded:
  """{"messages": [...]} or {"prompt": ..., "completion": ...} -> Encoded."""
  if not isinstance(record, Mapping):
    raise ChatError(f"an example must be a JSON object, got {type(record).__name__}")
  if "messages" in record:
    return encode_chat(tokenizer, record["messages"], max_len=max_len, chat_template=chat_template)
  if "prompt" in record and "completion" in record:
    return encode_prompt_completion(tokenizer, record["prompt"], record["completion"],
                                    max_len=max_len, chat_template=chat_template)
  raise ChatError(f"an example needs 'messages', or 'prompt' and 'completion'; it has {sorted(record)}")


def prompt_ids(tokenizer, prompt, chat_template: str = "") -> list[int]:
  """Ids to generate from: [bos] + text for a string, the chat with its generation prompt for a
  list of messages (the prompt a model trained by encode_example continues)."""
  if isinstance(prompt, str):
    return prompt_text.encode(tokenizer, prompt)
  template = template_for(tokenizer, chat_template)
  specials = special_tokens(tokenizer)
  if not isinstance(prompt, Sequence) or not prompt:
    raise ChatError("a chat prompt must be a non-empty list of messages")
  for i, message in enumerate(prompt):
    if not isinstance(message, Mapping) or message.get("role") not in ROLES:
      raise ChatError(f"prompt message {i} needs a role among {ROLES}, got {message!r:.80}")
  text = _render(template, list(prompt), specials, add_generation_prompt=True)
  return encode_text(tokenizer, text, specials)[0]


# --- files ---------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[tuple[int, dict]]:
  """(line number, object) for each non-blank line; ChatError naming the file and line otherwise."""
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ChatError(f"{path}:{lineno} is not valid JSON: {e}") from e
      if not isinstance(record, dict):
        raise ChatError(f"{path}:{lineno} is a JSON {type(record).__name__}, not an object")
      out.append((lineno, record))
  if not out:
    raise ChatError(f"{path} holds no examples")
  return out
