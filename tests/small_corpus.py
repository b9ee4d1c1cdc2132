"""Four Shakespeare plays as a JSONL training corpus (two more as its eval split), for tests that
train a few steps of configs/tiny.py. Every training start reads and tokenizes its whole corpus:
all of Shakespeare (5 MB) costs ~8 s a start on a busy CI core, while a run of a dozen batches of
8 x 64 tokens uses a fraction of four plays. A jsonl source gets the same "global" data stream as
the shakespeare one (jaxlm/data/stream.py), so what the tests prove about data positions holds.
"""

import json
import os


def write(folder) -> dict[str, str]:
  """Writes folder/train.jsonl and folder/eval.jsonl (if not there yet: processes of one run may
  call it after the test did) and returns the config.data settings that read them. Each split has
  more than one document: each of two processes may read a share."""
  from jaxlm.data import sources  # pylint: disable=g-import-not-at-top
  paths = {split: os.path.join(str(folder), f"{split}.jsonl") for split in ("train", "eval")}
  if not all(os.path.exists(p) for p in paths.values()):
    plays = list(sources.shakespeare_plays().values())
    os.makedirs(str(folder), exist_ok=True)
    for split, texts in (("train", plays[:4]), ("eval", plays[4:6])):
      tmp = paths[split] + f".{os.getpid()}"
      with open(tmp, "w") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
      os.replace(tmp, paths[split])  # whole or absent, for a process reading it meanwhile
  return {"source": "jsonl", "train_paths": paths["train"], "eval_paths": paths["eval"]}


def flags(folder) -> list[str]:
  """write(folder) as trainer command-line flags."""
  return [f"--config.data.{k}={v}" for k, v in write(folder).items()]
