"""Checks of the fields that adapt or post-train a model: LoRA (lora.*) and the post-training
objectives (posttrain.*), and the helpers that read those fields the same way everywhere. Called
by jaxlm/config/checks.py `validate`; every error is a ConfigError naming the field and the fix."""

from __future__ import annotations

from jaxlm.config.fields import ConfigDict, ConfigError


# Projections LoRA can adapt (lora.targets), and the groups that name several.
LORA_TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
_LORA_GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("up", "gate", "down"),
                "all": LORA_TARGETS}


def lora_targets(lora: ConfigDict, model: ConfigDict) -> tuple[str, ...]:
  """The projections lora.targets names, in LORA_TARGETS order; raises ConfigError naming the field.
  A group leaves out what the model lacks (gate under a gelu MLP; q, k, v under MLA, whose
  queries, keys and values come from latent projections); a name it lacks is an error."""
  lacks = set()
  if model.mlp_kind == "gelu":
    lacks.add("gate")
  if model.attention_kind == "mla":
    lacks.update(("q", "k", "v"))
  names = set()
  for entry in (e.strip() for e in str(lora.targets).split(",")):
    if entry in _LORA_GROUPS:
      names.update(n for n in _LORA_GROUPS[entry] if n not in lacks)
    elif entry in LORA_TARGETS:
      if entry == "gate" and model.mlp_kind == "gelu":
        raise ConfigError("config field 'lora.targets' names 'gate' but model.mlp_kind is 'gelu', "
                          "whose MLP has no gate projection; drop 'gate'")
      if entry in lacks:
        raise ConfigError(f"config field 'lora.targets' names {entry!r} but model.attention_kind "
                          "is 'mla', whose queries, keys and values come from latent projections "
                          "LoRA does not adapt; target 'o' and the MLP's projections")
      names.add(entry)
    else:
      raise ConfigError(f"config field 'lora.targets': {entry!r} is not a projection; use a "
                        f"comma-separated list of {LORA_TARGETS} or the groups {tuple(_LORA_GROUPS)}")
  return tuple(n for n in LORA_TARGETS if n in names)


def validate_lora(config: ConfigDict) -> None:
  lo = config.lora
  if not isinstance(lo.rank, int) or lo.rank < 0:
    raise ConfigError(f"config field 'lora.rank' must be an integer >= 0 (0: off), got {lo.rank!r}")
  if not lo.rank:
    return
  if not lo.alpha > 0:
    raise ConfigError(f"config field 'lora.alpha' must be > 0, got {lo.alpha!r}")
  if lo.dropout:
    raise ConfigError(f"config field 'lora.dropout' is {lo.dropout!r}, but LoRA dropout is not "
                      "implemented; set lora.dropout=0")
  lora_targets(lo, config.model)
  if config.model.moe_num_experts and set(lora_targets(lo, config.model)) & {"up", "gate", "down"}:
    raise ConfigError("lora.targets names MLP projections but the model has MoE layers, whose experts "
                      "take no adapters yet; target attention only (lora.targets='attn')")


def rows_per_example(config: ConfigDict) -> int:
  """Batch rows per example of train.batch_size: 2 for the pair objectives (an example and its
  counterpart in adjacent rows, jaxlm/posttrain/record_data.py), else 1."""
  return 2 if config.posttrain.objective in ("dpo", "ipo", "kto", "reward") else 1


def validate_posttrain(config: ConfigDict) -> None:
  p, t = config.posttrain, config.train
  if p.objective == "lm":
    return
  name = f"posttrain.objective is '{p.objective}'"
  if not config.data.train_paths:
    raise ConfigError(f"{name} but data.train_paths is empty; give the JSONL records to train on")
  if not config.tokenizer.path:
    raise ConfigError(f"{name} but tokenizer.path is empty; give the tokenizer of the model being "
                      "post-trained (a run directory, tokenizer.json or .model)")
  if config.lora.rank and p.objective != "lm":
    raise ConfigError(f"{name} but lora.rank is {config.lora.rank}: LoRA trains with objective 'lm' "
                      "(pretraining, SFT) only; set lora.rank=0 for the other objectives")
  if p.objective in ("reward", "ppo") and config.mesh.stage != 1:
    raise ConfigError(f"{name} (a score head) runs without pipeline stages; set mesh.stage=1")
  if not 0 <= p.label_smoothing < 0.5:
    raise ConfigError(f"posttrain.label_smoothing must be in [0, 0.5), got {p.label_smoothing}")
  if p.reference == "precomputed" and p.objective not in ("dpo", "ipo", "kto"):
    raise ConfigError(f"posttrain.reference='precomputed' is for dpo/ipo/kto, not {p.objective}; "
                      "use posttrain.reference='model'")
  for field in ("group_size", "max_new_tokens", "updates_per_rollout"):
    if not (isinstance(p[field], int) and p[field] >= 1):
      raise ConfigError(f"config field 'posttrain.{field}' must be an integer >= 1, got {p[field]!r}")
  if p.objective in ("grpo", "ppo"):
    if t.batch_size % p.group_size:
      raise ConfigError(f"train.batch_size ({t.batch_size}) counts completions and must be a "
                        f"multiple of posttrain.group_size ({p.group_size})")
    if p.objective == "grpo" and p.group_size < 2:
      raise ConfigError("posttrain.group_size must be >= 2 for grpo (advantages compare a prompt's "
                        "completions with each other)")
    if not 0 < p.gae_lambda <= 1 or not 0 < p.gamma <= 1:
      raise ConfigError(f"posttrain.gamma ({p.gamma}) and posttrain.gae_lambda ({p.gae_lambda}) "
                        "must be in (0, 1]")
