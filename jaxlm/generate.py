"""`python -m jaxlm.generate --workdir=runs/x [--step=...] [--prompt=...] [--max_new_tokens=...]
[--temperature=...] [--top_k=...] [--top_p=...] [--min_p=...] [--seed=...]`

Samples from a checkpoint of a training run (the latest by default), reading only its parameters
onto the default device (jaxlm.runs.load_params). Sampling defaults come from the run's saved
config (its `sample` section); any flag given overrides them, so a run reproduces its end-of-training
sample with no flags and can be explored without editing files.
"""

from __future__ import annotations

import ctypes
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "train.workdir of a jaxlm run (holds checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to sample from; default: the latest.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue; default: the run's sample.prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate; default: sample.max_new_tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0: greedy; default: sample.temperature.")
_TOP_K = flags.DEFINE_integer("top_k", None, "0: off; default: sample.top_k.")
_TOP_P = flags.DEFINE_float("top_p", None, "1: off; default: sample.top_p.")
_MIN_P = flags.DEFINE_float("min_p", None, "0: off; default: sample.min_p.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")

_OVERRIDES = {"prompt": _PROMPT, "max_new_tokens": _MAX_NEW_TOKENS, "temperature": _TEMPERATURE,
              "top_k": _TOP_K, "top_p": _TOP_P, "min_p": _MIN_P}


def sample_settings(saved_sample_cfg):
  """The run's `sample` section with every flag that was given applied on top (a copy)."""
  cfg = saved_sample_cfg.copy_and_resolve_references()
  for name, flag in _OVERRIDES.items():
    if flag.value is not None:
      cfg[name] = flag.value
  return cfg


def free_large_buffers_to_the_os() -> None:
  """Has glibc serve allocations of 64 KiB and up with mmap, so memory freed is returned at once.

  Restoring a checkpoint decompresses it through many mid-sized buffers that are freed as soon as
  the arrays are built; glibc's default keeps such freed memory in the heap, and this process's
  peak memory then reached 1.6-2.3x the parameter bytes while loading, against ~1.4x with this
  (tests/test_load_params.py measures it). A no-op where the C library is not glibc.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  m_mmap_threshold = -3  # glibc's mallopt parameter number; a fixed threshold also stops its growth
  libc.mallopt(m_mmap_threshold, 1 << 16)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the train.workdir of a jaxlm run")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep checkpoint-library INFO lines off the terminal
  free_large_buffers_to_the_os()
  import jax  # heavy imports after flag parsing, so --help stays fast

  from jaxlm import runs
  from jaxlm.inference.decode import generate_text

  try:
    run = runs.load_params(_WORKDIR.value, _STEP.value)
  except runs.CheckpointError as e:  # the message names the fix; a trace would bury it
    sys.exit(f"jaxlm: {e}")
  sample_cfg = sample_settings(run.config.sample)
  try:
    text = generate_text((run.graphdef, run.params), run.tokenizer, sample_cfg.prompt, sample_cfg,
                         jax.random.key(_SEED.value))
  except ValueError as e:  # bad sampling setting or too long a generation: the message says which
    raise app.UsageError(str(e)) from e
  print(f"{sample_cfg.prompt}{text}")


def run():
  """Console-script entry point (`jaxlm-generate`)."""
  app.run(main)


if __name__ == "__main__":
  app.run(main)
