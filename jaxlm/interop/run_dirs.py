"""Whole run directories to and from Hugging Face model directories (`python -m jaxlm.convert`).

from_hf: config.json, the tokenizer and an orbax checkpoint at step 0 (fresh optimizer state) that
  generation samples from and training resumes or starts from.
to_hf: a run's parameters (latest checkpoint or `step`) as config.json, sharded safetensors and
  their index, with the run's tokenizer files beside them.
"""

from __future__ import annotations

import json
import os


def from_hf(hf_dir: str, workdir: str) -> None:
  import jax

  from jaxlm.config import with_vocab_size
  from jaxlm.data.hf_tokenizer import HFTokenizer
  from jaxlm.data.tokenizer import load_tokenizer
  from jaxlm.interop import hf
  from jaxlm.runs import write_run_files
  from jaxlm.train.checkpoint import Checkpointer
  from jaxlm.train.init_from import start_from
  from jaxlm.train.setup import make_setup

  try:
    tokenizer = load_tokenizer(hf_dir)
  except FileNotFoundError as e:
    raise hf.InteropError(f"{e}: a model directory for jaxlm needs its tokenizer") from e
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = hf.config_from_hf(json.load(f))
  config.tokenizer.path = tokenizer.path
  # They must agree; the model may have rows its tokenizer never uses (Qwen2.5).
  config = with_vocab_size(config, tokenizer.vocab_size,
                           extra_rows_ok=isinstance(tokenizer, HFTokenizer))
  config.train.workdir = workdir
  config.checkpoint.async_save = False
  config.mesh.data = 1  # one device: the checkpoint restores onto any mesh later
  state = start_from(make_setup(config, jax.devices()[:1]), hf_dir)
  write_run_files(workdir, config, tokenizer)
  checkpointer = Checkpointer(workdir, config.checkpoint)
  checkpointer.save(0, state)
  checkpointer.wait()
  checkpointer.close()


def to_hf(workdir: str, hf_dir: str, step: int | None) -> None:
  from jaxlm.interop import hf
  from jaxlm.runs import load_params

  run = load_params(workdir, step)
  hf.save_model(run.model(), hf_dir, tokenizer=run.tokenizer)
