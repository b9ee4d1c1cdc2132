"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one call.

Each round, for every row: the draft decodes k tokens d_1..d_k one at a time (sampling from its own
distribution q; k draft calls a round); the target runs once over [last token, d_1..d_k] and gives its distributions
p_1..p_{k+1}. Draft token d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)) until the
first rejection; at the first rejected position the row samples from max(p - q, 0) (normalized),
and when all k are accepted it samples a bonus token from p_{k+1}. A round so emits 1 to k + 1
tokens, and the emitted tokens are distributed exactly as the target's own samples (Leviathan et
al., 2023; Chen et al., 2023). Greedy decoding is the same rule with one-hot p and q: a draft token
is kept iff it is the target's argmax, so the output equals the target's greedy output.

Both models keep a KV cache with a write index per row; a rejected token's cache entries are left
where they are and overwritten next round (a query at slot s only sees slots <= s), so rows that
accept different numbers of tokens simply move their indices by different amounts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.inference.decode import (Completions, Rows, completions, prefill, prepare_batch,
                                    stop_matrix, token_logprob)
from jaxlm.inference.sampling import filter_logits
from jaxlm.models.transformer import padded_vocab_size
from jaxlm.parallel.rules import axis_rules


def distribution(logits, temperature: float, top_k: int, top_p: float, min_p: float):
  """logits: [..., vocab] -> the probabilities a token is sampled with (one-hot argmax at
  temperature 0), float32."""
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
  flat = logits.reshape(-1, logits.shape[-1]) / temperature
  return jax.nn.softmax(filter_logits(flat, top_k, top_p, min_p), -1).reshape(logits.shape)


def accept(p, q, drafts, u):
  """The standard rule. p: [batch, k + 1, vocab] target, q: [batch, k, vocab] draft distributions;
  drafts: [batch, k] the draft's tokens; u: [batch, k] uniform in [0, 1).

  Returns (accepted [batch] int32: leading draft tokens kept, next [batch, vocab]: the distribution
  the row's next token is drawn from: the residual max(p - q, 0) where the first draft token was
  rejected, p_{k+1} when none was)."""
  k = drafts.shape[1]
  p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], -1)[..., 0]  # [batch, k]
  q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
  keep = u * q_d < p_d  # u < p/q without dividing by a zero q; at q = p = one-hot: kept
  accepted = jnp.sum(jnp.cumprod(keep, axis=1), axis=1).astype(jnp.int32)
  rows = jnp.arange(p.shape[0])
  q_next = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], 1)[rows, accepted]  # zeros: bonus token
  residual = jnp.maximum(p[rows, accepted] - q_next, 0.0)
  return accepted, residual / jnp.sum(residual, -1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Stats:
  """How the draft did: rounds run, draft tokens proposed and accepted (rows still running)."""
  rounds: int
  proposed: int
  accepted: int

  @property
  def acceptance(self) -> float:
    return self.accepted / max(self.proposed, 1)


@functools.partial(
    jax.jit,
    static_argnames=("target_def", "draft_def", "k", "steps", "cache_len", "sampling", "mesh",
                     "rules", "rule"))
def _speculate(target_def, target_params, draft_def, draft_params, prompts, lengths, limits, stops,
               key, eos_id, *, k, steps, cache_len, sampling, mesh, rules, rule):
  """-> (Rows, [rounds, proposed, accepted] int32). sampling: (temperature, top_k, top_p, min_p)."""
  with axis_rules(rules, mesh) if mesh is not None else contextlib.nullcontext():
    target, draft = nnx.merge(target_def, target_params), nnx.merge(draft_def, draft_params)
    dist = functools.partial(distribution, **dict(zip(("temperature", "top_k", "top_p", "min_p"),
                                                      sampling)))
    batch = prompts.shape[0]
    last, cache_t = prefill(target, prompts, lengths, cache_len)
    _, cache_d = prefill(draft, prompts, lengths, cache_len)

    greedy = sampling[0] == 0  # argmax comparisons only: no distributions over the vocabulary

    def draw(key, probs):  # probs: [batch, vocab] -> [batch] int32
      return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)

    def pick(key, logits):  # the next token from logits [batch, vocab], and its distribution
      if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32), None
      probs = dist(logits)
      return draw(key, probs), probs

    first, _ = pick(jax.random.fold_in(key, 0), last)
    rows = Rows.start(batch, steps, stops.shape[1], limits).record(
        first, token_logprob(last, first), True, limits, stops, eos_id)

    def one_round(state):
      r, cache_t, cache_d, rows, counts = state
      keys = jax.random.split(jax.random.fold_in(key, r), 3)
      base = cache_t["index"]  # [batch]: the current token `cur` goes here in both caches
      rows_i = jnp.arange(batch)
      cur = rows.out[rows_i, jnp.maximum(rows.count - 1, 0)]
      # The token before cur (the prompt's last on the first round). The draft never saw it when the
      # previous round kept all k drafts (it fed d_1..d_{k-1} only), so every round's first draft
      # call feeds [prev, cur] at base - 1: one call instead of a k + 1-th each round.
      prev = jnp.where(rows.count >= 2, rows.out[rows_i, jnp.maximum(rows.count - 2, 0)],
                       prompts[rows_i, lengths - 1])
      cache_d["index"] = base - 1
      logits, cache_d = draft(jnp.stack([prev, cur], 1), cache=cache_d)
      d1, q1 = pick(jax.random.fold_in(keys[0], 0), logits[:, 1])  # q1: [batch, vocab] or None

      def draft_step(carry, j):  # feeds d_j, samples d_{j+1}
        cache_d, token = carry
        logits, cache_d = draft(token[:, None], cache=cache_d)
        nxt, q = pick(jax.random.fold_in(keys[0], j), logits[:, 0])
        return (cache_d, nxt), (nxt, q)

      (cache_d, _), (rest, q_rest) = jax.lax.scan(draft_step, (cache_d, d1), jnp.arange(1, k))
      drafts = jnp.concatenate([d1[:, None], rest.T], 1)  # [batch, k]
      logits, cache_t = target(jnp.concatenate([cur[:, None], drafts], 1), cache=cache_t)
      if greedy:  # keep drafts while they are the target's argmax; then the target's own argmax
        best = jnp.argmax(logits, -1).astype(jnp.int32)  # [batch, k + 1]
        keep = (drafts == best[:, :k]).astype(jnp.int32)
        accepted = jnp.sum(jnp.cumprod(keep, axis=1), axis=1)
        bonus = best[rows_i, accepted]
      else:
        q = jnp.concatenate([q1[:, None], q_rest.transpose(1, 0, 2)], 1)  # [batch, k, vocab]
        u = jax.random.uniform(keys[1], drafts.shape)
        accepted, nxt = rule(dist(logits), q, drafts, u)  # logits: [batch, k + 1, vocab]
        bonus = draw(keys[2], nxt)
      live = ~rows.done
      # the round's tokens: d_1..d_accepted, then the drawn one (later slots are not emitted)
      slot = jnp.arange(k + 1)[None]  # [1, k + 1]
      tokens = jnp.where(slot < accepted[:, None], jnp.concatenate([drafts, drafts[:, -1:]], 1),
                         bonus[:, None])  # [batch, k + 1]
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                                 tokens[..., None], -1)[..., 0]  # one pass over the vocabulary
      for j in range(k + 1):
        rows = rows.record(tokens[:, j], logp[:, j], j <= accepted, limits, stops, eos_id)
      cache_t["index"] = cache_d["index"] = base + accepted + 1
      counts = counts + jnp.stack([1, k * jnp.sum(live), jnp.sum(jnp.where(live, accepted, 0))])
      return r + 1, cache_t, cache_d, rows, counts

    def running(state):
      return (state[0] <= steps) & ~jnp.all(state[3].done)

    state = (jnp.int32(1), cache_t, cache_d, rows, jnp.zeros((3,), jnp.int32))
    _, _, _, rows, counts = jax.lax.while_loop(running, one_round, state)
    return rows, counts


def speculative_batch(target, draft, prompts, *, k: int, max_new_tokens, key=None,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0, eos_id: int | None = None, stop_sequences=(), mesh=None,
                      rules=None, rule=accept) -> tuple[Completions, Stats]:
  """`generate_batch` (same arguments and results) with a draft model proposing k tokens a round.

  target, draft: (graphdef, params) pairs sharing one tokenizer (the same vocabulary). rule: the
  acceptance rule when sampling (`accept`, the one that keeps the target's distribution); a function
  of the same signature lets other rules be studied. Greedy decoding (temperature 0) compares
  argmaxes directly, which is the same rule with one-hot distributions.
  """
  (target_def, target_params), (draft_def, draft_params) = target, draft
  t_cfg, d_cfg = nnx.merge(*target).cfg, nnx.merge(*draft).cfg
  if (t_cfg.vocab_size, padded_vocab_size(t_cfg)) != (d_cfg.vocab_size, padded_vocab_size(d_cfg)):
    raise ValueError(
        f"the draft's vocabulary ({d_cfg.vocab_size} ids) differs from the target's "
        f"({t_cfg.vocab_size}); the draft must share the target's tokenizer")
  if k < 1:
    raise ValueError(f"k (draft tokens a round) must be >= 1, got {k}")
  if temperature != 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key")
  max_len = min(t_cfg.max_seq_len, d_cfg.max_seq_len)
  batch = prepare_batch(prompts, max_new_tokens, max_len, mesh, rules)
  rows, counts = _speculate(
      target_def, target_params, draft_def, draft_params, batch.prompts, batch.lengths,
      batch.limits, jnp.asarray(stop_matrix(stop_sequences)),
      jax.random.key(0) if key is None else key,
      jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32), k=int(k), steps=batch.steps,
      # a round writes k + 1 entries past the last kept token, even when the row ends inside it
      cache_len=batch.width + batch.steps + k + 1,
      sampling=(float(temperature), int(top_k), float(top_p), float(min_p)), mesh=mesh,
      rules=batch.rules, rule=rule)
  rounds, proposed, accepted = (int(x) for x in counts)
  return completions(rows, batch.n), Stats(rounds, proposed, accepted)
