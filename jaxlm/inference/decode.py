"""Autoregressive generation with a KV cache: one jitted program per (model, shapes, sampling setting).

`generate` prefills the whole prompt in one model call, then decodes one token per step inside a
`lax.scan`, so the Python loop never runs per token and the program compiles once per prompt
length and `max_new_tokens`.

Conventions:
  * Prompts in a batch have equal length (no left padding): pad or batch by length upstream.
  * After a row emits `eos_id` it keeps emitting `eos_id` (not a separate pad id), so the first
    eos marks the end and everything after it is eos; `output_lengths` counts the real tokens.
  * The generated sequence (prompt + new tokens) must fit in model.max_seq_len.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.inference.sampling import sample_token


def check_length(max_seq_len: int, prompt_len: int, max_new_tokens: int) -> None:
  """Raises a ValueError naming model.max_seq_len when the sequence would not fit.

  The cache (and learned positions) only cover max_seq_len slots; past them XLA would silently
  clamp the cache writes instead of failing, so we refuse up front.
  """
  if prompt_len < 1:
    raise ValueError("the prompt must hold at least one token (e.g. the tokenizer's bos)")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  total = prompt_len + max_new_tokens
  if total > max_seq_len:
    raise ValueError(
        f"prompt length ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
        f"model.max_seq_len ({max_seq_len}); shorten the prompt or lower max_new_tokens")


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "min_p"))
def _generate(graphdef, params, prompt, key, eos_id, *, max_new_tokens, temperature, top_k, top_p,
              min_p):
  """prompt: [batch, p] int32 -> [batch, max_new_tokens] int32 (max_new_tokens >= 1).

  eos_id is a traced int32 scalar (-1: none, it never matches a token), so changing it does not
  recompile.
  """
  model = nnx.merge(graphdef, params)
  batch, p = prompt.shape
  sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p)
  keys = jax.random.split(key, max_new_tokens)  # one per new token

  cache = model.init_cache(batch, p + max_new_tokens)
  logits, cache = model(prompt, cache=cache)  # [batch, p, vocab]
  first = sample(keys[0], logits[:, -1])  # [batch]
  done = first == eos_id  # [batch]

  def step(carry, step_key):
    """Feeds the previous token, samples the next; rows that are done repeat eos."""
    cache, token, done = carry
    logits, cache = model(token[:, None], cache=cache)  # [batch, 1, vocab]
    token = jnp.where(done, eos_id, sample(step_key, logits[:, 0]))  # [batch]
    done = done | (token == eos_id)
    return (cache, token, done), token

  _, rest = jax.lax.scan(step, (cache, first, done), keys[1:])  # rest: [max_new_tokens - 1, batch]
  return jnp.concatenate([first[:, None], rest.T], axis=1).astype(jnp.int32)


def generate(graphdef, params, prompt, *, max_new_tokens: int, key, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, eos_id: int | None = None):
  """Continues each prompt row; returns the new tokens only, [batch, max_new_tokens] int32.

  prompt: [batch, p] int32, all rows the same length p >= 1. temperature 0 is greedy (key may
  be None). With eos_id, a row that has emitted eos emits eos for the rest of its tokens. Sampling
  settings are static (each new setting compiles once); eos_id is not. Raises ValueError when
  p + max_new_tokens exceeds model.max_seq_len.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, length] int32, got shape {prompt.shape}")
  cfg = nnx.merge(graphdef, params).cfg  # cheap: wraps the arrays, copies nothing
  check_length(cfg.max_seq_len, prompt.shape[1], max_new_tokens)
  if max_new_tokens == 0:
    return jnp.zeros((prompt.shape[0], 0), jnp.int32)
  if key is None:
    if temperature != 0:
      raise ValueError("sampling (temperature > 0) needs a PRNG key")
    key = jax.random.key(0)  # unused by greedy decoding, but the program takes one
  eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
  return _generate(
      graphdef, params, prompt, key, eos, max_new_tokens=int(max_new_tokens),
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p))


def output_lengths(tokens, eos_id: int | None):
  """tokens: [batch, n] from `generate` -> [batch] int32: tokens up to and including the first eos."""
  tokens = np.asarray(tokens)
  n = tokens.shape[1]
  if eos_id is None:
    return np.full(tokens.shape[0], n, np.int32)
  is_eos = tokens == eos_id
  return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, n).astype(np.int32)


def _valid_id(token_id) -> int | None:
  """Tokenizers signal a missing bos/eos with None or a negative id (SentencePiece: -1)."""
  return None if token_id is None or token_id < 0 else int(token_id)


def generate_text(model_or_graphdef_params, tokenizer, prompt: str, sample_cfg, key) -> str:
  """Samples a continuation of `prompt` and returns it as text (the prompt itself is not included).

  model_or_graphdef_params: an nnx.Module or a (graphdef, params) pair. The prompt is encoded as
  [bos] + encode(prompt); sample_cfg holds max_new_tokens, temperature, top_k, top_p, min_p
  (the config's `sample` section); generation stops at the tokenizer's eos, which is not decoded.
  """
  if isinstance(model_or_graphdef_params, nnx.Module):
    graphdef, params = nnx.split(model_or_graphdef_params)
  else:
    graphdef, params = model_or_graphdef_params
  bos, eos = _valid_id(tokenizer.bos_id), _valid_id(tokenizer.eos_id)
  prompt_ids = ([] if bos is None else [bos]) + list(tokenizer.encode(prompt))
  tokens = generate(
      graphdef, params, np.asarray([prompt_ids], np.int32), max_new_tokens=sample_cfg.max_new_tokens,
      key=key, temperature=sample_cfg.temperature, top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
      min_p=sample_cfg.min_p, eos_id=eos)
  new_ids = [int(t) for t in np.asarray(tokens)[0]]
  if eos is not None and eos in new_ids:
    new_ids = new_ids[:new_ids.index(eos)]
  # Decode prompt and continuation together: tokenizers like SentencePiece drop a leading space
  # when decoding a piece on its own, which would glue the continuation to the prompt.
  head = tokenizer.decode(prompt_ids)
  full = tokenizer.decode(prompt_ids + new_ids)
  return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)
