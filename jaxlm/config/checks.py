"""Checking a config tree once, at start-up (`validate`), and the helpers that read fields the same
way everywhere: the rules table, layer kinds, overrides on the command line (LoRA and post-training
fields: jaxlm/config/posttrain_checks.py).
Every error is a ConfigError naming the field and the fix."""

from __future__ import annotations

from jaxlm.config.fields import ConfigDict, ConfigError, base_config
from jaxlm.config.posttrain_checks import validate_lora, validate_posttrain
from jaxlm.config.sparse_checks import validate_mla, validate_moe

_CHOICES = {
    "model.mlp_kind": ("swiglu", "geglu", "gelu"),
    "model.norm_kind": ("rmsnorm", "layernorm"),
    "model.position_kind": ("rope", "learned"),
    "model.rope_scaling": ("none", "linear", "llama3", "yarn"),
    "model.attention_kind": ("standard", "mla"),
    "model.moe_router": ("softmax", "sigmoid"),
    "compute.param_dtype": ("float32", "bfloat16"),
    "compute.compute_dtype": ("float32", "bfloat16"),
    "compute.matmul_dtype": ("", "float32", "bfloat16"),
    "compute.remat_policy": ("none", "full", "dots", "dots_no_batch"),
    "compute.attention": ("xla", "flash", "splash", "cudnn", "auto"),
    "compute.context_parallel": ("all_gather", "ring"),
    "compute.pipeline_schedule": ("gpipe", "circular"),
    "tokenizer.model_type": ("bpe", "unigram"),
    "data.source": ("shakespeare", "text", "jsonl", "tfds", "chat"),
    "data.on_bad_record": ("error", "skip"),
    "posttrain.objective": ("lm", "dpo", "ipo", "kto", "reward", "grpo", "ppo"),
    "posttrain.reference": ("model", "precomputed"),
    "posttrain.loss_aggregation": ("token", "sequence"),
    "train.schedule": ("cosine", "linear", "wsd", "constant"),
    "checkpoint.resume": ("auto", "always", "never"),
    "checkpoint.on_save_error": ("stop", "warn"),
}

_POSITIVE = (
    "model.vocab_multiple", "model.d_model", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.mlp_dim", "model.max_seq_len", "compute.attention_blocks",
    "compute.pipeline_repeats", "data.seq_len",
    "train.steps",
    "train.batch_size", "train.grad_accum_steps", "train.log_every", "checkpoint.keep",
    "train.max_bad_steps", "train.peer_timeout_seconds", "train.start_timeout_seconds",
)
_NON_NEGATIVE = (
    "model.vocab_size", "model.head_dim", "compute.flash_block_q", "compute.flash_block_k",
    "model.sliding_window", "model.attn_logit_softcap", "model.final_logit_softcap",
    "model.rope_local_theta", "model.query_pre_attn_scalar", "model.q_lora_rank",
    "model.kv_lora_rank", "model.qk_nope_head_dim", "model.qk_rope_head_dim", "model.v_head_dim",
    "model.yarn_mscale", "model.yarn_mscale_all_dim",
    "model.moe_num_experts", "model.moe_mlp_dim", "model.moe_shared_experts", "model.moe_groups",
    "model.moe_topk_groups", "model.moe_first_dense_layers", "model.moe_capacity_factor",
    "model.moe_exchange_factor",
    "train.moe_balance_loss", "train.moe_z_loss", "train.moe_bias_rate",
    "compute.pipeline_microbatches",
    "train.warmup_steps", "train.weight_decay", "train.clip_norm",
    "train.z_loss", "train.loss_chunk", "train.eval_every", "train.eval_batches", "checkpoint.every",
    "train.loss_spike_factor", "train.num_processes",
    "sample.max_new_tokens", "sample.temperature", "sample.top_k", "sample.min_p",
    "posttrain.beta", "posttrain.rpo_alpha", "posttrain.kto_desirable_weight", "posttrain.kto_undesirable_weight",
    "posttrain.reward_center", "posttrain.temperature", "posttrain.epsilon", "posttrain.kl_beta",
    "posttrain.value_coef", "posttrain.value_epsilon", "posttrain.ppo_kl_coef",
)


def with_vocab_size(config: ConfigDict, tokenizer_vocab: int, extra_rows_ok: bool = False
                    ) -> ConfigDict:
  """A copy of config with model.vocab_size = the tokenizer's vocabulary (the one place they meet).

  model.vocab_size 0 takes it; a set value (a published architecture) must equal it, or may exceed
  it when extra_rows_ok (a published model's Hugging Face tokenizer: embedding rows it never uses).
  """
  given = config.model.vocab_size
  if given and given > tokenizer_vocab and extra_rows_ok:
    return config.copy_and_resolve_references()
  if given and given != tokenizer_vocab:
    raise ConfigError(
        f"model.vocab_size is {given} but the tokenizer has {tokenizer_vocab} tokens; set "
        f"model.vocab_size={tokenizer_vocab} (or 0: take the tokenizer's), or use a tokenizer of "
        f"{given} tokens (tokenizer.path, or tokenizer.vocab_size when training one)")
  config = config.copy_and_resolve_references()
  config.model.vocab_size = int(tokenizer_vocab)
  return config


def flat_fields(cfg: ConfigDict, prefix: str = "") -> dict:
  """{"section.field": value} of every field in a config tree."""
  out = {}
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if isinstance(v, ConfigDict):
      out.update(flat_fields(v, name + "."))
    else:
      out[name] = v
  return out


def unknown_field_error(name: str, known: dict) -> ConfigError:
  """The error for a field no config has, listing the fields of its section."""
  section = name.rsplit(".", 1)[0]
  options = sorted(k.rsplit(".", 1)[1] for k in known if k.startswith(section + "."))
  if not options:
    options = sorted({k.split(".", 1)[0] for k in known})
  return ConfigError(f"unknown config field '{name}'; known fields there are: {options}")


def check_overrides(argv) -> None:
  """Rejects `--config.<field>=...` flags that name no field, before absl parses them."""
  known = flat_fields(base_config())
  for arg in argv:
    if arg.startswith("--config."):
      name = arg[len("--config."):].split("=", 1)[0]
      if name not in known:
        raise unknown_field_error(name, known)


# Mesh axes, outermost (slowest links) to innermost (fastest); see jaxlm/parallel/mesh.py.
MESH_AXES = ("data", "stage", "fsdp", "sequence", "expert", "tensor")
# The names model code gives array dimensions; see jaxlm/parallel/rules.py.
# "stage" is the pipeline's stage dimension (jaxlm/parallel/pipeline.py).
# "lora" is a LoRA adapter's rank dimension (replicated unless the rules name it).
# "latent" is MLA's low-rank query and key/value width (q_lora_rank, kv_lora_rank [+ the RoPE
# key]): replicated unless the rules name it, so the latent is whole on every tensor shard and
# only its per-head expansion (heads) is split.
# "experts" is a MoE layer's expert dimension (jaxlm/models/moe.py), split over the `expert` mesh
# axis by the default rules (expert parallelism, jaxlm/parallel/experts.py).
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers",
                "stage", "lora", "latent", "experts")


# URL schemes a run directory (train.workdir, a run as checkpoint.init_from) may use: {scheme:
# (jaxlm's extra, the packages in it its clients need)}; see jaxlm/workdir.py.
RUN_DIR_SCHEMES = {"gs": ("gcs", "gcsfs google-cloud-storage")}


def is_url(location) -> bool:
  return "://" in str(location)


def check_location(location: str, field: str) -> None:
  """Refuses a URL orbax cannot keep checkpoints at: its TensorStore reaches only local files and
  gs://. Names the field; no I/O (whether the scheme's clients are installed is checked at the
  first touch, jaxlm.workdir.as_path)."""
  if not is_url(location):
    return
  scheme, _, rest = str(location).partition("://")
  if scheme not in RUN_DIR_SCHEMES:
    raise ConfigError(
        f"{field}={location!r}: a run directory is a local path or a gs:// URL (orbax writes "
        f"checkpoint arrays through TensorStore, which reaches local files and gs:// only), not "
        f"{scheme}://; mount the bucket (e.g. with a FUSE client) and give the mount's local path, "
        "or use gs://BUCKET/PATH")
  if not rest.split("/", 1)[0]:
    raise ConfigError(f"{field}={location!r} names no bucket; give {scheme}://BUCKET/PATH")


def parse_rules(text: str) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
  """mesh.rules text -> ((logical name, mesh axes or None), ...); raises ConfigError naming the entry."""
  rules, seen = [], set()
  for entry in (e.strip() for e in text.split(",")):
    if not entry:
      continue
    name, sep, axes = (p.strip() for p in entry.partition(":"))
    if not sep:
      raise ConfigError(f"config field 'mesh.rules': entry {entry!r} is not 'logical:mesh_axis[+axis]'")
    if name not in LOGICAL_AXES:
      raise ConfigError(f"config field 'mesh.rules': {name!r} is not a logical axis; use one of {LOGICAL_AXES}")
    if name in seen:
      raise ConfigError(f"config field 'mesh.rules': {name!r} is listed twice; give it one entry")
    seen.add(name)
    mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
    for a in mesh_axes:
      if a not in MESH_AXES:
        raise ConfigError(f"config field 'mesh.rules': {name!r} maps to {a!r}, not a mesh axis; use {MESH_AXES}")
    if len(set(mesh_axes)) != len(mesh_axes):
      raise ConfigError(f"config field 'mesh.rules': {name!r} names a mesh axis twice")
    rules.append((name, mesh_axes or None))
  return tuple(rules)


def _validate_mesh(mesh: ConfigDict) -> None:
  for prefix in ("", "dcn_"):
    free = []
    for axis in MESH_AXES:
      name, value = f"mesh.{prefix}{axis}", mesh[prefix + axis]
      if not isinstance(value, int) or not (value >= 1 or value == -1):
        raise ConfigError(f"config field '{name}' must be a positive size or -1 (the rest), got {value!r}")
      if value == -1:
        free.append(name)
    if len(free) > 1:
      raise ConfigError(f"config fields {free} are all -1; at most one mesh axis may absorb the rest")
  parse_rules(mesh.rules)


def layer_kinds(m) -> tuple[bool, ...] | None:
  """Per layer of config.model `m`: True where it is local (model.layer_pattern's L), False where
  global (G); None without a pattern (every layer alike)."""
  if not m.layer_pattern:
    return None
  return tuple(m.layer_pattern[i % len(m.layer_pattern)] == "L" for i in range(m.num_layers))


def _validate_layer_pattern(m: ConfigDict) -> None:
  pattern = m.layer_pattern
  if not isinstance(pattern, str) or set(pattern) - {"L", "G"}:
    raise ConfigError(f"config field 'model.layer_pattern' is {pattern!r}; use a string of L (local, "
                      "sliding window) and G (global) layers, e.g. 'LG' (Gemma 2), or '' (every "
                      "layer alike)")
  if "L" in pattern and not m.sliding_window:
    raise ConfigError(f"config field 'model.layer_pattern' {pattern!r} has local (L) layers but "
                      "model.sliding_window is 0; set the local layers' window")
  if m.rope_local_theta and "L" not in pattern:
    raise ConfigError("config field 'model.rope_local_theta' is set but model.layer_pattern has no "
                      "local (L) layer to use it; set model.layer_pattern or rope_local_theta=0")
  if m.rope_local_theta and m.position_kind != "rope":
    raise ConfigError("config field 'model.rope_local_theta' is set but model.position_kind is "
                      f"{m.position_kind!r}; local RoPE needs position_kind='rope'")


def validate(config: ConfigDict) -> ConfigDict:
  """Checks every field once; returns the config so callers can chain. Raises ConfigError."""
  known, given = flat_fields(base_config()), flat_fields(config)
  for name in given:
    if name not in known:
      raise unknown_field_error(name, known)
  for name in known:
    if name not in given:
      raise ConfigError(f"config field '{name}' is missing; build configs from jaxlm.config.base_config()")
  for name, choices in _CHOICES.items():
    if given[name] not in choices:
      raise ConfigError(f"config field '{name}' is {given[name]!r}; choose one of {choices}")
  for name in _POSITIVE:
    if not given[name] > 0:
      raise ConfigError(f"config field '{name}' must be > 0, got {given[name]!r}")
  for name in _NON_NEGATIVE:
    if not given[name] >= 0:
      raise ConfigError(f"config field '{name}' must be >= 0, got {given[name]!r}")

  m, d, t = config.model, config.data, config.train
  if t.process_id < -1 or (t.num_processes and t.process_id >= t.num_processes):
    raise ConfigError(f"train.process_id is {t.process_id}; give each process a distinct id in "
                      f"[0, train.num_processes={t.num_processes or '?'}), or -1 to take JAX_PROCESS_ID")
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads ({m.num_kv_heads})")
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(
        f"model.d_model ({m.d_model}) is not divisible by model.num_heads ({m.num_heads}); "
        "set model.head_dim explicitly")
  for name in ("flash_block_q", "flash_block_k"):
    if config.compute[name] % 8:
      raise ConfigError(
          f"config field 'compute.{name}' must be a multiple of 8 (TPU: of 128), got {config.compute[name]}")
  if config.compute.attention == "cudnn" and m.attn_logit_softcap:
    raise ConfigError("compute.attention='cudnn' does not support model.attn_logit_softcap; use 'flash' or 'xla'")
  if config.compute.context_parallel == "ring" and config.compute.attention in ("splash", "cudnn"):
    raise ConfigError(
        f"compute.context_parallel='ring' computes each key/value block with xla or jaxlm's flash "
        f"kernels, and compute.attention is {config.compute.attention!r}; set compute.attention to "
        "'flash', 'xla' or 'auto', or compute.context_parallel='all_gather'")
  if config.compute.context_parallel == "ring" and m.attention_kind == "mla":
    raise ConfigError("compute.context_parallel='ring' is not wired for model.attention_kind='mla'; "
                      "use compute.context_parallel='all_gather'")
  if not isinstance(config.compute.offload_optimizer, bool):
    raise ConfigError(f"config field 'compute.offload_optimizer' must be True or False, got "
                      f"{config.compute.offload_optimizer!r}")
  if config.compute.offload_optimizer and (config.mesh.stage != 1 or config.mesh.dcn_stage != 1):
    raise ConfigError("compute.offload_optimizer=True streams the layers' optimizer state one layer "
                      "at a time, which is not implemented across pipeline stages; set mesh.stage=1 "
                      "(and mesh.dcn_stage=1) or compute.offload_optimizer=False")
  _validate_layer_pattern(m)
  validate_mla(config)
  validate_lora(config)
  validate_moe(config)
  if d.seq_len > m.max_seq_len:
    raise ConfigError(
        f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); "
        "shorten data.seq_len or raise model.max_seq_len")
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(
        f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum_steps "
        f"({t.grad_accum_steps})")
  if t.loss_chunk and d.seq_len % t.loss_chunk:
    raise ConfigError(
        f"train.loss_chunk ({t.loss_chunk}) must divide data.seq_len ({d.seq_len}); pick a divisor "
        "of the sequence length, or 0 for no chunking")
  if t.warmup_steps > t.steps:
    raise ConfigError(f"train.warmup_steps ({t.warmup_steps}) exceeds train.steps ({t.steps})")
  if t.loss_spike_factor and t.loss_spike_factor <= 1:
    raise ConfigError(f"train.loss_spike_factor must be 0 (off) or > 1, got {t.loss_spike_factor}")
  if not 0 <= t.min_lr_ratio <= 1:
    raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
  if not 0 < t.wsd_decay_fraction <= 1:
    raise ConfigError(f"train.wsd_decay_fraction must be in (0, 1], got {t.wsd_decay_fraction}")
  if (m.yarn_mscale != 1 or m.yarn_mscale_all_dim) and m.rope_scaling != "yarn":
    raise ConfigError("config fields 'model.yarn_mscale' / 'model.yarn_mscale_all_dim' apply to "
                      f"rope_scaling='yarn' only, and model.rope_scaling is {m.rope_scaling!r}; "
                      "set yarn_mscale=1 and yarn_mscale_all_dim=0")
  if m.rope_scaling != "none" and m.rope_scaling_factor < 1:
    raise ConfigError(f"model.rope_scaling_factor must be >= 1, got {m.rope_scaling_factor}")
  if not 0 < config.sample.top_p <= 1:
    raise ConfigError(f"sample.top_p must be in (0, 1], got {config.sample.top_p}")
  if d.source in ("text", "jsonl", "chat") and not d.train_paths:
    raise ConfigError(f"data.source is '{d.source}' but data.train_paths is empty; give file paths or globs")
  if d.source == "chat" and not config.tokenizer.path:
    raise ConfigError("data.source is 'chat' but tokenizer.path is empty; give the tokenizer of the "
                      "model being fine-tuned (a run directory, tokenizer.json or .model)")
  if d.chat_template not in ("", "default") and not d.chat_template.endswith((".jinja", ".j2")):
    raise ConfigError(f"data.chat_template is {d.chat_template!r}; use '' (the tokenizer's own), "
                      "'default' or a path to a .jinja file")
  if not isinstance(d.allow_reshard, bool):
    raise ConfigError(f"data.allow_reshard must be True or False, got {d.allow_reshard!r}")
  if d.source == "tfds" and not d.tfds_name:
    raise ConfigError("data.source is 'tfds' but data.tfds_name is empty; name a prepared dataset, e.g. 'lm1b'")
  check_location(t.workdir, "train.workdir")
  check_location(config.checkpoint.init_from, "checkpoint.init_from")
  if is_url(config.tokenizer.path):  # jaxlm/data reads tokenizers from local files
    raise ConfigError(
        f"tokenizer.path={config.tokenizer.path!r}: a tokenizer is read from local files; copy its "
        "tokenizer.json or tokenizer.model (a run directory keeps them at its top) to a local "
        "folder and give that")
  _validate_mesh(config.mesh)
  validate_posttrain(config)
  return config
