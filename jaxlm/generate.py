"""`python -m jaxlm.generate --workdir=runs/x [--step=...] [--prompt=... | --prompts_file=F
[--output=O.jsonl]] [--batch_size=32] [--num_samples=1] [--draft_workdir=runs/d --draft_k=4]
[--sharded] [--max_new_tokens=...] [--temperature=...] [--top_k=...] [--top_p=...] [--min_p=...]
[--seed=...]`

Samples from a checkpoint of a training run (the latest by default), reading only its parameters
(jaxlm.runs.load_params): onto the default device, or with --sharded over all devices in the run's
own mesh layout and rules. Sampling defaults come from the run's saved config (its `sample`
section); any flag given overrides them, so a run reproduces its end-of-training sample with no
flags and can be explored without editing files.

--prompt prints the continuation(s) as text. --prompts_file (one prompt a line, or JSONL with a
"prompt" field) generates in batches of --batch_size rows of any lengths and writes one JSON line
per completion (index, sample, prompt, completion, tokens, finish, logprob) to --output or stdout.
--draft_workdir names a smaller run with the same tokenizer that drafts --draft_k tokens a round
for the target to check (speculative decoding: the same outputs, fewer target calls).
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
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Prompts, one a line (or .jsonl with a \"prompt\" field).")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL results of --prompts_file; default: stdout.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows generated together (prompts x samples).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "A draft run for speculative decoding.")
_DRAFT_K = flags.DEFINE_integer("draft_k", 4, "Tokens the draft proposes a round.")
_SHARDED = flags.DEFINE_bool("sharded", False, "Place the parameters over all devices in the run's mesh layout.")

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


def _load(workdir, mesh_from_run: bool):
  """A run's parameters (and the mesh and rules they are placed with, or None)."""
  from jaxlm import runs
  from jaxlm.config import parse_rules
  from jaxlm.parallel.mesh import make_mesh

  if not mesh_from_run:
    return runs.load_params(workdir, _STEP.value), None, None
  config = runs.read_config(workdir)
  mesh = make_mesh(config)
  return runs.load_params(workdir, _STEP.value, mesh=mesh), mesh, parse_rules(config.mesh.rules)


def _decoding_layout(run):
  """The run with its parameters in the layout a decode loop reads directly (see
  jaxlm.inference.layout): done once here, not per batch, since it copies the weights."""
  import dataclasses

  from jaxlm.inference.layout import for_decoding

  graphdef, params = for_decoding(run.graphdef, run.params)
  return dataclasses.replace(run, graphdef=graphdef, params=params)


def _generate(run, draft, prompt_ids, sample_cfg, key, mesh, rules):
  """Completions (and the draft's stats, or None) of token-id prompts."""
  from jaxlm.inference.decode import generate_batch
  from jaxlm.inference.speculative import speculative_batch

  settings = dict(max_new_tokens=sample_cfg.max_new_tokens, key=key,
                  temperature=sample_cfg.temperature, top_k=sample_cfg.top_k,
                  top_p=sample_cfg.top_p, min_p=sample_cfg.min_p, eos_id=run.tokenizer.eos_id,
                  mesh=mesh, rules=rules)
  if draft is None:
    return generate_batch(run.graphdef, run.params, prompt_ids, **settings), None
  return speculative_batch((run.graphdef, run.params), (draft.graphdef, draft.params), prompt_ids,
                           k=_DRAFT_K.value, **settings)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the train.workdir of a jaxlm run")
  if _PROMPT.value is not None and _PROMPTS_FILE.value:
    raise app.UsageError("give --prompt or --prompts_file, not both")
  for flag in (_BATCH_SIZE, _NUM_SAMPLES, _DRAFT_K):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep checkpoint-library INFO lines off the terminal
  free_large_buffers_to_the_os()
  import json

  import jax  # heavy imports after flag parsing, so --help stays fast

  from jaxlm import runs
  from jaxlm.inference import prompts as prompt_files

  try:
    texts = prompt_files.read_prompts(_PROMPTS_FILE.value) if _PROMPTS_FILE.value else None
    run, mesh, rules = _load(_WORKDIR.value, _SHARDED.value)
    draft = None
    if _DRAFT_WORKDIR.value:
      draft = runs.load_params(_DRAFT_WORKDIR.value, mesh=mesh) if mesh else runs.load_params(_DRAFT_WORKDIR.value)
  except (runs.CheckpointError, ValueError) as e:  # the message names the fix; a trace would bury it
    sys.exit(f"jaxlm: {e}")
  run, draft = (None if r is None else _decoding_layout(r) for r in (run, draft))
  sample_cfg = sample_settings(run.config.sample)
  if texts is None:
    texts = [sample_cfg.prompt]
  tok = run.tokenizer
  jobs = [(i, j) for i in range(len(texts)) for j in range(_NUM_SAMPLES.value)]
  ids = [prompt_files.encode(tok, t) for t in texts]
  out = open(_OUTPUT.value, "w", encoding="utf-8") if _OUTPUT.value else sys.stdout
  key = jax.random.key(_SEED.value)
  try:
    for start in range(0, len(jobs), _BATCH_SIZE.value):
      chunk = jobs[start:start + _BATCH_SIZE.value]
      # The first batch samples with the seed's key itself, as training's end-of-run sample does,
      # so `--workdir` alone reproduces that sample.
      chunk_key = key if start == 0 else jax.random.fold_in(key, start)
      done, stats = _generate(run, draft, [ids[i] for i, _ in chunk], sample_cfg, chunk_key, mesh,
                              rules)
      for (i, j), tokens, logp, finish in zip(chunk, done.tokens, done.logprobs, done.finish):
        line = prompt_files.result_line(tok, i, texts[i], ids[i], j, tokens, logp, finish)
        if _PROMPTS_FILE.value:
          out.write(json.dumps(line, ensure_ascii=False) + "\n")
        else:
          out.write(f"{texts[i]}{line['completion']}\n")
      if stats is not None:
        logging.warning("draft acceptance %.2f over %d rounds", stats.acceptance, stats.rounds)
  except ValueError as e:  # too long a prompt, a bad sampling setting, a draft of another vocabulary
    raise app.UsageError(str(e)) from e
  finally:
    if out is not sys.stdout:
      out.close()


def run():
  """Console-script entry point (`jaxlm-generate`)."""
  app.run(main)


if __name__ == "__main__":
  app.run(main)
