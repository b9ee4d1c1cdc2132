"""`python -m jaxlm.convert --from_hf=DIR --workdir=RUN` | `--to_hf=DIR --workdir=RUN [--step=N]`

--from_hf: a Hugging Face model directory becomes a jaxlm run directory (config.json, the
  tokenizer, an orbax checkpoint at step 0 with fresh optimizer state) that `python -m
  jaxlm.generate --workdir=RUN` samples from and that training resumes or starts from
  (`--config.checkpoint.init_from=RUN`). The tokenizer is DIR's tokenizer.json (with its
  tokenizer_config.json and chat template: Llama 3, Qwen) or, when there is none, its SentencePiece
  tokenizer.model.
--to_hf: a jaxlm run's parameters (latest checkpoint, or --step) become a Hugging Face model
  directory (config.json, sharded safetensors, index) that transformers loads, with the run's
  tokenizer beside them: its tokenizer.json files, or tokenizer.model and a tokenizer_config.json.
  A LoRA run (lora.rank > 0) is exported merged: its adapters added into the base its config.json
  names (checkpoint.init_from), as one plain model.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

_FROM_HF = flags.DEFINE_string("from_hf", None, "A Hugging Face model directory to import.")
_TO_HF = flags.DEFINE_string("to_hf", None, "A directory to write the run's model to, in HF format.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The jaxlm run directory (written or read).")
_STEP = flags.DEFINE_integer("step", None, "--to_hf: the checkpoint step; default the latest.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or (_FROM_HF.value is None) == (_TO_HF.value is None):
    raise app.UsageError("give --workdir and exactly one of --from_hf=DIR or --to_hf=DIR")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from jaxlm.config import ConfigError
  from jaxlm.interop.hf import InteropError
  from jaxlm.interop.run_dirs import from_hf, to_hf
  from jaxlm.runs import CheckpointError
  try:
    if _FROM_HF.value:
      from_hf(_FROM_HF.value, _WORKDIR.value)
      print(f"wrote jaxlm run {_WORKDIR.value} (step 0) from {_FROM_HF.value}")
    else:
      to_hf(_WORKDIR.value, _TO_HF.value, _STEP.value)
      print(f"wrote Hugging Face model {_TO_HF.value} from {_WORKDIR.value}")
  except (ConfigError, InteropError, CheckpointError, FileNotFoundError) as e:
    sys.exit(f"jaxlm: {e}")


if __name__ == "__main__":
  app.run(main)
