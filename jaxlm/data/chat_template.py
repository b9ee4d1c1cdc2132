"""Chat templates: a model's Jinja template turned into the text transformers' apply_chat_template makes.

A template comes from the model's files (tokenizer_config.json's "chat_template", or
chat_template.jinja, which transformers 5 writes) and is untrusted code, so it runs in Jinja's
immutable sandbox. What it can see is what transformers gives it, so the same template renders the
same text here:
  - the environment: trim_blocks and lstrip_blocks on (a block tag's own line leaves no blank line
    or indentation behind), the `loopcontrols` extension ({% break %}, {% continue %}), and a
    `{% generation %}` tag (transformers uses it to find assistant text; here it renders its body);
  - globals raise_exception(message), strftime_now(format) (today's date in the local time zone),
    dict(...) and namespace(...) (neither lets a template reach attributes starting with "_");
  - the `tojson` filter as json.dumps (no HTML escaping; ensure_ascii, indent, separators and
    sort_keys may be passed);
  - variables: messages, tools, documents, add_generation_prompt, the tokenizer's named special
    tokens (bos_token, eos_token, ...: those that are set) and any extra keyword arguments.
Messages are copied to plain data first: keys whose value is None are dropped (templates test for
missing keys, not None), and reasoning given as "reasoning_content", "thinking" or "reasoning" is
offered under the first two names, as transformers 5 does.

Not supported: tools given as Python functions (pass their JSON schemas), continue_final_message,
and assistant-token masks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning arrives under; templates read the first (and gpt-oss's the second).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(Extension):
  """`{% generation %}...{% endgeneration %}`: renders its body unchanged."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

  def _render_body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.now().strftime(fmt)


class _DictMaker:
  """`dict(a=1)` and `dict.fromkeys(...)` in a template, without handing it the dict type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """Jinja's namespace, refusing attribute names that start with "_" (a way into Python internals)."""

  def __init__(*args, **kwargs):  # self is args[0], so namespace(self=...) stays a plain attribute
    self, rest = args[0], args[1:]
    attrs = dict(*rest, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"a chat template may not set namespace attribute {name!r} (names starting with '_')")


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
  """The template compiled in the sandbox (cached: a tokenizer renders the same one many times)."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationTag, loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                     dict=_DictMaker(), namespace=_Namespace)
  return env.from_string(source)


def _plain(value: Any) -> Any:
  """value rebuilt from JSON types (str, int, float, bool, None, dict, list, tuple): a template
  never gets an object whose methods the sandbox does not know; anything else becomes "<TypeName>"."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return _plain(value.item())  # np.bool_(False) must stay falsy
  return f"<{type(value).__name__}>"


def _message(message: Any) -> dict:
  if not isinstance(message, Mapping):
    raise TypeError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
  out = {k: _plain(v) for k, v in message.items() if v is not None}
  reasoning = next((out[k] for k in _REASONING_KEYS if out.get(k) is not None), None)
  if reasoning is not None:
    out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
  return out


def render(template: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
           tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
           special_tokens: Mapping[str, str] | None = None, **kwargs) -> str:
  """The text `template` makes of one conversation.

  messages: [{"role": ..., "content": ...}, ...]; tools: JSON schemas; documents: dicts (e.g.
  "title", "text"); special_tokens: {"bos_token": "<s>", ...}, offered to the template with
  kwargs on top (a keyword argument wins over a special token of the same name).
  """
  if not messages:
    raise ValueError("a chat needs at least one message")
  if tools is not None:
    for tool in tools:
      if not isinstance(tool, Mapping):
        raise TypeError(f"tools must be JSON schemas (dicts); got {type(tool).__name__}: describe "
                        "a Python function as {'type': 'function', 'function': {...}} first")
  if documents is not None:
    for doc in documents:
      if not isinstance(doc, Mapping):
        raise TypeError("documents must be dicts, e.g. {'title': ..., 'text': ...}")
  variables = _plain({**(special_tokens or {}), **kwargs})
  return compile_template(template).render(
      messages=[_message(m) for m in messages], tools=_plain(tools), documents=_plain(documents),
      add_generation_prompt=add_generation_prompt, **variables)


def pick_template(templates: str | Mapping[str, str] | None, name: str | None = None,
                  tools=None) -> str:
  """The template to use, as transformers picks it.

  templates: the tokenizer's one template, or {name: template} when it has several ("default",
  "tool_use", ...). name: a template's name, or a template's own text; None: the default one (the
  "tool_use" one when tools are given and it exists).
  """
  if isinstance(templates, Mapping):
    if name is not None:
      return templates.get(name, name)
    if tools is not None and "tool_use" in templates:
      return templates["tool_use"]
    if "default" in templates:
      return templates["default"]
    raise ValueError(f"this tokenizer has several chat templates and none is named 'default'; "
                     f"pass chat_template= one of {sorted(templates)}")
  if name is not None:
    return name
  if templates is None:
    raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or "
                     "chat_template.jinja); pass chat_template= the template text")
  return templates
