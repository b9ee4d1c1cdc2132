"""Token pipeline: documents -> packed rows of seq_len -> shuffled, sharded, checkpointable batches.

One grain pipeline serves every source and both splits:

    documents (grain.MapDataset, random access)
      -> tokens: [bos] + encode(text) + [eos]           (precomputed for in-memory sources,
                                                          a lazy .map for tfds)
      -> train: .shuffle(seed).repeat()                  (document order reshuffled every epoch)
      -> {"inputs": t[:-1], "targets": t[1:]}            (next-token pairs, made BEFORE packing)
      -> ConcatThenSplitIterDataset(seq_len)             (grain's packer: concatenates documents
                                                          and cuts rows; segment ids, positions)
      -> train: WindowShuffleIterDataset                 (row-level shuffle, see below)
      -> batch(train.batch_size) -> this process's rows  (tfds training: batch(train.batch_size /
                                                          processes) of this process's documents)

Why pairs before packing: a document cut across two rows keeps every (input, target) pair, so
within an epoch every token except the final eos appears exactly once as an input and every
target is the true next token; `weights` is 1 on every non-padding position. `positions` restart
at 0 in each document piece (attention never crosses a segment, so a piece is its own context).

Why a row-level shuffle: the embedded corpus is ~35 plays of ~160 rows each; shuffling documents
alone would fill every batch with consecutive chunks of one play. The window holds up to 2M
tokens / 8192 rows (all ~1.6M training tokens of Shakespeare at vocab 4096 and seq_len 256) and
never more than one epoch's rows (estimated from a sample for tfds), so an in-memory corpus gets a
(near-)global row shuffle while a huge tfds corpus keeps bounded memory and restore time.

Why one global stream: every process builds the same pipeline (same documents, shuffles and
packing) and keeps rows [p * B/P, (p+1) * B/P) of each global batch of B = train.batch_size rows,
the rows its devices hold under the batch sharding (jaxlm/parallel/sharding.py checks that), and
the loop assembles the global batch with jax.make_array_from_process_local_data. So the sequence of
global batches is the same for any process count (one process: the plain unsharded pipeline),
and the iterator's position, identical on every process, continues on any count
(jaxlm/data/stream.py: the state records the stream kind and process count). The price: every
process reads and tokenizes the whole in-memory corpus, not 1/P of it, once at start. For the
default Shakespeare training split (1,498,008 tokens at vocab 4096) that measured 0.7 s (idle) to
2.6 s (loaded) per process on a 2-core CPU host:

    python -c "import time; from jaxlm.config import base_config; from jaxlm.data import \\
      get_tokenizer; from jaxlm.data.pipeline import document_tokens; c = base_config(); \\
      t = get_tokenizer(c); s = time.perf_counter(); document_tokens(c, t, 'train'); \\
      print(time.perf_counter() - s)"

tfds is the exception: a corpus too large for every process to read whole. There process p of P
reads, tokenizes and packs only documents p, p + P, ... (its shard, taken before the document
shuffle) and batches B/P rows of its own, so input cost does not grow with P but the global batch
depends on P. Its checkpointed position therefore only continues on the same P; another P is
refused (CheckpointError) unless data.allow_reshard=True, which continues with the new shards in
an order drawn anew from that step.

Why evaluation shards after batching: every process runs the same (small, unshuffled) eval pipeline
and keeps rows [p * B/P, (p+1) * B/P) of each global batch of B rows, so every process yields the
same number of batches without talking to the others -- the eval step is a collective and needs
that.

Batch format (numpy int32, all [rows, seq_len], rows = train.batch_size // process_count):
  inputs, targets  token ids; targets[i] is the next token after inputs[i]
  segment_ids      1, 2, ... per document piece in the row; 0 = padding
  positions        0-based position inside the document piece
  weights          1 where targets[i] is a real next token (non-padding), else 0

Checkpointing (state is a small JSON-able dict):

    it = make_train_iterator(config, tokenizer)
    state = it.get_state()            # e.g. json.dumps(state) into your checkpoint
    it2 = make_train_iterator(config, tokenizer)
    it2.set_state(state)              # continues with exactly the batches `it` would give

  or with Orbax, next to the model state (jaxlm.data.stream's DataSave/DataRestore restore on any
  process count; grain.checkpoint.CheckpointSave/CheckpointRestore only on the one that wrote it):

    import orbax.checkpoint as ocp
    from jaxlm.data.stream import DataRestore, DataSave
    mngr = ocp.CheckpointManager(directory, item_names=("state", "data"))
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=DataSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=DataRestore(it)))
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import sources, stream
from jaxlm.data.tokenizer import AnyTokenizer as Tokenizer

Batch = dict[str, np.ndarray]
FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")
# Row-shuffle window: at most 2M tokens (40 MB of int32 rows, 5 arrays), 8192 rows (filling it
# costs ~0.1 ms a row, paid again on restore) and one epoch.
_SHUFFLE_WINDOW_TOKENS = 1 << 21
_SHUFFLE_WINDOW_ROWS = 8192
_EPOCH_SAMPLE_DOCS = 64  # documents tokenized to estimate a lazy source's epoch size


def _has(token_id) -> bool:
  """False for a token the tokenizer lacks: None (Hugging Face) or -1 (SentencePiece)."""
  return token_id is not None and token_id >= 0


def document_tokens(config, tokenizer: Tokenizer, split: str, shard: tuple[int, int] = (0, 1),
                    stats: dict[str, float] | None = None) -> tuple[grain.MapDataset, int] | None:
  """Each document as int32 [bos, *ids, eos], and the tokens in one epoch (estimated if lazy).

  A tokenizer without a bos (Qwen2's) or eos token leaves it out.

  shard (index, count): only documents index, index + count, ... are read and tokenized.
  stats: updated with what reading found (bad records skipped, see sources.read_documents).

  In-memory sources are tokenized now, in one threaded call (SentencePiece: ~1 s for 5 MB); tfds
  is tokenized lazily, as records are read, so its size does not matter. Its epoch size is
  estimated from an evenly spaced sample of documents (it only bounds the shuffle window).
  """
  docs, skipped = sources.read_documents(config.data, split)
  if stats is not None:
    stats.update(skipped)
  if docs is None:
    return None
  index, count = shard
  if count > 1:
    if len(docs) < count:
      raise ConfigError(
          f"the {split} split of data.source '{config.data.source}' has {len(docs)} documents, fewer "
          f"than the {count} processes that each read a share of them; use more (or split) documents")
    docs = docs[index::count]
  head = [tokenizer.bos_id] if _has(tokenizer.bos_id) else []
  tail = [tokenizer.eos_id] if _has(tokenizer.eos_id) else []

  def wrap(ids) -> np.ndarray:
    return np.asarray([*head, *ids, *tail], np.int32)  # [len(ids) + 2] (less a missing bos/eos)

  if isinstance(docs, grain.MapDataset):
    tokens = docs.map(lambda text: wrap(tokenizer.encode(text)))
    sample = np.linspace(0, len(tokens) - 1, min(len(tokens), _EPOCH_SAMPLE_DOCS)).astype(int)
    return tokens, int(np.mean([len(tokens[int(i)]) for i in sample]) * len(tokens))
  tokens = [wrap(ids) for ids in tokenizer.encode_batch(docs)]
  return grain.MapDataset.source(tokens), sum(len(t) for t in tokens)


def _pair(tokens: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": tokens[:-1], "targets": tokens[1:]}  # each [len - 1]


def _row(packed: dict[str, np.ndarray]) -> Batch:
  segment_ids = packed["inputs_segment_ids"]  # [seq_len]; same cuts as targets_segment_ids
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "segment_ids": segment_ids,
      "positions": packed["inputs_positions"],
      "weights": (segment_ids > 0).astype(np.int32),
  }


def _seed(seed: int, purpose: str) -> int:
  """A 32-bit seed per purpose, so the document and row shuffles are independent streams."""
  digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def packed_rows(config, tokenizer: Tokenizer, split: str, *, shuffle_seed: int | None = None,
                num_epochs: int | None = 1, shard: tuple[int, int] = (0, 1),
                stats: dict[str, float] | None = None) -> grain.IterDataset | None:
  """Single packed rows (dicts of int32 [seq_len], keys FEATURES) of `split`; None: no such split.

  shuffle_seed: None keeps document and row order (evaluation); an int shuffles documents per
    epoch and rows within a window. num_epochs: None repeats forever.
  shard: (process index, process count): the rows of that process's share of the documents.
  stats: updated with what reading the documents found (see document_tokens).
  """
  made = document_tokens(config, tokenizer, split, shard, stats)
  if made is None:
    return None
  ds, epoch_tokens = made
  seq_len = config.data.seq_len
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=_seed(shuffle_seed, "documents"))
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  read = grain.ReadOptions(num_threads=max(0, config.data.prefetch_threads), prefetch_buffer_size=64)
  rows = ds.map(_pair).to_iter_dataset(read)
  rows = grain.experimental.ConcatThenSplitIterDataset(
      rows, length_struct={"inputs": seq_len, "targets": seq_len}).map(_row)
  if shuffle_seed is not None:
    # At most one epoch, so a window never holds the same document twice.
    window = min(_SHUFFLE_WINDOW_TOKENS // seq_len, _SHUFFLE_WINDOW_ROWS, -(-epoch_tokens // seq_len))
    if window > 1:
      rows = grain.experimental.WindowShuffleIterDataset(
          rows, window_size=window, seed=_seed(shuffle_seed, "rows"))
  return rows


def stream_kind(config) -> str:
  """The training stream of data.source (module docstring): one global stream for sources every
  process holds in memory whole, a per-process one for tfds."""
  return stream.PER_PROCESS if config.data.source == "tfds" else stream.GLOBAL


def _rows_per_process(config, process_index: int, process_count: int) -> int:
  batch_size = config.train.batch_size
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise ConfigError(
        f"train.batch_size ({batch_size}) must be divisible by the number of processes "
        f"({process_count}); each process loads train.batch_size // process_count rows")
  return batch_size // process_count


def _shard(rows: int, process_index: int):
  start = process_index * rows
  return lambda batch: {k: v[start:start + rows] for k, v in batch.items()}  # [rows, seq_len]


def _pad_rows(rows: int):
  def pad(batch: Batch) -> Batch:
    missing = rows - len(batch["inputs"])
    return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}
  return pad


def make_train_iterator(config, tokenizer: Tokenizer, process_index: int = 0,
                        process_count: int = 1) -> stream.StreamIterator:
  """Infinite iterator of this process's training batches, [train.batch_size / process_count,
  seq_len]: its rows of every global batch, or (tfds) batches of its own documents (see the
  module docstring). `.stats` holds what reading found (bad records skipped), to log once.

  Deterministic for train.seed; get_state()/set_state() resume exactly, also through
  jaxlm.data.stream.DataSave/DataRestore (any process count for a global stream) and
  grain.checkpoint.CheckpointSave/CheckpointRestore (the same process count).
  """
  rows = _rows_per_process(config, process_index, process_count)
  kind = stream_kind(config)
  seed = config.train.seed if config.data.shuffle else None
  shard = (0, 1) if kind == stream.GLOBAL else (process_index, process_count)
  batch = config.train.batch_size if kind == stream.GLOBAL else rows
  stats: dict[str, float] = {}

  def build(reshard_at: int | None) -> grain.DatasetIterator:
    # A re-sharded stream (data.allow_reshard) draws its order anew for the batch it starts at.
    shuffle = seed if reshard_at is None or seed is None else _seed(seed, f"reshard/{reshard_at}")
    ds = packed_rows(config, tokenizer, "train", shuffle_seed=shuffle, num_epochs=None, shard=shard,
                     stats=stats if reshard_at is None else None)
    return iter(_JsonStateDataset(ds.batch(batch, drop_remainder=True)))

  return stream.StreamIterator(
      build, kind, process_index, process_count, config.train.batch_size,
      allow_reshard=config.data.allow_reshard, describe=f"data.source '{config.data.source}'",
      stats=stats)


def eval_batches(config, tokenizer: Tokenizer, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch] | None:
  """One deterministic, unshuffled pass over the eval documents; None if there is no eval split.

  Same format and rows as training; the last global batch is padded with all-zero rows (weights
  0), so every process yields the same number of batches.
  """
  rows = _rows_per_process(config, process_index, process_count)
  ds = packed_rows(config, tokenizer, "eval")
  if ds is None:
    return None
  batch_size = config.train.batch_size
  ds = ds.batch(batch_size, drop_remainder=False).map(_pad_rows(batch_size))
  return iter(ds.map(_shard(rows, process_index)))


class _JsonStateDataset(grain.IterDataset):
  """Passes elements through; makes the iterator state survive a JSON round trip.

  grain 0.2.18's ConcatThenSplit keeps tuples in its state and compares them with `!=` to a tuple
  sentinel; JSON (grain.checkpoint, Orbax) turns them into lists, and the restored iterator then
  misreads "no remainder" as a remainder. We turn 2-element int lists under "remainder_slices"
  back into tuples on set_state.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonStateIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return "JsonStateDataset"


class _JsonStateIterator(grain.DatasetIterator):

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_tuple_slices(state))


def _tuple_slices(state: Any, in_slices: bool = False) -> Any:
  if isinstance(state, dict):
    return {k: _tuple_slices(v, in_slices or k == "remainder_slices") for k, v in state.items()}
  if in_slices and isinstance(state, list):
    return tuple(state)
  if isinstance(state, list):
    return [_tuple_slices(v) for v in state]
  return state
