"""data.on_bad_record: every kind of bad record stops the run with its file and line ("error"), or is
left out and counted by reason while the other documents stay exactly as they were ("skip")."""

import json

import pytest

from jaxlm.config import ConfigError, base_config, validate
from jaxlm.data import sources

pytestmark = pytest.mark.fast

GOOD = [{"text": "first document\n"}, {"text": "second, naïve 😀"}, {"text": "third"}]
# (line as written, reason): each one bad record, placed between the good ones
BAD_LINES = [
    (b'{"text": "caf\xe9"}\n', "invalid_utf8"),  # latin-1, not UTF-8
    (b'{"text": "unclosed\n', "invalid_json"),
    (b'{"body": "no text field"}\n', "missing_field"),
    (b'["a", "list"]\n', "missing_field"),
    (b'{"text": 42}\n', "not_a_string"),
    (b'{"text": "  \\n\\t "}\n', "empty_document"),
]


def _jsonl(tmp_path, bad_line: bytes):
  """good line, bad line, blank line, good lines: the bad one is line 2."""
  lines = [json.dumps(GOOD[0]).encode() + b"\n", bad_line, b"\n",
           *(json.dumps(r).encode() + b"\n" for r in GOOD[1:])]
  path = tmp_path / "docs.jsonl"
  path.write_bytes(b"".join(lines))
  return path


def _data(source, path, policy):
  c = base_config().data
  c.source, c.train_paths, c.on_bad_record = source, str(path), policy
  return c


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[r + str(i) for i, (_, r) in enumerate(BAD_LINES)])
def test_bad_jsonl_line_is_an_error_naming_file_and_line_or_skipped_and_counted(tmp_path, line, reason):
  path = _jsonl(tmp_path, line)
  with pytest.raises(ConfigError, match=rf"docs\.jsonl:2 \(from data\.train_paths\).*on_bad_record='skip'"):
    sources.documents(_data("jsonl", path, "error"), "train")
  docs, stats = sources.read_documents(_data("jsonl", path, "skip"), "train")
  assert docs == [r["text"] for r in GOOD]  # the others, unchanged and in order
  assert stats["skipped_records"] == 1 and stats[f"skipped_{reason}"] == 1
  assert sum(v for k, v in stats.items() if k != "skipped_records") == 1


def test_error_messages_say_what_is_wrong(tmp_path):
  for line, message in [(BAD_LINES[0][0], r"not valid UTF-8 \(byte b'\\xe9' at byte column 14\)"),
                        (BAD_LINES[1][0], "not valid JSON"), (BAD_LINES[2][0], r"no field 'text' \(it has \['body'\]\)"),
                        (BAD_LINES[3][0], "no field 'text' .it has list"), (BAD_LINES[4][0], "is a int, not a string"),
                        (BAD_LINES[5][0], "holds no text")]:
    with pytest.raises(ConfigError, match=message):
      sources.documents(_data("jsonl", _jsonl(tmp_path, line), "error"), "train")


def test_several_bad_records_are_counted_by_reason(tmp_path):
  path = tmp_path / "many.jsonl"
  path.write_bytes(b"".join(line for line, _ in BAD_LINES) + json.dumps(GOOD[2]).encode() + b"\n")
  docs, stats = sources.read_documents(_data("jsonl", path, "skip"), "train")
  assert docs == [GOOD[2]["text"]]
  assert stats == {"skipped_records": 6, "skipped_invalid_utf8": 1, "skipped_empty_document": 1,
                   "skipped_invalid_json": 1, "skipped_missing_field": 2, "skipped_not_a_string": 1}
  # nothing good at all: still the "no text" error, naming the field
  path.write_bytes(BAD_LINES[1][0])
  with pytest.raises(ConfigError, match=r"data\.train_paths.*no text at all"):
    sources.documents(_data("jsonl", path, "skip"), "train")


def _texts(tmp_path):
  root = tmp_path / "text"
  root.mkdir()
  (root / "a.txt").write_text("good one\n", encoding="utf-8")
  (root / "b.txt").write_bytes(b"line one\nline two\nbad \xff byte\n")
  (root / "c.txt").write_text(" \n\t\n", encoding="utf-8")
  (root / "d.txt").write_bytes(b"windows\r\nnewlines\r\n")
  return root


def test_bad_text_files(tmp_path):
  root = _texts(tmp_path)
  with pytest.raises(ConfigError, match=r"b\.txt:3 \(from data\.train_paths\): is not valid UTF-8"):
    sources.documents(_data("text", root / "*.txt", "error"), "train")
  with pytest.raises(ConfigError, match=r"c\.txt:1 \(from data\.train_paths\): holds no text"):
    sources.documents(_data("text", f"{root}/a.txt,{root}/c.txt", "error"), "train")
  docs, stats = sources.read_documents(_data("text", root / "*.txt", "skip"), "train")
  assert docs == ["good one\n", "windows\nnewlines\n"]  # newlines as text mode reads them
  assert stats["skipped_records"] == 2
  assert stats["skipped_invalid_utf8"] == stats["skipped_empty_document"] == 1
  assert sources.read_documents(_data("text", root / "a.txt", "error"), "train")[1] == {}


def test_on_bad_record_is_validated():
  c = base_config()
  c.data.on_bad_record = "ignore"
  with pytest.raises(ConfigError, match=r"data\.on_bad_record.*'error', 'skip'"):
    validate(c)


def test_training_logs_the_skipped_counts(tmp_path):
  from jaxlm.data.tokenizer import train_tokenizer
  from jaxlm.train.loop import train_batches
  path = tmp_path / "docs.jsonl"
  good = [json.dumps({"text": f"document {i} " + "words and more words " * (i + 3)}).encode() + b"\n"
          for i in range(12)]
  path.write_bytes(b"".join(good[:6]) + BAD_LINES[0][0] + BAD_LINES[2][0] + b"".join(good[6:]))
  c = base_config()
  c.data.update(source="jsonl", train_paths=str(path), on_bad_record="skip", seq_len=16,
                prefetch_threads=0)
  c.train.batch_size = 4
  c.tokenizer.vocab_size = c.model.vocab_size = 384
  c.tokenizer.cache_dir = str(tmp_path / "tok")
  validate(c)
  text = sources.shakespeare_plays()["tragedies/macbeth"][:30_000]
  tok = train_tokenizer([text, *sources.documents(c.data, "train")], c.tokenizer)
  batches, stats = train_batches(c, tok)
  assert stats["skipped_records"] == 2.0
  assert stats["skipped_invalid_utf8"] == stats["skipped_missing_field"] == 1.0
  assert next(batches)["inputs"].shape == (4, 16)
  c.data.on_bad_record = "error"
  with pytest.raises(ConfigError, match=r"docs\.jsonl:7"):
    train_batches(c, tok)
