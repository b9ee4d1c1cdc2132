"""The host side of a rollout: which prompts a step samples, and the rows the learner trains on.

Pure numpy, no model: `step_prompts` picks the prompts of rollout r (from train.seed and r alone,
so a resumed run samples exactly what an uninterrupted one would), `completion_texts` turns sampled
ids into the text rewards grade, and `build_rows` lays prompt + completion out as one row each in
the trainer's format, with weights 1 on exactly the completion's tokens (as targets) and the
sampling log-probs beside them. Row layout, for a prompt of p tokens and a completion of n:
  tokens   = prompt + completion                       (p + n ids)
  inputs   = tokens[:-1], targets = tokens[1:]         (p + n - 1 positions, then padding)
  weights  = 1 at positions p - 1 .. p + n - 2         (the targets that are completion tokens)
so per-token values [rows, seq_len] (log-probs, advantages, values) sit at the target they score.
"""

from __future__ import annotations

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.inference import prompts as prompt_text

ROW_FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")


def step_prompts(n_records: int, per_step: int, seed: int, rollout: int) -> np.ndarray:
  """Record indices of rollout `rollout` (1-based): consecutive slices of a permutation of the
  records that is redrawn every epoch from (seed, epoch). [per_step] int64."""
  if n_records < 1:
    raise ValueError("no records to sample prompts from")
  first = (rollout - 1) * per_step
  flat = np.arange(first, first + per_step)
  out = np.empty(per_step, np.int64)
  for epoch in np.unique(flat // n_records):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(n_records)
    here = flat // n_records == epoch
    out[here] = perm[flat[here] % n_records]
  return out


def check_lengths(prompt_ids: list, max_new_tokens: int, seq_len: int) -> None:
  """ConfigError when the longest prompt plus max_new_tokens does not fit a row of seq_len."""
  longest = max(len(p) for p in prompt_ids)
  if longest + max_new_tokens - 1 > seq_len:
    raise ConfigError(
        f"the longest prompt ({longest} tokens) plus posttrain.max_new_tokens ({max_new_tokens}) "
        f"needs rows of {longest + max_new_tokens - 1} positions, but data.seq_len is {seq_len}; "
        "raise data.seq_len (up to model.max_seq_len) or lower posttrain.max_new_tokens")


def completion_texts(tokenizer, prompt_ids: list, tokens: list, finish: list) -> list[str]:
  """The text each completion adds to its prompt; an eos that ended it is not decoded."""
  out = []
  for p, t, f in zip(prompt_ids, tokens, finish):
    ids = list(t[:-1]) if f == "eos" else list(t)
    out.append(prompt_text.decode_new(tokenizer, p, ids))
  return out


def build_rows(prompt_ids: list, tokens: list, logprobs: list, seq_len: int) -> dict:
  """One row per (prompt, completion): the trainer's int32 features [rows, seq_len] plus
  "sample_logprobs" float32 [rows, seq_len] (the sampler's log-prob of each completion token, at
  its target position; 0 elsewhere)."""
  rows = len(prompt_ids)
  batch = {k: np.zeros((rows, seq_len), np.int32) for k in ROW_FEATURES}
  batch["sample_logprobs"] = np.zeros((rows, seq_len), np.float32)
  for i, (p, t, lp) in enumerate(zip(prompt_ids, tokens, logprobs)):
    seq = np.concatenate([np.asarray(p, np.int32), np.asarray(t, np.int32)])
    n = len(seq) - 1  # positions used
    if n > seq_len:
      raise ValueError(f"row {i}: prompt {len(p)} + completion {len(t)} tokens need {n} positions, "
                       f"more than seq_len {seq_len}")
    batch["inputs"][i, :n] = seq[:-1]
    batch["targets"][i, :n] = seq[1:]
    batch["segment_ids"][i, :n] = 1
    batch["positions"][i, :n] = np.arange(n)
    batch["weights"][i, len(p) - 1:n] = 1
    batch["sample_logprobs"][i, len(p) - 1:n] = lp
  return batch


def group_advantages(rewards, group_size: int, eps: float = 1e-4) -> np.ndarray:
  """GRPO's advantages on the host: (r - group mean) / (group std (n - 1) + eps); each prompt's
  group_size completions adjacent. Same numbers as rl_losses.group_advantages. [rows] float32."""
  groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centered = groups - groups.mean(axis=1, keepdims=True)
  std = groups.std(axis=1, ddof=1, keepdims=True)
  return (centered / (std + eps)).reshape(-1).astype(np.float32)
