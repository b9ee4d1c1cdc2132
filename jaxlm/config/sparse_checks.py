"""Checks of the fields of the two architectures beyond the dense decoder: mixture-of-experts layers
(model.moe_*) and multi-head latent attention (model.attention_kind='mla'). Called by
jaxlm/config/checks.py `validate`; every error is a ConfigError naming the field and the fix."""

from __future__ import annotations

from jaxlm.config.fields import ConfigDict, ConfigError


def moe_layers(m) -> tuple[bool, ...]:
  """Per layer of config.model `m`: True where its MLP is a mixture of experts (model.moe_*)."""
  first, every = m.moe_first_dense_layers, m.moe_every
  return tuple(bool(m.moe_num_experts) and i >= first and (i - first + 1) % every == 0
               for i in range(m.num_layers))


def validate_moe(config: ConfigDict) -> None:
  m = config.model
  if not m.moe_num_experts:
    return
  e, k = m.moe_num_experts, m.moe_experts_per_token
  for name in ("moe_num_experts", "moe_experts_per_token", "moe_every"):
    if not (isinstance(m[name], int) and m[name] >= 1):
      raise ConfigError(f"config field 'model.{name}' must be an integer >= 1, got {m[name]!r}")
  if k > e:
    raise ConfigError(f"model.moe_experts_per_token ({k}) exceeds model.moe_num_experts ({e}); "
                      "a token picks at most every expert once")
  if not any(moe_layers(m)):
    raise ConfigError(f"model.moe_num_experts is {e} but no layer is MoE: model.moe_first_dense_layers "
                      f"({m.moe_first_dense_layers}) and model.moe_every ({m.moe_every}) leave all "
                      f"{m.num_layers} layers dense; lower them, or set moe_num_experts=0")
  if m.moe_groups or m.moe_topk_groups:
    g, tg = m.moe_groups, m.moe_topk_groups
    if not g or e % g:
      raise ConfigError(f"model.moe_groups ({g}) must divide model.moe_num_experts ({e}) when "
                        "group-limited routing is on (0 with moe_topk_groups=0: off)")
    if not 1 <= tg <= g or tg * (e // g) < k:
      raise ConfigError(f"model.moe_topk_groups ({tg}) must be in [1, moe_groups={g}] and its groups "
                        f"must hold at least moe_experts_per_token ({k}) experts")
  if not m.moe_routed_scale > 0:
    raise ConfigError(f"model.moe_routed_scale must be > 0, got {m.moe_routed_scale}")
  if m.moe_exchange_factor and m.moe_capacity_factor:
    raise ConfigError(f"model.moe_exchange_factor ({m.moe_exchange_factor}) sizes the expert-parallel "
                      f"dropless dispatch, but model.moe_capacity_factor ({m.moe_capacity_factor}) "
                      "chooses capacity dispatch; set one of them to 0")
  if m.mlp_bias:
    raise ConfigError("model.mlp_bias with MoE layers (model.moe_num_experts > 0) is not implemented; "
                      "set model.mlp_bias=False")
  if (config.mesh.stage != 1 or config.mesh.dcn_stage != 1) and not all(moe_layers(m)):
    raise ConfigError("pipeline stages (mesh.stage or mesh.dcn_stage > 1) split one stack of alike "
                      "layers, but this model mixes dense and MoE layers (model.moe_first_dense_layers "
                      f"{m.moe_first_dense_layers}, model.moe_every {m.moe_every}); make every layer MoE "
                      "(moe_first_dense_layers=0, moe_every=1) or set mesh.stage=1 and mesh.dcn_stage=1")
  if (config.mesh.stage != 1 or config.mesh.dcn_stage != 1) and config.compute.pipeline_schedule != "gpipe":
    raise ConfigError("compute.pipeline_schedule='circular' does not carry MoE router statistics out "
                      "of the schedule yet; set compute.pipeline_schedule='gpipe' for MoE models")


def validate_mla(config: ConfigDict) -> None:
  """MLA's own fields (see model.attention_kind), and what it cannot be combined with."""
  m = config.model
  if m.attention_kind != "mla":
    for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      if m[name]:
        raise ConfigError(f"config field 'model.{name}' is set but model.attention_kind is "
                          f"{m.attention_kind!r}; it is an MLA field: set attention_kind='mla' or "
                          f"{name}=0")
    if m.yarn_mscale_all_dim:
      raise ConfigError("config field 'model.yarn_mscale_all_dim' is DeepSeek's MLA softmax scale "
                        "adjustment; set model.attention_kind='mla' or yarn_mscale_all_dim=0")
    return
  for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    if not m[name] > 0:
      raise ConfigError(f"config field 'model.{name}' must be > 0 with model.attention_kind='mla', "
                        f"got {m[name]!r}")
  if m.qk_rope_head_dim % 2:
    raise ConfigError(f"config field 'model.qk_rope_head_dim' must be even (RoPE rotates pairs), "
                      f"got {m.qk_rope_head_dim}")
  refused = {  # field: (its value counts as set, why MLA cannot take it)
      "position_kind": (m.position_kind != "rope", "MLA's decoupled key is a RoPE key: use 'rope'"),
      "num_kv_heads": (m.num_kv_heads != m.num_heads,
                       f"MLA expands one latent into every head's key and value: set it to "
                       f"model.num_heads ({m.num_heads})"),
      "head_dim": (bool(m.head_dim), "MLA's widths are qk_nope_head_dim, qk_rope_head_dim and "
                                     "v_head_dim: set head_dim=0"),
      "sliding_window": (bool(m.sliding_window), "MLA attends the whole causal context: set 0"),
      "layer_pattern": (bool(m.layer_pattern), "MLA layers are all global: set ''"),
      "attn_logit_softcap": (bool(m.attn_logit_softcap), "not implemented for MLA: set 0"),
      "qk_norm": (bool(m.qk_norm), "MLA normalises its latents instead: set False"),
      "attention_bias": (bool(m.attention_bias), "not implemented for MLA: set False"),
      "query_pre_attn_scalar": (bool(m.query_pre_attn_scalar),
                                "MLA scales by (qk_nope_head_dim + qk_rope_head_dim)**-0.5: set 0"),
  }
  for name, (is_set, why) in refused.items():
    if is_set:
      raise ConfigError(f"config field 'model.{name}' is {m[name]!r} but model.attention_kind is "
                        f"'mla'; {why}")
  if config.compute.attention == "cudnn":
    raise ConfigError("compute.attention='cudnn' is not wired for model.attention_kind='mla' (its "
                      "query/key and value widths differ); use 'flash' (values zero-padded to the "
                      "query/key width) or 'xla'")
