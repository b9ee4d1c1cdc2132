"""A run directory in a gs:// bucket: training, resuming and loading parameters through it, offline.

The bucket is tests/fake_gcs.py: a local folder behind fsspec's "gcs" protocol (which epath uses),
a fake GCS JSON API server (which TensorStore's own gcs driver, and so orbax's array writes, talk
to over HTTP) and a google.cloud.storage stub (orbax's bucket query). Every test runs from an empty
working directory: a write that went through open()/os.makedirs on the URL string would land in
./gs:/... there instead of in the bucket.
"""

import json
import os
import struct
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import fake_gcs
import small_corpus
from jaxlm import presets
from jaxlm.config import ConfigError, base_config, validate
from jaxlm.train.metrics import MetricsLogger

URL = "gs://fake-bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The fake bucket's folder: gs://fake-bucket/NAME is bucket / "fake-bucket" / NAME."""
  root = tmp_path / "bucket"
  root.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr("jaxlm.workdir._READY", set())
  fake_gcs.serve(str(root), monkeypatch)
  yield root
  assert os.listdir(cwd) == [], "something wrote the URL as a local path"
  fake_gcs.clear_caches()


def run_config(tmp_path, workdir):
  c = presets.load("tiny").get_config()
  c.train.update(steps=6, log_every=1, workdir=workdir, progress_bar=False, eval_batches=2)
  c.tokenizer.cache_dir = str(tmp_path / "tokenizers")
  c.data.update(small_corpus.write(tmp_path / "corpus"))
  c.checkpoint.every = 3
  return c


def event_tags(path) -> dict:
  """{tag: [steps]} of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  data, tags, at = open(path, "rb").read(), {}, 0
  while at < len(data):
    (length,) = struct.unpack("Q", data[at:at + 8])
    event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
    at += 12 + length + 4
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append(event.step)
  return tags


@pytest.mark.fast
@pytest.mark.parametrize("field,value,match", [
    ("train.workdir", "s3://bucket/run", r"train.workdir='s3://bucket/run'.*local path or a gs://"),
    ("train.workdir", "gs:///run", r"train.workdir='gs:///run' names no bucket"),
    ("checkpoint.init_from", "hf://org/model", r"checkpoint.init_from='hf://org/model'.*not hf://"),
    ("tokenizer.path", URL, r"tokenizer.path='gs://fake-bucket/run'.*local folder"),
])
def test_a_run_directory_url_orbax_cannot_reach_is_refused_at_validation(field, value, match):
  c = base_config()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=match):
    validate(c)


@pytest.mark.fast
@pytest.mark.parametrize("missing", ["epath", "storage"])
def test_gs_without_its_clients_is_one_config_error_before_training(bucket, tmp_path, monkeypatch,
                                                                    missing):
  from jaxlm.train.loop import train
  if missing == "epath":  # what fsspec raises for gs:// when gcsfs is not installed

    class NoGcsfs:
      def __init__(self, *args, **kwargs):
        raise ImportError("Please install gcsfs to access Google Storage")

    for protocol in ("gs", "gcs"):
      monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, NoGcsfs)
    fake_gcs.clear_caches()
  else:
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # import raises ImportError
  with pytest.raises(ConfigError, match=rf"train.workdir='{URL}'.*pip install gcsfs google-cloud-storage"):
    train(run_config(tmp_path, URL))
  assert not (bucket / "fake-bucket").exists()  # nothing written, nothing trained


@pytest.mark.fast
def test_metrics_reach_the_bucket_at_each_sync_and_a_resumed_logger_appends(bucket):
  log = MetricsLogger(URL, total_steps=4, start_step=0, progress_bar=False, sync_secs=0)
  log.write(1, {"value": 1.0}, prefix="eval")
  jsonl = bucket / "fake-bucket" / "run" / "metrics.jsonl"
  assert [json.loads(x) for x in jsonl.read_text().splitlines()] == [{"step": 1, "eval/value": 1.0}]
  log.close()
  log = MetricsLogger(URL, total_steps=4, start_step=1, progress_bar=False)
  log.write(2, {"value": 2.0}, prefix="eval")
  log.close()
  assert [json.loads(x)["step"] for x in jsonl.read_text().splitlines()] == [1, 2]
  events = sorted((bucket / "fake-bucket" / "run" / "tensorboard").iterdir())
  assert len(events) == 2 and sorted(s for f in events for s in event_tags(f)["eval/value"]) == [1, 2]


def test_train_stop_resume_and_load_params_through_a_gs_bucket(bucket, tmp_path, compile_cache):
  from jaxlm.runs import load_params
  from jaxlm.train.loop import train
  local = train(run_config(tmp_path, str(tmp_path / "local")))
  train(run_config(tmp_path, URL), stop_at_step=3)
  run = bucket / "fake-bucket" / "run"
  assert (run / "checkpoints" / "3" / "commit_success.txt").exists()  # orbax's gs:// commit marker
  assert fake_gcs.requests("POST"), "TensorStore wrote no array through the fake GCS server"
  reads = len([p for p in fake_gcs.requests("GET") if "alt=media" in p])
  remote = train(run_config(tmp_path, URL))  # resumes from step 3 in the bucket
  assert len([p for p in fake_gcs.requests("GET") if "alt=media" in p]) > reads  # TensorStore's

  assert json.loads((run / "config.json").read_text())["train"]["workdir"] == URL
  assert (run / "tokenizer.model").exists()
  losses = [{r["step"]: r["train/loss"] for r in map(json.loads, open(p / "metrics.jsonl")) if "train/loss" in r}
            for p in (tmp_path / "local", run)]
  assert sorted(losses[1]) == [1, 2, 3, 4, 5, 6] and losses[0] == losses[1]  # bit-identical
  steps = sorted(s for f in (run / "tensorboard").iterdir() for s in event_tags(f)["train/loss"])
  assert steps == [1, 2, 3, 4, 5, 6]  # one events file per start: steps 1-3, then 4-6
  assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]

  loaded = load_params(URL)
  assert loaded.step == 6 and loaded.tokenizer.vocab_size == remote["tokenizer"].vocab_size
  for a, b, c in zip(jax.tree.leaves(nnx.to_pure_dict(loaded.params)),
                     jax.tree.leaves(nnx.to_pure_dict(remote["state"].params)),
                     jax.tree.leaves(nnx.to_pure_dict(local["state"].params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))

  c = run_config(tmp_path, str(tmp_path / "from_bucket"))  # a local run starting from the bucket's
  c.checkpoint.init_from = URL
  started = train(c, stop_at_step=0)["state"]
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(started.params)),
                  jax.tree.leaves(nnx.to_pure_dict(loaded.params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.fast
def test_init_from_a_bucket_without_a_run_names_the_fix(bucket):
  from jaxlm.train.init_from import read_source
  with pytest.raises(ConfigError, match=r"holds no jaxlm run .* must be a local path"):
    read_source("gs://fake-bucket/hf_model", base_config(), None, None, None)
