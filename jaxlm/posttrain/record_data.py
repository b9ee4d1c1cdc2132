"""Batches of the preference, KTO and reward-model objectives, read from data.train_paths /
data.eval_paths (JSONL records, formats in jaxlm/posttrain/datasets.py).

Every example is two rows, adjacent in the batch (jaxlm/posttrain/objectives.py reads them so):
  dpo, ipo, reward   row 2i: prompt + chosen, row 2i + 1: prompt + rejected
  kto                row 2i: prompt + completion (its label in "desirable", 1 or 0),
                     row 2i + 1: the same prompt with the NEXT record's completion (a mismatched
                     pair: KTO estimates KL(policy || reference) from these)
So a global batch of train.batch_size examples is 2 x train.batch_size rows of data.seq_len, in the
trainer's format (inputs, targets, segment_ids, positions, weights: 1 on the completion's targets),
plus "desirable" for kto and, with posttrain.reference=precomputed, "reference_logps" (per-token
log-probs of the targets under the starting model, 0 off the weights). Every feature is
[rows, seq_len] so the batch shards and splits into micro-batches like any other.

Examples longer than seq_len + 1 tokens keep their beginning and are counted (`RecordStats`);
one whose completion is cut away entirely is an error naming the record (raise data.seq_len).

Training order: the examples shuffled with train.seed, reshuffled every epoch (grain, so the
iterator's position is checkpointed and a resume continues exactly). Each process keeps its rows of
every global batch. Evaluation: one pass in file order over whole batches (a last partial batch is
left out and counted in `eval_examples_left_out`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import grain
import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import sources
from jaxlm.posttrain import chat, datasets

RECORD_KIND = {"dpo": "preference", "ipo": "preference", "reward": "preference", "kto": "kto"}


@dataclasses.dataclass(frozen=True)
class RecordStats:
  """What reading a split did to its records."""
  examples: int
  truncated: int  # an example (either of its rows) lost its end to data.seq_len

  def metrics(self, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in dataclasses.asdict(self).items()}


def _read(config, split: str) -> tuple[list[dict], list[str]] | None:
  field = "train_paths" if split == "train" else "eval_paths"
  spec = config.data[field]
  if not spec.strip():
    return None
  kind = RECORD_KIND[config.posttrain.objective]
  records, where = [], []
  for path in sources.expand_paths(field, spec):
    try:
      lines = chat.read_jsonl(path)
      names = [f"{path}:{n} (from data.{field})" for n, _ in lines]
      records += datasets.check_records([r for _, r in lines], kind, names)
    except chat.ChatError as e:
      raise ConfigError(f"{e}; posttrain.objective={config.posttrain.objective} reads {kind} "
                        f"records {list(datasets.REQUIRED[kind])}") from e
    where += names
  return records, where


def _encode(tokenizer, prompt, completion, seq_len: int, template: str, where: str) -> chat.Encoded:
  try:
    e = chat.encode_prompt_completion(tokenizer, prompt, completion, max_len=seq_len + 1,
                                      chat_template=template)
  except chat.ChatError as err:
    raise ConfigError(f"{where}: {err}") from err
  if e.trained_tokens == 0:
    raise ConfigError(f"{where}: its completion starts after data.seq_len ({seq_len}) tokens; "
                      "raise data.seq_len or shorten the prompt")
  return e


def _row(e: chat.Encoded, seq_len: int) -> dict[str, np.ndarray]:
  """One right-padded row of an encoded example, every feature int32 [seq_len]."""
  pairs, n = e.pairs(), len(e.ids) - 1
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "weights", "segment_ids",
                                                   "positions")}
  for k in ("inputs", "targets", "weights"):
    row[k][:n] = pairs[k]
  row["segment_ids"][:n] = 1
  row["positions"][:n] = np.arange(n)
  return row


def encode_records(config, tokenizer, records: Sequence[dict], where: Sequence[str]
                   ) -> tuple[list[dict[str, np.ndarray]], RecordStats]:
  """Each record as one example: a dict of int32 [2, seq_len] arrays (its two rows)."""
  seq_len, template = config.data.seq_len, config.data.chat_template
  kto = config.posttrain.objective == "kto"
  examples, truncated = [], 0
  for i, r in enumerate(records):
    if kto:
      other = records[(i + 1) % len(records)]["completion"]  # the mismatched completion
      first = _encode(tokenizer, r["prompt"], r["completion"], seq_len, template, where[i])
      second = _encode(tokenizer, r["prompt"], other, seq_len, template, where[i])
    else:
      first = _encode(tokenizer, r["prompt"], r["chosen"], seq_len, template, where[i])
      second = _encode(tokenizer, r["prompt"], r["rejected"], seq_len, template, where[i])
    truncated += first.truncated or second.truncated
    rows = [_row(first, seq_len), _row(second, seq_len)]
    example = {k: np.stack([rows[0][k], rows[1][k]]) for k in rows[0]}
    if kto:
      example["desirable"] = np.full((2, seq_len), int(r["label"]), np.int32)
    examples.append(example)
  return examples, RecordStats(len(records), truncated)


def read_split(config, tokenizer, split: str):
  """(examples, stats) of the split, or None when it has no files."""
  made = _read(config, split)
  if made is None:
    return None
  return encode_records(config, tokenizer, *made)


def with_reference(examples: list[dict], reference_fn: Callable, batch_rows: int) -> list[dict]:
  """posttrain.reference=precomputed: each example gains "reference_logps" (float32 [2, seq_len]),
  reference_fn(batch) -> per-token log-probs [rows, seq_len] of a batch of batch_rows rows (the
  starting model's), computed once here."""
  out = []
  per_batch = batch_rows // 2
  for start in range(0, len(examples), per_batch):
    chunk = examples[start:start + per_batch]
    missing = per_batch - len(chunk)
    batch = {k: np.concatenate([e[k] for e in chunk] + [np.zeros_like(chunk[0][k])] * missing)
             for k in chunk[0]}
    logps = np.asarray(reference_fn(batch), np.float32)
    out += [{**e, "reference_logps": logps[2 * i:2 * i + 2]} for i, e in enumerate(chunk)]
  return out


def _seed(seed: int) -> int:
  return int.from_bytes(hashlib.sha256(f"{seed}/records".encode()).digest()[:4], "little")


def _rows_of_process(config, process_index: int, process_count: int) -> tuple[int, int]:
  """(first row, rows) of this process in each global batch of 2 x train.batch_size rows."""
  rows = 2 * config.train.batch_size
  if config.train.batch_size % process_count:
    raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be divisible by the "
                      f"number of processes ({process_count})")
  per = rows // process_count
  return process_index * per, per


def _flatten(batch: dict) -> dict:
  """[examples, 2, seq_len] -> [2 x examples, seq_len]: example i in rows 2i and 2i + 1."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def train_iterator(config, examples: list[dict], process_index: int = 0, process_count: int = 1):
  """Infinite iterator of this process's rows of every training batch (checkpointable)."""
  start, per = _rows_of_process(config, process_index, process_count)
  ds = grain.MapDataset.source(examples)
  if config.data.shuffle:
    ds = ds.shuffle(seed=_seed(config.train.seed))
  ds = ds.repeat(None).batch(config.train.batch_size, drop_remainder=True)
  ds = ds.map(lambda b: {k: v[start:start + per] for k, v in _flatten(b).items()})
  return iter(ds.to_iter_dataset())


def eval_batches(config, examples: list[dict], process_index: int = 0, process_count: int = 1
                 ) -> tuple[list[dict], int]:
  """(this process's rows of every whole held-out batch, examples left out of a last partial one)."""
  start, per = _rows_of_process(config, process_index, process_count)
  b = config.train.batch_size
  batches = []
  for i in range(0, len(examples) - b + 1, b):
    chunk = examples[i:i + b]
    full = _flatten({k: np.stack([e[k] for e in chunk]) for k in chunk[0]})
    batches.append({k: v[start:start + per] for k, v in full.items()})
  return batches, len(examples) % b
