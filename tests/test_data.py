"""Sources give the right documents or a clear error; packing keeps every token exactly once;
batches are shuffled by row, deterministic, resumable, and the same global batches for any number
of processes (tfds: each process reads its own share)."""

import collections
import copy
import json

import grain
import numpy as np
import pytest

from jaxlm.config import ConfigError, base_config, validate
from jaxlm.data import sources
from jaxlm.data.pipeline import FEATURES, eval_batches, make_train_iterator, packed_rows
from jaxlm.data.tokenizer import train_tokenizer

pytestmark = pytest.mark.fast  # unit tests: the `-m fast` tier

SEQ_LEN, BATCH = 32, 8
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
# Words per training document: longer and shorter than a row, one single word, one of two words.
# (An empty file is a bad record: tests/test_bad_records.py.)
LENGTHS = (400, 3, 150, 2, 60, 300, 1, 220)


def _doc(word: str, n: int) -> str:
  return "".join(f"{word}{' ' if (i + 1) % 7 else chr(10)}" for i in range(n))


# ---------------------------------------------------------------------------------------------
# fixtures: a text corpus whose documents are each made of one word, so a row tells its document


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  (root / "train").mkdir()
  (root / "eval").mkdir()
  train = [_doc(w, n) for w, n in zip(WORDS, LENGTHS)]
  for i, text in enumerate(train):
    (root / "train" / f"{i:02d}-{WORDS[i]}.txt").write_text(text, encoding="utf-8")
  held_out = [_doc("india", 90), _doc("juliet", 25)]
  for i, text in enumerate(held_out):
    (root / "eval" / f"{i}.txt").write_text(text, encoding="utf-8")
  return root, train, held_out


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
  _, train, held_out = corpus
  plays = sources.shakespeare_plays()
  cfg = base_config().tokenizer
  cfg.vocab_size = 384
  cfg.cache_dir = str(tmp_path_factory.mktemp("tokenizers"))
  return train_tokenizer([plays["tragedies/macbeth"][:30_000], *train, *held_out], cfg)


def _config(corpus, **data):
  root = corpus[0]
  c = base_config()
  c.data.source = "text"
  c.data.train_paths = str(root / "train" / "*.txt")
  c.data.eval_paths = str(root / "eval" / "*.txt")
  c.data.seq_len = SEQ_LEN
  c.data.prefetch_threads = 0
  c.train.batch_size = BATCH
  c.model.vocab_size = c.tokenizer.vocab_size = 384
  for k, v in data.items():
    c.data[k] = v
  return validate(c)


@pytest.fixture(scope="module")
def config(corpus):
  return _config(corpus)


def _tokens(tok, docs):
  return [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _pieces(row):
  """The (inputs, targets) of each document piece in a row, in order."""
  out = []
  for s in range(1, row["segment_ids"].max() + 1):
    mask = row["segment_ids"] == s
    out.append((row["inputs"][mask].tolist(), row["targets"][mask].tolist()))
  return out


def _check_row(row):
  seg, pos = row["segment_ids"], row["positions"]
  assert all(row[k].shape == (SEQ_LEN,) and row[k].dtype == np.int32 for k in FEATURES)
  used = int((seg > 0).sum())
  assert (seg[:used] > 0).all() and (seg[used:] == 0).all(), "padding only at the end"
  assert np.all(np.diff(seg[:used]) >= 0) and np.all(np.diff(seg[:used]) <= 1)
  assert seg[0] in (0, 1)
  np.testing.assert_array_equal(row["weights"], seg > 0)
  for s in range(1, seg.max() + 1):
    idx = np.flatnonzero(seg == s)
    np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # 0.. inside each piece
    np.testing.assert_array_equal(row["inputs"][idx[1:]], row["targets"][idx[:-1]])
  pad = seg == 0
  assert not row["inputs"][pad].any() and not row["targets"][pad].any() and not pos[pad].any()


# ---------------------------------------------------------------------------------------------
# sources


def test_shakespeare_split_holds_out_whole_plays():
  cfg = base_config().data
  train, held_out = sources.documents(cfg, "train"), sources.documents(cfg, "eval")
  assert len(held_out) == len(sources.SHAKESPEARE_EVAL_PLAYS) == 3 and len(train) == 35
  assert not set(train) & set(held_out)
  assert [doc.splitlines()[0] for doc in held_out] == ["# Twelfth Night", "# Henry V", "# Hamlet"]
  assert any("To be, or not to be" in d for d in held_out)
  assert not any("To be, or not to be" in d for d in train)
  eval_bytes = sum(len(d.encode()) for d in held_out)
  assert eval_bytes / (eval_bytes + sum(len(d.encode()) for d in train)) < 0.10
  assert len({g.split("/")[0] for g in sources.SHAKESPEARE_EVAL_PLAYS}) == 3  # three genres


def test_text_source_one_document_per_file(corpus, config):
  _, train, held_out = corpus
  assert sources.documents(config.data, "train") == train  # files sorted by path
  assert sources.documents(config.data, "eval") == held_out
  config = _config(corpus, eval_paths="")
  assert sources.documents(config.data, "eval") is None


def test_jsonl_source(tmp_path):
  rows = [{"text": "first doc\n"}, {"text": "second", "id": 2}, {"text": "naïve 😀"}]
  path = tmp_path / "a.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
  c = base_config().data
  c.source, c.train_paths = "jsonl", f"{tmp_path}/*.jsonl"
  assert list(sources.documents(c, "train")) == [r["text"] for r in rows]
  assert sources.documents(c, "eval") is None
  c.jsonl_field = "body"
  with pytest.raises(ConfigError, match=r"a\.jsonl:1.*no field 'body'.*data\.jsonl_field"):
    sources.documents(c, "train")


def test_source_errors_name_the_field(tmp_path):
  c = base_config().data
  c.source = "text"
  c.train_paths = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match=r"data\.train_paths.*missing\.txt"):
    sources.documents(c, "train")
  c.train_paths = str(tmp_path / "nothing-*.txt")
  with pytest.raises(FileNotFoundError, match=r"nothing-\*\.txt.*matches no file"):
    sources.documents(c, "train")
  (tmp_path / "empty.txt").write_text("")
  c.train_paths = str(tmp_path / "empty.txt")
  with pytest.raises(ConfigError, match=r"data\.train_paths.*no text"):
    sources.documents(c, "train")
  c.train_paths = " , "
  with pytest.raises(ConfigError, match=r"data\.train_paths"):
    sources.documents(c, "train")


# ---------------------------------------------------------------------------------------------
# packing


def test_unshuffled_packing_reproduces_every_document_in_order(corpus, tok, config):
  rows = list(packed_rows(config, tok, "train"))
  for row in rows:
    _check_row(row)
  inputs = [t for row in rows for piece in _pieces(row) for t in piece[0]]
  targets = [t for row in rows for piece in _pieces(row) for t in piece[1]]
  docs = _tokens(tok, corpus[1])
  assert inputs == [t for d in docs for t in d[:-1]]  # every token but eos, once, in order
  assert targets == [t for d in docs for t in d[1:]]
  assert len(rows) == -(-sum(len(d) - 1 for d in docs) // SEQ_LEN)  # padding only in the last
  assert max(len(d) for d in docs) > 3 * SEQ_LEN  # some documents really were split


def test_shuffled_epoch_keeps_every_token_pair_exactly_once(corpus, tok, config):
  rows = list(packed_rows(config, tok, "train", shuffle_seed=0, num_epochs=1))
  for row in rows:
    _check_row(row)
  got = collections.Counter(
      pair for row in rows for ins, tgs in _pieces(row) for pair in zip(ins, tgs))
  want = collections.Counter(pair for d in _tokens(tok, corpus[1]) for pair in zip(d[:-1], d[1:]))
  assert got == want
  assert sum(int(r["weights"].sum()) for r in rows) == sum(want.values())
  unshuffled = list(packed_rows(config, tok, "train"))
  assert [r["inputs"].tolist() for r in rows] != [r["inputs"].tolist() for r in unshuffled]


def _row_words(tok, batch):
  """The document (its word) of each row's longest piece."""
  words = []
  for ids, seg in zip(batch["inputs"], batch["segment_ids"]):
    text = tok.decode(ids[seg == np.bincount(seg).argmax()])
    words.append(next((w for w in WORDS if w in text), None))
  return words


def test_batches_mix_rows_from_different_documents(tok, config):
  it = make_train_iterator(config, tok)
  distinct = [len(set(_row_words(tok, b)) - {None}) for b in _take(it, 6)]
  # Documents span up to ~20 rows: shuffling documents only would give 1-2 words per batch.
  assert np.mean(distinct) >= 3, distinct


def test_train_batches_format_and_determinism(tok, config):
  a, b = _take(make_train_iterator(config, tok), 12), _take(make_train_iterator(config, tok), 12)
  for batch in a:
    assert set(batch) == set(FEATURES)
    assert all(v.shape == (BATCH, SEQ_LEN) and v.dtype == np.int32 for v in batch.values())
    assert batch["weights"].all()  # an infinite stream is never padded
    for i in range(BATCH):
      _check_row({k: v[i] for k, v in batch.items()})
  assert all(_same(x, y) for x, y in zip(a, b))
  other = copy.deepcopy(config)
  other.train.seed = 1
  c = _take(make_train_iterator(other, tok), 12)
  assert not all(_same(x, y) for x, y in zip(a, c))


# ---------------------------------------------------------------------------------------------
# checkpointing and sharding


@pytest.mark.parametrize("k", [0, 3, 7, 20])  # 20 batches is past the first epoch (~14)
def test_state_resumes_exactly(tok, config, k):
  it = make_train_iterator(config, tok)
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON, as in a checkpoint
  expected = _take(it, 5)
  resumed = make_train_iterator(config, tok)
  resumed.set_state(state)
  assert all(_same(x, y) for x, y in zip(expected, _take(resumed, 5)))


def test_orbax_checkpoint_round_trip(tok, config, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = make_train_iterator(config, tok)
  _take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    expected = _take(it, 3)  # before the (possibly async) save finished: it must not see these
    mngr.wait_until_finished()
    resumed = make_train_iterator(config, tok)
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert all(_same(x, y) for x, y in zip(expected, _take(resumed, 3)))


def _global(config, tok, count, n, states=None):
  """n global batches assembled from `count` processes' iterators (each restored from states[p])."""
  its = [make_train_iterator(config, tok, p, count) for p in range(count)]
  for it in its:
    assert it.kind == "global" and it.rows == BATCH // count
    if states is not None:
      it.set_state(states)
  out = []
  for _ in range(n):
    parts = [next(it) for it in its]
    assert all(part["inputs"].shape == (BATCH // count, SEQ_LEN) for part in parts)
    out.append({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
  return out, its


def test_global_batches_are_the_same_for_any_process_count(tok, config):
  # 16 batches is past the first epoch (~14): the reshuffled second epoch too.
  one, _ = _global(config, tok, 1, 16)
  for count in (2, 4):
    got, its = _global(config, tok, count, 16)
    assert all(_same(x, y) for x, y in zip(one, got)), count
    # Every process holds the same position: it continues on any count, here 4 -> 1 and 1 -> 2.
    states = [json.loads(json.dumps(it.get_state())) for it in its]
    assert all(st == states[0] for st in states)
    assert states[0]["stream"] == "global" and states[0]["process_count"] == count
    assert states[0]["batches"] == 16
  more, _ = _global(config, tok, 1, 4, states[0])
  reference = make_train_iterator(config, tok)
  expected = _take(reference, 20)[16:]
  assert all(_same(x, y) for x, y in zip(expected, more))
  two, _ = _global(config, tok, 2, 4, json.loads(json.dumps(reference.get_state())))
  assert all(_same(x, y) for x, y in zip(_take(reference, 4), two))
  with pytest.raises(ConfigError, match=r"train\.batch_size"):
    make_train_iterator(config, tok, 0, 3)


def test_one_process_stream_is_the_unwrapped_grain_pipeline(tok, config):
  """The single-process stream is the batches of packed_rows, as before the global stream."""
  rows = packed_rows(config, tok, "train", shuffle_seed=config.train.seed, num_epochs=None)
  plain = iter(rows.batch(BATCH, drop_remainder=True))
  assert all(_same(x, y) for x, y in zip(_take(plain, 6), _take(make_train_iterator(config, tok), 6)))


def test_data_checkpoint_restores_on_another_process_count(tok, config, tmp_path):
  from jaxlm.data.stream import DataCheckpointHandler
  from jaxlm.runs import CheckpointError
  its = [make_train_iterator(config, tok, p, 2) for p in range(2)]
  for it in its:
    _take(it, 5)
  (tmp_path / "two").mkdir()
  for p, it in enumerate(its):  # the files grain's handler and DataSave write
    (tmp_path / "two" / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
  one = DataCheckpointHandler().restore(tmp_path / "two", make_train_iterator(config, tok))
  reference = make_train_iterator(config, tok)
  _take(reference, 5)
  assert all(_same(x, y) for x, y in zip(_take(reference, 3), _take(one, 3)))
  # A bare grain state of 2 processes (written before the global stream): refused, naming the fix.
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "process_0-of-2.json").write_text(json.dumps(its[0].get_state()["grain"]))
  with pytest.raises(CheckpointError, match=r"per_process stream of 2 process.*data\.allow_reshard"):
    DataCheckpointHandler().restore(tmp_path / "old", make_train_iterator(config, tok))


# ---------------------------------------------------------------------------------------------
# evaluation


def test_eval_batches_cover_the_held_out_documents_once(corpus, tok, config):
  batches = list(eval_batches(config, tok))
  assert all(b["inputs"].shape == (BATCH, SEQ_LEN) for b in batches)
  rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(BATCH)]
  for row in rows:
    _check_row(row)
  docs = _tokens(tok, corpus[2])
  n_rows = -(-sum(len(d) - 1 for d in docs) // SEQ_LEN)
  assert len(batches) == -(-n_rows // BATCH)
  assert not any(r["weights"].any() for r in rows[n_rows:])  # padding rows are all zero
  assert [t for r in rows for p in _pieces(r) for t in p[0]] == [t for d in docs for t in d[:-1]]
  # Deterministic, and every process gets the same number of batches (its rows of each).
  halves = [list(eval_batches(config, tok, p, 2)) for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(batches)
  for whole, a, b in zip(batches, *halves):
    assert _same(whole, {k: np.concatenate([a[k], b[k]]) for k in whole})


def test_no_eval_split_gives_none(corpus, tok):
  assert eval_batches(_config(corpus, eval_paths=""), tok) is None


# ---------------------------------------------------------------------------------------------
# tfds


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tfds_tiny  # tests/tfds_tiny; imports tensorflow_datasets, so only when needed
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_tiny.TinyText(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
  return data_dir, tfds_tiny.DOCUMENTS


def _tfds_config(data_dir, **data):
  c = base_config()
  c.data.source, c.data.tfds_name, c.data.tfds_data_dir = "tfds", "tiny_text", str(data_dir)
  c.data.seq_len, c.data.prefetch_threads, c.train.batch_size = SEQ_LEN, 2, 4
  c.model.vocab_size = c.tokenizer.vocab_size = 384
  for k, v in data.items():
    c.data[k] = v
  return validate(c)


def test_tfds_source_reads_prepared_array_records(tfds_dir):
  data_dir, expected = tfds_dir
  c = _tfds_config(data_dir)
  train = sources.documents(c.data, "train")
  assert isinstance(train, grain.MapDataset)  # lazy, random access
  assert sorted(train[i] for i in range(len(train))) == sorted(expected["train"])
  held_out = sources.documents(c.data, "eval")
  assert sorted(held_out) == sorted(expected["validation"])
  assert sources.documents(_tfds_config(data_dir, tfds_eval_split="").data, "eval") is None


def test_tfds_train_iterator_and_resume(tfds_dir, tok):
  data_dir, expected = tfds_dir
  c = _tfds_config(data_dir)
  it = make_train_iterator(c, tok)
  batches = _take(it, 6)
  for batch in batches:
    assert batch["inputs"].shape == (4, SEQ_LEN)
    for i in range(4):
      _check_row({k: v[i] for k, v in batch.items()})
  text = "".join(tok.decode(r) for b in batches for r in b["inputs"])
  assert "DOC" in text and "naïve" in text
  state = json.loads(json.dumps(it.get_state()))
  expected_next = _take(it, 3)
  resumed = make_train_iterator(c, tok)
  resumed.set_state(state)
  assert all(_same(x, y) for x, y in zip(expected_next, _take(resumed, 3)))
  # One unshuffled epoch through the lazy path keeps every token, like the in-memory path.
  rows = list(packed_rows(c, tok, "train"))
  docs = [sources.documents(c.data, "train")[i] for i in range(12)]
  inputs = [t for row in rows for piece in _pieces(row) for t in piece[0]]
  assert inputs == [t for d in _tokens(tok, docs) for t in d[:-1]]


def test_tfds_errors_name_the_field(tfds_dir, tmp_path):
  data_dir, _ = tfds_dir
  with pytest.raises(FileNotFoundError, match=r"data\.tfds_data_dir"):
    sources.documents(_tfds_config(tmp_path / "nowhere").data, "train")
  with pytest.raises(FileNotFoundError, match=r"data\.tfds_name"):
    sources.documents(_tfds_config(data_dir, tfds_name="not_prepared").data, "train")
  with pytest.raises(ConfigError, match=r"data\.tfds_eval_split"):
    sources.documents(_tfds_config(data_dir, tfds_eval_split="test").data, "eval")
  with pytest.raises(ConfigError, match=r"data\.tfds_text_key"):
    sources.documents(_tfds_config(data_dir, tfds_text_key="body").data, "train")


def test_tfds_stream_is_per_process_and_moves_only_with_allow_reshard(tfds_dir, tok):
  from jaxlm.runs import CheckpointError
  data_dir, _ = tfds_dir
  c = _tfds_config(data_dir)
  its = [make_train_iterator(c, tok, p, 2) for p in range(2)]
  assert [it.kind for it in its] == ["per_process"] * 2
  for it in its:
    assert next(it)["inputs"].shape == (2, SEQ_LEN)  # its own documents' rows
    _take(it, 2)
  state = json.loads(json.dumps(its[0].get_state()))
  assert (state["stream"], state["process_count"], state["batches"]) == ("per_process", 2, 3)
  same = make_train_iterator(c, tok, 0, 2)  # the same process count continues exactly
  same.set_state(state)
  assert all(_same(x, y) for x, y in zip(_take(its[0], 2), _take(same, 2)))
  with pytest.raises(CheckpointError, match=r"2 process.*this run has 1.*data\.allow_reshard=True"):
    make_train_iterator(c, tok).set_state(state)
  moved = _tfds_config(data_dir, allow_reshard=True)
  resharded = make_train_iterator(moved, tok)
  resharded.set_state(state)
  after = resharded.get_state()
  assert (after["process_count"], after["batches"], after["reshard_at"]) == (1, 3, 3)
  first = _take(resharded, 3)
  assert not all(_same(x, y) for x, y in zip(first, _take(make_train_iterator(moved, tok), 3)))
  again = make_train_iterator(moved, tok)  # a later resume rebuilds the same re-sharded order
  again.set_state(json.loads(json.dumps(after)))
  assert all(_same(x, y) for x, y in zip(first, _take(again, 3)))
