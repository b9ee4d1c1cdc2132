"""A run directory (a run's train.workdir): what training writes and what inference reads back.

Layout:
  config.json        the full config the run was started with (model.vocab_size filled in)
  tokenizer files    a copy of the run's tokenizer, so the run is self-contained: tokenizer.model (and
                     a tokenizer_config.json naming its special tokens) for SentencePiece;
                     tokenizer.json, tokenizer_config.json (and chat_template.jinja,
                     special_tokens_map.json where the source has them) for a Hugging Face one
  checkpoints/<step>/{state,data}   orbax CheckpointManager items, written by jaxlm/train/checkpoint.py;
                     "state" is the whole TrainState (step, params, opt_state, rng); a LoRA
                     run's params are its adapters alone, its base is config.json's
                     checkpoint.init_from

The run directory may be a local path or a gs:// URL (jaxlm/workdir.py): every file in it is read
and written through etils.epath or orbax. The tokenizer classes read and write local files only, so
a gs:// run's tokenizer files pass through a local folder on their way in and out.

Nothing here imports jaxlm.train, so sampling from a run needs neither the optimizer nor the loop
(except a LoRA run's: its base is read as checkpoint.init_from is, see jaxlm/posttrain/lora.py).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from jaxlm import checkpoint_health as health
from jaxlm.checkpoint_health import CheckpointError  # noqa: F401  (jaxlm.runs.CheckpointError)
from jaxlm.config import (ConfigError, base_config, flat_fields, parse_rules, unknown_field_error,
                          with_vocab_size)
from jaxlm.data.hf_tokenizer import (CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, CONFIG_FILE,
                                     SPECIAL_TOKENS_MAP_FILE, TOKENIZER_FILE, HFTokenizer)
from jaxlm.data.tokenizer import MODEL_FILE, AnyTokenizer, load_tokenizer
from jaxlm.models import build_model
from jaxlm.models.layers import ADAPTERS
from jaxlm.parallel.mesh import platform
from jaxlm.parallel.sharding import tree_shardings
from jaxlm.workdir import as_path, copy_tree, is_url


# Fields that moved from `model` to `compute` when the architecture was split from how it is run.
MOVED_TO_COMPUTE = ("param_dtype", "compute_dtype", "matmul_dtype", "scan_layers", "remat_policy",
                    "attention", "flash_block_q", "flash_block_k", "attention_blocks",
                    "pipeline_microbatches")


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run directory's config.json (any jaxlm version) -> today's config tree.

  Fields that moved are moved (model.attention -> compute.attention, ...); fields added since the
  run was written take their defaults. A field jaxlm never had is an error, as on the command line.
  """
  saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  model, compute = saved.get("model", {}), saved.setdefault("compute", {})
  for name in MOVED_TO_COMPUTE:
    if name in model:
      compute.setdefault(name, model.pop(name))
  config = base_config()
  known = flat_fields(config)
  for section, fields in saved.items():
    if not isinstance(fields, dict):
      raise ConfigError(f"saved config: '{section}' is not a section; known: {sorted(config)}")
    for name, value in fields.items():
      if f"{section}.{name}" not in known:
        raise unknown_field_error(f"{section}.{name}", known)
      config[section][name] = value
  return config


def checkpoint_dir(workdir: str) -> str:
  """Where orbax keeps the run's checkpoints: an absolute local path, or a URL under the run's."""
  return str(as_path(workdir) / "checkpoints")


# Every tokenizer file a run directory may hold; those the run's tokenizer does not write are
# removed, so a directory reused with another kind of tokenizer never reads back the old one.
TOKENIZER_FILES = (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE,
                   CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR)


def write_run_files(workdir: str, config, tokenizer: AnyTokenizer | str):
  """Saves what a later process needs to rebuild the model: the config and the tokenizer's files.

  tokenizer: a loaded tokenizer, or a path load_tokenizer takes.
  """
  root = as_path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(config.to_json_best_effort(indent=2))
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = load_tokenizer(tokenizer)
  if is_url(workdir):
    with tempfile.TemporaryDirectory(prefix="jaxlm-tokenizer-") as staging:
      written = tokenizer.save(staging)
      for name in written:
        copy_tree(as_path(staging) / name, root / name)
  else:
    written = tokenizer.save(workdir)
  for name in set(TOKENIZER_FILES) - set(written):
    stale = root / name
    if stale.is_dir():
      stale.rmtree()
    elif stale.exists():
      stale.unlink()


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json as today's config tree (a run written by an older jaxlm migrates)."""
  path = as_path(workdir) / "config.json"
  if not path.exists():
    raise CheckpointError(f"{path} not found: is {workdir} the train.workdir of a jaxlm run?")
  return from_saved(json.loads(path.read_text()))


def read_tokenizer(workdir: str) -> AnyTokenizer:
  """The run's copy of its tokenizer: tokenizer.json if there is one, else tokenizer.model. A
  gs:// run's files are first copied to a local folder kept until the process ends (the tokenizer
  may read or copy them again later, e.g. when a converted model is saved with it)."""
  root = as_path(workdir)
  if not any((root / n).is_file() for n in (TOKENIZER_FILE, MODEL_FILE)):
    raise CheckpointError(
        f"no {TOKENIZER_FILE} or {MODEL_FILE} in {workdir}: a run keeps a copy of its tokenizer "
        "there; copy the files of the tokenizer the run trained with (its tokenizer.path, or the "
        f"{MODEL_FILE} it trained in tokenizer.cache_dir) into the run directory")
  if not is_url(workdir):
    return load_tokenizer(workdir)
  local = tempfile.mkdtemp(prefix="jaxlm-tokenizer-")
  atexit.register(shutil.rmtree, local, ignore_errors=True)
  for name in TOKENIZER_FILES:
    if (root / name).exists():
      copy_tree(root / name, as_path(local) / name)
  return load_tokenizer(local)


@dataclasses.dataclass(frozen=True)
class LoadedParams:
  """A run's parameters at one checkpoint, with what it takes to run them."""
  graphdef: nnx.GraphDef  # the model's structure; nnx.merge(graphdef, params) is the model
  params: nnx.State  # the nnx.Param state, every array already in its target sharding
  config: ml_collections.ConfigDict  # the run's config.json, migrated to today's tree
  tokenizer: AnyTokenizer
  step: int  # the checkpoint's step

  def model(self):
    return nnx.merge(self.graphdef, self.params)


def load_params(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> LoadedParams:
  """Restores only the parameters of a run's checkpoint (by default the newest that can be read: a
  damaged newer one is skipped with a line on stderr and left as it is, see
  jaxlm/checkpoint_health.py).

  A LoRA run's (lora.rank > 0) come back merged: its adapters added into the base weights its
  config.json names (jaxlm/posttrain/lora.py, `merged_run_params`), as a plain model's parameters.
  Each array is read straight into its shards: on `mesh` (from jaxlm.parallel.mesh.make_mesh, any
  shape) with the sharding the run's rules table gives it, or whole on the first local device when
  mesh is None. The optimizer state in the same checkpoint is never read. Raises CheckpointError
  naming the fix when the run directory or the checkpoint is missing or unreadable.
  """
  config = read_config(workdir)
  tokenizer = read_tokenizer(workdir)
  config = with_vocab_size(config, tokenizer.vocab_size, extra_rows_ok=isinstance(tokenizer, HFTokenizer))
  abstract = nnx.eval_shape(
      lambda: build_model(config, platform=platform(mesh) if mesh else jax.default_backend()))
  # What the checkpoint holds: every parameter, or a LoRA run's adapters alone
  graphdef, shapes, _ = nnx.split(abstract, ADAPTERS if config.lora.rank else nnx.Param, ...)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  else:
    shardings = tree_shardings(shapes, mesh, parse_rules(config.mesh.rules))
  target = {"params": jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, shardings)}

  directory = checkpoint_dir(workdir)
  # Not read_only=True: it only adds warnings to the terminal; this manager never saves or deletes.
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))

  def attempt(s: int):
    try:
      health.check_tree(health.step_path(directory, s) / "state", target, partial=True)
    except health.Mismatch as e:
      raise health.Mismatch(
          f"checkpoint {health.step_path(directory, s)} could not be read: it holds other arrays "
          f"than {os.path.join(workdir, 'config.json')} builds ({e}). If config.json was edited "
          "since the run saved it, put the run's model and compute fields back") from e
    # partial_restore reads the subtree `target` names ("params") and skips the rest of the state.
    state = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    return manager.restore(s, args=ocp.args.Composite(state=state))

  def skip(s: int, why: str):  # read-only: the damaged step is left where it is
    print(f"jaxlm: checkpoint step {s} skipped: {why}; reading an earlier step", file=sys.stderr,
          flush=True)

  try:
    saved = sorted(manager.all_steps())
    if step is not None and step not in saved:
      raise CheckpointError(
          f"no checkpoint of step {step} in {directory} (saved steps: {saved}); train the run "
          "until it saves one, or pick a saved step")
    if step is not None:  # the step asked for, or an error
      try:
        restored = attempt(step)
      except CheckpointError:
        raise
      except Exception as e:  # orbax raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {health.step_path(directory, step)} could not be read "
            f"({health.describe(e)}); if the files are damaged, pick another of the saved steps "
            f"{saved} (or delete that step's folder)") from e
    else:  # the newest readable step
      step, restored, skipped = health.newest_readable(saved, attempt, skip)
      if step is None and not skipped:
        raise CheckpointError(
            f"no checkpoint in {directory} (saved steps: []); train the run until it saves one")
      if step is None:
        raise CheckpointError(
            f"no readable checkpoint in {directory}: "
            + "; ".join(f"step {s} could not be read ({why})" for s, why in skipped)
            + ". If the files are damaged, delete that step's folder (or move it aside) to read an "
            "earlier one, copy a good checkpoint back, or train the run again")
  finally:
    manager.close()
  params = restored["state"]["params"]
  if config.lora.rank:
    from jaxlm.posttrain.lora import merged_run_params
    graphdef, params = merged_run_params(config, params, mesh)
  return LoadedParams(graphdef, params, config, tokenizer, step)
