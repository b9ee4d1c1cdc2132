"""Balanced causal sequence parallelism: the order tokens are laid out in along the `length` axis.

With causal attention, the query at position i attends to i + 1 keys. Splitting a row's natural
order into n contiguous shards gives the last shard (2n - 1) times the attention work of the first.
Instead the row is cut into 2n chunks and shard j holds chunks j and 2n - 1 - j, so every shard
holds one early and one late chunk and does the same work: 1/n of the whole row's.

The train and eval steps permute every batch feature by `balanced_order` before the model and
pass the original indices as the model's `slots`, so masks, positions and the loss (a sum over
tokens) are unchanged; attention un-permutes keys and values after gathering them.
"""

from __future__ import annotations

import numpy as np


def balanced_order(length: int, shards: int) -> np.ndarray:
  """[length] int32: the token indices in the order shards hold them (shard j: chunks j, 2n-1-j)."""
  if length % (2 * shards):
    raise ValueError(f"a row of {length} tokens does not cut into 2 x {shards} equal chunks")
  chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, -1)
  return np.concatenate([np.concatenate([chunks[j], chunks[2 * shards - 1 - j]])
                         for j in range(shards)])


def chunk_starts(length: int, shards: int, shard) -> tuple:
  """Positions where shard `shard`'s two chunks start (works on a traced shard index)."""
  chunk = length // (2 * shards)
  return shard * chunk, (2 * shards - 1 - shard) * chunk


def permute_batch(batch: dict, order: np.ndarray) -> dict:
  """Every [rows, length] feature reordered along length."""
  return {k: v[:, order] for k, v in batch.items()}
