"""Autoregressive generation with a KV cache: batches of prompts of any lengths, each row on its own.

`generate_batch` prefills every prompt in one model call (rows right-padded to a bucketed width),
then decodes one token per step inside a `lax.while_loop` that ends when every row is done, so
Python never runs per token. Each row of the KV cache has its own write index, so rows of
different lengths need no left padding and keep their true positions; a row is done at eos, at
the end of a stop sequence, or at its own max_new_tokens. Prompt width, batch and step count are
bucketed, so a stream of requests compiles a handful of programs.

`generate` is the rectangular special case ([batch, p] in, [batch, max_new_tokens] out).
The generated sequence (prompt + new tokens) of every row must fit in model.max_seq_len.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import base_config, parse_rules
from jaxlm.inference.sampling import sample_token
from jaxlm.parallel.rules import axis_rules, partition_spec


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


@dataclasses.dataclass(frozen=True)
class Completions:
  """What `generate_batch` returns, one entry per prompt, in the prompts' order.

  tokens[i]: the new tokens of row i ([n_i] int32), up to and including the eos or the last token
    of the stop sequence that ended it.
  logprobs[i]: [n_i] float32, log p(token) under the model's own distribution (its logits at
    temperature 1, before any filter), which is what policy-gradient losses compare against.
  finish[i]: "eos" | "stop" | "length" (max_new_tokens reached).
  """
  tokens: list
  logprobs: list
  finish: list


FINISH = ("length", "eos", "stop")  # finish codes of the compiled program, by index


def bucket(n: int, minimum: int = 8, multiple: int = 1) -> int:
  """n rounded up to a power of two (at least `minimum`), then to a multiple of `multiple`: a stream
  of requests of varied sizes compiles a handful of programs, not one per size."""
  size = max(minimum, 1 << max(n - 1, 0).bit_length())
  return -(-size // multiple) * multiple


def stop_matrix(stop_sequences) -> np.ndarray:
  """[n_stop, longest] int32, each sequence right-aligned and left-padded with -1 (matches anything);
  at least one row (all -1 never matches: see `_ends_with_stop`)."""
  stops = [list(s) for s in stop_sequences]
  if any(not s for s in stops):
    raise ValueError("a stop sequence is empty; give at least one token id per stop sequence")
  width = max([len(s) for s in stops], default=1)
  out = np.full((max(len(stops), 1), width), -1, np.int32)
  for i, s in enumerate(stops):
    out[i, width - len(s):] = s
  return out


def _ends_with_stop(recent, stops):
  """recent: [batch, L] the last L new tokens (-2 before the first); stops: [n, L] -> [batch] bool."""
  real = stops >= 0  # [n, L]
  hit = (recent[:, None, :] == stops[None]) | ~real[None]  # [batch, n, L]
  return jnp.any(jnp.all(hit, axis=-1) & real.any(-1)[None], axis=-1)


class Rows(NamedTuple):
  """Per-row output of a decoding program while it runs (batch rows, width = most new tokens)."""
  out: jax.Array  # [batch, width] int32 new tokens
  logp: jax.Array  # [batch, width] float32 their log-probabilities
  count: jax.Array  # [batch] int32 tokens emitted so far
  recent: jax.Array  # [batch, L] the last L emitted tokens, for stop sequences (-2: none yet)
  finish: jax.Array  # [batch] int32 index into FINISH, -1 while running
  done: jax.Array  # [batch] bool

  @classmethod
  def start(cls, batch: int, width: int, stop_width: int, limits):
    return cls(jnp.zeros((batch, width), jnp.int32), jnp.zeros((batch, width), jnp.float32),
               jnp.zeros((batch,), jnp.int32), jnp.full((batch, stop_width), -2, jnp.int32),
               jnp.full((batch,), -1, jnp.int32), limits <= 0)

  def record(self, token, logp, valid, limits, stops, eos_id) -> "Rows":
    """Appends token [batch] (with its log-prob) to each row where `valid` and the row is not done,
    then ends rows that hit eos, a stop sequence or their limit."""
    take = valid & ~self.done
    rows = jnp.arange(token.shape[0])
    at = jnp.minimum(self.count, self.out.shape[1] - 1)
    out = self.out.at[rows, at].set(jnp.where(take, token, self.out[rows, at]))
    lp = self.logp.at[rows, at].set(jnp.where(take, logp, self.logp[rows, at]))
    count = self.count + take
    shifted = jnp.concatenate([self.recent[:, 1:], token[:, None]], 1)
    recent = jnp.where(take[:, None], shifted, self.recent)
    code = jnp.where(token == eos_id, 1, jnp.where(_ends_with_stop(recent, stops), 2,
                                                    jnp.where(count >= limits, 0, -1)))
    finish = jnp.where(take, code, self.finish)
    return Rows(out, lp, count, recent, finish, self.done | (finish >= 0))


def token_logprob(logits, token):
  """logits: [batch, vocab], token: [batch] -> [batch] float32 log softmax(logits)[token]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]


def prefill(model, prompts, lengths, cache_len):
  """Writes right-padded prompts [batch, P] into a fresh cache; returns (each row's next-token
  logits [batch, vocab], the cache with row b's index at lengths[b]).

  Row b's padding lands at slots >= lengths[b] and is overwritten by its own new tokens before
  any query can see it (a query at slot s sees slots <= s)."""
  cache = model.init_cache(prompts.shape[0], cache_len)
  logits, cache = model(prompts, cache=cache)  # [batch, P, vocab]
  cache["index"] = lengths
  return logits[jnp.arange(prompts.shape[0]), lengths - 1], cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "steps", "cache_len", "temperature", "top_k", "top_p", "min_p",
                     "mesh", "rules"))
def _decode(graphdef, params, prompts, lengths, limits, stops, key, eos_id, *, steps, cache_len,
            temperature, top_k, top_p, min_p, mesh, rules):
  """prompts: [batch, P] right-padded, lengths/limits: [batch] -> Rows after decoding.

  The loop stops as soon as every row is done. eos_id is traced (-1: none), so changing it never
  recompiles.
  """
  with axis_rules(rules, mesh) if mesh is not None else contextlib.nullcontext():
    model = nnx.merge(graphdef, params)
    sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p,
                               min_p=min_p)
    last, cache = prefill(model, prompts, lengths, cache_len)

    def emit(i, rows, logits):
      token = sample(jax.random.fold_in(key, i), logits)  # [batch]
      return rows.record(token, token_logprob(logits, token), True, limits, stops, eos_id)

    rows = emit(0, Rows.start(prompts.shape[0], steps, stops.shape[1], limits), last)

    def feed_and_emit(state):
      i, cache, rows = state
      token = rows.out[jnp.arange(rows.out.shape[0]), jnp.maximum(rows.count - 1, 0)]
      logits, cache = model(token[:, None], cache=cache)  # [batch, 1, vocab]
      return i + 1, cache, emit(i, rows, logits[:, 0])

    def live(state):
      return (state[0] < steps) & ~jnp.all(state[2].done)

    return jax.lax.while_loop(live, feed_and_emit, (jnp.int32(1), cache, rows))[2]


@dataclasses.dataclass(frozen=True)
class Batch:
  """Prompts laid out for a decoding program: right-padded to a bucketed width, rows bucketed."""
  prompts: jax.Array  # [rows, width] int32
  lengths: jax.Array  # [rows] int32 (padding rows: 1)
  limits: jax.Array  # [rows] int32 max new tokens (padding rows: 0, done from the start)
  n: int  # real rows, the first n
  width: int  # bucketed prompt width
  steps: int  # bucketed most new tokens of any row
  rules: tuple | None  # the rules table in use with a mesh


def prepare_batch(prompts, max_new_tokens, max_seq_len: int, mesh=None, rules=None) -> Batch:
  """Checks and lays out a request (see `generate_batch`); rows go over the mesh's batch axes."""
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts:
    raise ValueError("no prompts given")
  limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (len(prompts),)).copy()
  for p, n in zip(prompts, limits):
    check_length(max_seq_len, len(p), int(n))
  rows_multiple = 1
  if mesh is not None:
    rules = parse_rules(base_config().mesh.rules) if rules is None else tuple(rules)
    rows_multiple = math.prod(mesh.shape[a] for a in (dict(rules).get("batch") or ()))
  rows = bucket(len(prompts), 1, rows_multiple)
  width = min(bucket(max(len(p) for p in prompts)), max_seq_len)
  padded = np.zeros((rows, width), np.int32)
  lengths = np.ones((rows,), np.int32)
  row_limits = np.zeros((rows,), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)], lengths[i], row_limits[i] = p, len(p), limits[i]
  arrays = [padded, lengths, row_limits]
  if mesh is not None:
    arrays = [jax.device_put(x, jax.sharding.NamedSharding(
        mesh, partition_spec(("batch",) + (None,) * (x.ndim - 1), rules, x.shape, mesh)))
              for x in arrays]
  steps = min(bucket(int(limits.max()), 1), max_seq_len)
  return Batch(*arrays, n=len(prompts), width=width, steps=steps,
               rules=None if mesh is None else rules)


def generate_batch(graphdef, params, prompts, *, max_new_tokens, key=None, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   eos_id: int | None = None, stop_sequences=(), mesh=None,
                   rules=None) -> Completions:
  """Continues prompts of any lengths in one batch; each row stops on its own.

  prompts: a list of token-id lists (each >= 1 token). max_new_tokens: an int for every row or one
  per row. A row ends at eos_id, at the end of any of `stop_sequences` (token-id lists, matched
  against its new tokens), or at its max_new_tokens. temperature 0 is greedy (key may be None).
  mesh, rules: run under that mesh with the rules table (jaxlm.config.parse_rules) placing the
  batch, KV cache and activations; params should already be in their shardings on it.
  Prompt length, batch size and the number of steps are bucketed (see `bucket`), so the compiled
  program is reused across requests of similar sizes. Raises ValueError when a row's prompt plus
  its max_new_tokens exceeds model.max_seq_len.
  """
  if temperature != 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key")
  batch, args, kwargs = _decode_call(graphdef, params, prompts, max_new_tokens, key, temperature,
                                     top_k, top_p, min_p, eos_id, stop_sequences, mesh, rules)
  return completions(_decode(*args, **kwargs), batch.n)


def lower_decoding(graphdef, params, prompts, *, max_new_tokens, mesh=None, rules=None):
  """The greedy decoding program `generate_batch` runs for these prompts, lowered (not run):
  `.compile().as_text()` shows its optimized HLO, `.compile().memory_analysis()` its memory."""
  _, args, kwargs = _decode_call(graphdef, params, prompts, max_new_tokens, None, 0.0, 0, 1.0, 0.0,
                                 None, (), mesh, rules)
  return _decode.lower(*args, **kwargs)


def _decode_call(graphdef, params, prompts, max_new_tokens, key, temperature, top_k, top_p, min_p,
                 eos_id, stop_sequences, mesh, rules):
  """(Batch, positional and keyword arguments of _decode) for a generate_batch request."""
  cfg = nnx.merge(graphdef, params).cfg  # cheap: wraps the arrays, copies nothing
  batch = prepare_batch(prompts, max_new_tokens, cfg.max_seq_len, mesh, rules)
  args = (graphdef, params, batch.prompts, batch.lengths, batch.limits,
          jnp.asarray(stop_matrix(stop_sequences)), jax.random.key(0) if key is None else key,
          jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32))
  kwargs = dict(steps=batch.steps, cache_len=min(batch.width + batch.steps, cfg.max_seq_len),
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                min_p=float(min_p), mesh=mesh, rules=batch.rules)
  return batch, args, kwargs


def compiled_programs() -> int:
  """How many decoding programs `generate_batch` has compiled in this process (bucketing keeps
  this to a handful for a stream of requests)."""
  return _decode._cache_size()


def completions(rows: Rows, n: int) -> Completions:
  """The first n rows of a finished decoding program as numpy, each cut to its own length."""
  out, logp, count, finish = (np.asarray(x) for x in (rows.out, rows.logp, rows.count, rows.finish))
  return Completions(tokens=[out[i, :count[i]] for i in range(n)],
                     logprobs=[logp[i, :count[i]] for i in range(n)],
                     finish=[FINISH[finish[i]] for i in range(n)])


def generate(graphdef, params, prompt, *, max_new_tokens: int, key, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, eos_id: int | None = None):
  """Continues each prompt row; returns the new tokens only, [batch, max_new_tokens] int32.

  prompt: [batch, p] int32, every row p >= 1 tokens (for rows of different lengths use
  `generate_batch`). temperature 0 is greedy (key may be None). With eos_id, a row that has
  emitted eos is eos for the rest of its tokens. Raises ValueError when p + max_new_tokens exceeds
  model.max_seq_len.
  """
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, length] int32, got shape {prompt.shape}")
  if max_new_tokens == 0:
    cfg = nnx.merge(graphdef, params).cfg
    check_length(cfg.max_seq_len, prompt.shape[1], 0)
    return jnp.zeros((prompt.shape[0], 0), jnp.int32)
  done = generate_batch(graphdef, params, list(prompt), max_new_tokens=max_new_tokens, key=key,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        eos_id=eos_id)
  out = np.full((prompt.shape[0], max_new_tokens), -1 if eos_id is None else eos_id, np.int32)
  for i, row in enumerate(done.tokens):
    out[i, :len(row)] = row
  return jnp.asarray(out)


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
