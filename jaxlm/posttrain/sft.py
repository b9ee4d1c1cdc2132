"""Supervised fine-tuning rows: tokenized examples packed into the trainer's batch format.

    JSONL files of data.train_paths / data.eval_paths (data.source = "chat")
      -> Encoded examples (jaxlm/posttrain/chat.py): ids and the trained-token mask, each cut to
         seq_len + 1 tokens (counted as truncated; one left with no trained token is dropped)
      -> next-token pairs {inputs: ids[:-1], targets: ids[1:], weights: mask[1:]}
      -> train: .shuffle(seed).repeat()                     (example order reshuffled every epoch)
      -> FirstFitPackIterDataset(seq_len)                    (grain's packer: whole examples only)
      -> batch(train.batch_size) -> this process's rows [p * B/P, (p+1) * B/P)

Why whole examples: a conversation cut across two rows would lose, in its second piece, the
prompt its answer depends on. So an example is never split; rows are padded instead. Several
examples share a row with their own segment ids (attention never crosses them) and positions
restarting at 0, so a packed row computes exactly what the examples compute alone, one a row
(tests/test_posttrain_data.py checks loss and gradients).

Batch format: that of jaxlm/data/pipeline.py (int32 [rows, seq_len] inputs, targets, segment_ids,
positions, weights), with weights 1 only where the target is an assistant/completion token, so
jaxlm's train step trains on it unchanged: its loss is the weighted sum over tokens divided once
by the global weight count, i.e. the mean over trained tokens, exact under grad accumulation.

Every process reads, tokenizes and packs all examples the same way and keeps its rows of each
global batch (jaxlm/data/stream.py): the global batches are the same for any process count, and a
checkpointed position continues on any count. The stats are the whole split's. Iterator state
(get_state/set_state, or jaxlm.data.stream.DataSave) is JSON and resumes exactly.

Bad lines follow data.on_bad_record as documents do (jaxlm/data/sources.py): undecodable UTF-8,
not JSON, not a JSON object, or an example chat.encode_example rejects (no assistant turn, an
unknown role, ...) stop with the file and line ("error") or are left out and counted ("skip").
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import sources, stream
from jaxlm.posttrain import chat

Batch = dict[str, np.ndarray]
FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")
_PAIR_FEATURES = ("inputs", "targets", "weights")
_PACKING_BINS = 64  # rows packed at once (at least a batch's): more bins, less padding
BAD_RECORD_REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "invalid_example")


@dataclasses.dataclass(frozen=True)
class ChatStats:
  """What reading a split did to its examples (this process's share)."""
  examples: int  # examples read
  truncated: int  # longer than seq_len + 1 tokens: their end was cut off
  dropped: int  # truncated down to no trained token: left out
  trained_tokens: int  # weighted targets in the examples kept (one epoch)

  def metrics(self, prefix: str = "data") -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in dataclasses.asdict(self).items()}


def encode_examples(tokenizer, records: Sequence, seq_len: int, chat_template: str = "",
                    where: Sequence[str] | None = None, bad: sources.BadRecords | None = None
                    ) -> tuple[list[chat.Encoded], ChatStats]:
  """Encoded examples (cut to seq_len + 1 tokens) and their stats; examples truncated to no
  trained token are left out. where[i] names record i in errors (e.g. "file.jsonl:12"); bad
  (data.on_bad_record) decides about an example chat.encode_example rejects, else it is an error."""
  kept, truncated, dropped = [], 0, 0
  for i, record in enumerate(records):
    try:
      encoded = chat.encode_example(tokenizer, record, max_len=seq_len + 1, chat_template=chat_template)
    except chat.ChatError as e:
      name = where[i] if where else f"example {i}"
      if bad is None:
        raise ConfigError(f"{name}: {e}") from e
      bad("invalid_example", name, str(e))
      continue
    truncated += encoded.truncated
    if encoded.trained_tokens == 0:
      dropped += 1
      continue
    kept.append(encoded)
  stats = ChatStats(len(records), truncated, dropped, sum(e.trained_tokens for e in kept))
  return kept, stats


def read_examples(config, tokenizer, split: str, shard: tuple[int, int] = (0, 1)
                  ) -> tuple[list[chat.Encoded], ChatStats] | None:
  """`split`'s examples (shard (index, count): only every count-th from index), encoded; None
  when the split has no files. Bad lines follow data.on_bad_record (read_split gives the counts)."""
  made = read_split(config, tokenizer, split, shard)
  return None if made is None else made[:2]


def read_split(config, tokenizer, split: str, shard: tuple[int, int] = (0, 1)
               ) -> tuple[list[chat.Encoded], ChatStats, dict[str, int]] | None:
  """read_examples, and the bad lines skipped by reason ({} unless data.on_bad_record='skip')."""
  field = "train_paths" if split == "train" else "eval_paths"
  spec = config.data[field]
  if not spec.strip():
    if split == "train":
      raise ConfigError("data.source is 'chat' but data.train_paths is empty; give JSONL files")
    return None
  bad = sources.BadRecords(config.data.on_bad_record, field, BAD_RECORD_REASONS)
  records, where = [], []
  for path in sources.expand_paths(field, spec):
    skipped_before = sum(bad.counts.values())
    lines = sources.read_jsonl_records(path, bad)
    for lineno, record in lines:
      if not isinstance(record, dict):
        bad("not_an_object", f"{path}:{lineno}", f"is a JSON {type(record).__name__}, not an object")
        continue
      records.append(record)
      where.append(f"{path}:{lineno}")
    if not lines and sum(bad.counts.values()) == skipped_before:
      raise ConfigError(f"{path} (from data.{field}) holds no examples")
  index, count = shard
  if len(records) < count:
    raise ConfigError(f"data.{field} holds {len(records)} examples, fewer than the {count} processes "
                      "that each read a share of them")
  examples, stats = encode_examples(tokenizer, records[index::count], config.data.seq_len,
                                    config.data.chat_template, where[index::count], bad)
  if not examples:
    raise ConfigError(f"no example of data.{field} has a trained token within data.seq_len "
                      f"({config.data.seq_len}) tokens; raise data.seq_len")
  return examples, stats, bad.stats()


def _seed(seed: int, purpose: str) -> int:
  return int.from_bytes(hashlib.sha256(f"{seed}/sft/{purpose}".encode()).digest()[:4], "little")


def _row(packed: dict[str, np.ndarray]) -> Batch:
  segment_ids = packed["inputs_segment_ids"]  # [seq_len]; 0 = padding
  return {"inputs": packed["inputs"], "targets": packed["targets"], "segment_ids": segment_ids,
          "positions": packed["inputs_positions"],
          "weights": packed["weights"] * (segment_ids > 0).astype(np.int32)}


def packed_rows(examples: Sequence[chat.Encoded], seq_len: int, *, shuffle_seed: int | None = None,
                num_epochs: int | None = 1, bins: int = _PACKING_BINS) -> grain.IterDataset:
  """Single rows (dicts of int32 [seq_len], keys FEATURES) of whole examples packed first-fit.

  shuffle_seed: None keeps example order and packs deterministically (evaluation); an int
  shuffles examples every epoch and the rows of each pack. num_epochs None: forever.
  """
  longest = max((len(e.ids) for e in examples), default=0)
  if longest > seq_len + 1:
    raise ValueError(f"an example has {longest} tokens, more than a row's seq_len + 1 = "
                     f"{seq_len + 1}; encode with max_len=seq_len + 1 (encode_examples does)")
  ds = grain.MapDataset.source([e.pairs() for e in examples])
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=_seed(shuffle_seed, "examples"))
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  lengths = {k: seq_len for k in _PAIR_FEATURES}
  packed = grain.experimental.FirstFitPackIterDataset(
      ds.to_iter_dataset(), length_struct=lengths, num_packing_bins=bins,
      seed=_seed(shuffle_seed or 0, "bins"), shuffle_bins=shuffle_seed is not None)
  return packed.map(_row)


def unpacked_batch(examples: Sequence[chat.Encoded], seq_len: int) -> Batch:
  """One example a row, right-padded: the reference a packed batch must compute the same as."""
  batch = {k: np.zeros((len(examples), seq_len), np.int32) for k in FEATURES}
  for i, e in enumerate(examples):
    pairs = e.pairs()
    n = len(pairs["inputs"])
    if n > seq_len:
      raise ValueError(f"example {i} has {n} pairs, more than seq_len {seq_len}")
    for k in _PAIR_FEATURES:
      batch[k][i, :n] = pairs[k]
    batch["segment_ids"][i, :n] = 1
    batch["positions"][i, :n] = np.arange(n)
  return batch


def _rows_per_process(config, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  if config.train.batch_size % process_count:
    raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be divisible by the "
                      f"number of processes ({process_count})")
  return config.train.batch_size // process_count


def make_sft_iterator(config, tokenizer, process_index: int = 0, process_count: int = 1
                      ) -> tuple[stream.StreamIterator, ChatStats]:
  """(infinite iterator of this process's rows [train.batch_size / process_count, seq_len] of
  every global training batch, the stats of all examples). Deterministic for train.seed
  (data.shuffle=False keeps file order); get_state()/set_state() resume exactly, on any process
  count. The iterator's `.stats` holds the bad lines skipped (data.on_bad_record='skip')."""
  _rows_per_process(config, process_index, process_count)
  examples, stats, skipped = read_split(config, tokenizer, "train")
  seed = config.train.seed if config.data.shuffle else None
  batch_size = config.train.batch_size

  def build(reshard_at: int | None) -> grain.DatasetIterator:
    del reshard_at  # a global stream continues on any process count: never re-sharded
    ds = packed_rows(examples, config.data.seq_len, shuffle_seed=seed, num_epochs=None,
                     bins=max(batch_size, _PACKING_BINS))
    return iter(ds.batch(batch_size, drop_remainder=True))

  it = stream.StreamIterator(build, stream.GLOBAL, process_index, process_count, batch_size,
                             allow_reshard=config.data.allow_reshard, describe="data.source 'chat'",
                             stats=skipped)
  return it, stats


def sft_eval_batches(config, tokenizer, process_index: int = 0, process_count: int = 1
                     ) -> tuple[Iterator[Batch], ChatStats] | None:
  """One unshuffled pass over the held-out examples, or None without data.eval_paths.

  Every process packs all held-out examples the same way and keeps its rows of each global
  batch of train.batch_size rows; the last batch is padded with all-zero rows (weights 0), so
  every process yields the same number of batches. Stats cover all held-out examples.
  """
  rows = _rows_per_process(config, process_index, process_count)
  made = read_examples(config, tokenizer, "eval")
  if made is None:
    return None
  examples, stats = made
  batch_size = config.train.batch_size
  ds = packed_rows(examples, config.data.seq_len, bins=max(batch_size, _PACKING_BINS))
  ds = ds.batch(batch_size, drop_remainder=False)
  start = process_index * rows

  def pad_and_shard(batch: Batch) -> Batch:
    missing = batch_size - len(batch["inputs"])
    return {k: np.pad(v, ((0, missing), (0, 0)))[start:start + rows] for k, v in batch.items()}

  return iter(ds.map(pad_and_shard)), stats
