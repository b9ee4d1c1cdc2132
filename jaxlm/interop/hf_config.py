"""Hugging Face config.json <-> jaxlm's `config.model`, for every supported family.

`config_from_hf` reads a config.json (transformers 4 and 5 spellings, each class's defaults for
fields left out) into a full jaxlm config; `config_to_hf` writes the config.json of the family that
expresses a jaxlm model exactly. What jaxlm cannot reproduce exactly is an InteropError naming it.
The mixture-of-experts families' own fields are read and written in hf_moe.py.
"""

from __future__ import annotations

from jaxlm.config import ConfigDict, base_config, layer_kinds
from jaxlm.interop import hf_moe
from jaxlm.interop.errors import InteropError, refuse

FAMILIES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},  # q, k, v biases; the output projection has none
    "Qwen3ForCausalLM": {"qk_norm": True},  # RMSNorm over head_dim on queries and keys, before RoPE
    "GemmaForCausalLM": {"mlp_kind": "geglu", "norm_plus_one": True, "scale_embeddings": True},
    "Gemma2ForCausalLM": {"mlp_kind": "geglu", "norm_plus_one": True, "scale_embeddings": True,
                          "post_norms": True},
    "Gemma3ForCausalLM": {"mlp_kind": "geglu", "norm_plus_one": True, "scale_embeddings": True,
                          "post_norms": True, "qk_norm": True},
    # the Llama layout's attention and dense MLPs; their MoE (and DeepSeek's MLA) fields: hf_moe.py
    "MixtralForCausalLM": {},
    "Qwen3MoeForCausalLM": {},
    "DeepseekV3ForCausalLM": {},
}
GEMMA = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# transformers' defaults for the Gemma fields a config.json may leave out (their config classes)
_GEMMA_DEFAULTS = {
    "GemmaForCausalLM": {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                         "max_position_embeddings": 8192, "rope_theta": 10000.0},
    "Gemma2ForCausalLM": {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                          "max_position_embeddings": 8192, "rope_theta": 10000.0,
                          "query_pre_attn_scalar": 256, "sliding_window": 4096,
                          "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "Gemma3ForCausalLM": {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                          "max_position_embeddings": 131072, "rope_theta": 1e6,
                          "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
                          "sliding_window": 4096, "sliding_window_pattern": 6,
                          "final_logit_softcapping": None, "attn_logit_softcapping": None},
}
_GEMMA_ACTIVATION = "gelu_pytorch_tanh"  # GeGLU with tanh GELU: jaxlm's geglu
SUPPORTED = tuple(FAMILIES)
_ROPE_FIELDS = {  # rope_scaling type -> (HF field -> jaxlm model field)
    "llama3": {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_len"},
    "linear": {"factor": "rope_scaling_factor"},
    "yarn": {"factor": "rope_scaling_factor", "beta_fast": "yarn_beta_fast",
             "beta_slow": "yarn_beta_slow",
             "original_max_position_embeddings": "rope_original_max_len"},
}


def _rope(hf: dict) -> dict:
  """RoPE fields from `rope_scaling` + `rope_theta` (transformers 4) or `rope_parameters`
  (transformers 5, theta inside)."""
  scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  theta = float(scaling.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return {"rope_scaling": "none", "rope_theta": theta}
  if kind not in _ROPE_FIELDS:
    raise InteropError(f"rope_scaling type {kind!r} is not one jaxlm implements; it knows "
                       f"{sorted(_ROPE_FIELDS)} (and none)")
  unknown = set(scaling) - set(_ROPE_FIELDS[kind]) - {"rope_type", "type"}
  if unknown:
    raise InteropError(f"rope_scaling fields {sorted(unknown)} ({kind}) have no jaxlm equivalent; "
                       "loading would silently change the model")
  fields = {"rope_scaling": kind, "rope_theta": theta}
  for hf_name, name in _ROPE_FIELDS[kind].items():
    if hf_name in scaling:
      fields[name] = scaling[hf_name]
  if kind in ("llama3", "yarn") and "original_max_position_embeddings" not in scaling:
    raise InteropError(f"rope_scaling {kind} without original_max_position_embeddings: the "
                       "context the model was pretrained with is needed to place the scaling")
  return fields


def config_from_hf(hf: dict) -> ConfigDict:
  """A full jaxlm config whose `model` section is the HF config.json's architecture."""
  arch = (hf.get("architectures") or ["?"])[0]
  if arch not in SUPPORTED:
    hint = (" (Gemma 3 loads text-only: Gemma3ForCausalLM, model_type gemma3_text)"
            if arch.startswith("Gemma3") else "")
    raise InteropError(f"architecture {arch!r} is not supported; jaxlm loads {list(SUPPORTED)}{hint}")
  if hf.get("pretraining_tp", 1) != 1:
    raise InteropError("pretraining_tp > 1 splits the projections differently; save with 1")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  hf, mscale = hf_moe.split_yarn_mscale(arch, hf)
  fields = _gemma_fields(arch, hf) if arch in GEMMA else _llama_fields(arch, hf)
  head_dim = fields.pop("head_dim")
  c = base_config()
  c.model.update(
      vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=0 if head_dim == d // heads else head_dim, mlp_dim=hf["intermediate_size"],
      norm_kind="rmsnorm", position_kind="rope", **fields)
  c.model.update(**FAMILIES[arch], **mscale)
  if arch in hf_moe.FAMILIES:
    c.model.update(**hf_moe.config_fields(arch, hf))
  c.tokenizer.vocab_size = hf["vocab_size"]
  return c


def _llama_fields(arch: str, hf: dict) -> dict:
  """Model fields of the Llama-layout families (Llama, Mistral, Qwen2, Qwen3; the MoE families'
  attention and dense MLPs)."""
  if hf.get("hidden_act", "silu") != "silu":
    raise InteropError(f"hidden_act {hf['hidden_act']!r}: Llama's MLP in jaxlm is SwiGLU (silu)")
  window = 0
  if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
    window = hf.get("sliding_window") or 0  # every layer
  elif hf.get("use_sliding_window"):
    raise InteropError(f"{arch} with use_sliding_window: a per-layer window pattern is not "
                       "supported yet; load a checkpoint saved with use_sliding_window=false")
  if set(hf.get("layer_types") or ["full_attention"]) != {"full_attention"} and arch not in (
      "MistralForCausalLM", "MixtralForCausalLM"):
    raise InteropError(f"layer_types {sorted(set(hf['layer_types']))}: per-layer attention "
                       f"patterns of {arch} are not supported yet")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  return dict(
      head_dim=hf.get("head_dim") or d // heads, mlp_kind="swiglu",
      norm_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf["max_position_embeddings"],
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
      sliding_window=window, **_rope(hf))


def _period(kinds: list[bool]) -> str:
  """The shortest cyclic model.layer_pattern whose layer i is kinds[i] (True: L, local)."""
  text = "".join("L" if k else "G" for k in kinds)
  for p in range(1, len(text) + 1):
    if all(text[i] == text[i % p] for i in range(len(text))):
      return text[:p]
  return text


def _gemma_fields(arch: str, hf: dict) -> dict:
  """Model fields of Gemma 1/2/3 as transformers reads their config.json (its defaults for what is
  left out); what transformers would compute and jaxlm cannot is refused by name."""
  defaults = _GEMMA_DEFAULTS[arch]

  def get(name):
    return hf[name] if name in hf else defaults.get(name)

  if arch == "GemmaForCausalLM":  # transformers reads hidden_act, and takes "gelu" as the tanh GELU
    allowed = {"hidden_act": ("gelu", _GEMMA_ACTIVATION), "hidden_activation": (None, _GEMMA_ACTIVATION)}
  else:  # transformers reads hidden_activation
    allowed = {"hidden_activation": (_GEMMA_ACTIVATION,), "hidden_act": (None, _GEMMA_ACTIVATION)}
  for name, values in allowed.items():
    if hf.get(name, values[-1]) not in values:
      raise InteropError(f"{arch} with {name} {hf[name]!r}: jaxlm's Gemma MLP is GeGLU with the tanh "
                         f"GELU; only {_GEMMA_ACTIVATION!r} loads exactly")
  if hf.get("attention_bias"):
    raise InteropError(f"{arch} with attention_bias: Gemma then biases the output projection too, "
                       "which jaxlm's attention has no parameter for")
  if hf.get("use_bidirectional_attention"):
    raise InteropError(f"{arch} with use_bidirectional_attention: jaxlm's attention is causal")
  if arch == "Gemma3ForCausalLM" and hf.get("model_type", "gemma3_text") != "gemma3_text":
    raise InteropError(f"Gemma3ForCausalLM with model_type {hf['model_type']!r}: jaxlm loads the "
                       "text-only model (model_type gemma3_text)")
  d, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
  head_dim = get("head_dim") or d // heads
  fields = dict(head_dim=head_dim, mlp_kind="geglu", norm_eps=get("rms_norm_eps"),
                max_seq_len=get("max_position_embeddings"),
                tie_embeddings=bool(get("tie_word_embeddings")), attention_bias=False, mlp_bias=False)
  if arch == "GemmaForCausalLM":  # every layer global, scores scaled by head_dim**-0.5, no caps
    return fields | _rope({**hf, "rope_theta": get("rope_theta")})

  scalar = get("query_pre_attn_scalar")
  fields["query_pre_attn_scalar"] = 0.0 if scalar == head_dim else float(scalar)
  fields["final_logit_softcap"] = float(get("final_logit_softcapping") or 0.0)
  attn_cap = get("attn_logit_softcapping")
  if arch == "Gemma3ForCausalLM" and attn_cap:
    raise InteropError(f"Gemma3ForCausalLM with attn_logit_softcapping {attn_cap}: transformers' "
                       "Gemma 3 attention does not apply it, so jaxlm cannot tell which model is meant; "
                       "set it to null")
  fields["attn_logit_softcap"] = float(attn_cap or 0.0)

  types = hf.get("layer_types")
  if types is None:  # Gemma 2: alternating, layer 0 local; Gemma 3: (pattern - 1) local, then 1 global
    period = 2 if arch == "Gemma2ForCausalLM" else get("sliding_window_pattern")
    types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
  if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
    raise InteropError(f"layer_types {types}: jaxlm reads one of 'sliding_attention' or "
                       f"'full_attention' per layer ({layers} layers)")
  pattern = _period([t == "sliding_attention" for t in types])
  window = get("sliding_window") if "L" in pattern else 0
  if "L" in pattern and not window:
    raise InteropError(f"{arch} has sliding_attention layers but sliding_window is {window!r}")
  if arch == "Gemma3ForCausalLM":
    rope_fields, local_theta = _gemma3_rope(hf, get)
    if "L" not in pattern:
      local_theta = 0.0
  else:  # one RoPE for every layer
    rope_fields, local_theta = _rope({**hf, "rope_theta": get("rope_theta")}), 0.0
    if pattern == "L":
      pattern = ""  # every layer local: model.sliding_window applies to all
  if pattern == "G":
    pattern = ""
  return fields | rope_fields | dict(layer_pattern=pattern, sliding_window=window,
                                     rope_local_theta=float(local_theta))


def _gemma3_rope(hf: dict, get) -> tuple[dict, float]:
  """(global layers' RoPE fields, local layers' theta) of a Gemma 3 config.json: transformers 4's
  rope_theta + rope_scaling (global) + rope_local_base_freq, or transformers 5's rope_parameters
  {"full_attention": ..., "sliding_attention": ...}."""
  params = hf.get("rope_parameters")
  if not params:
    glob = _rope({"rope_scaling": hf.get("rope_scaling"), "rope_theta": get("rope_theta")})
    return glob, float(get("rope_local_base_freq"))
  if set(params) - {"full_attention", "sliding_attention"}:
    raise InteropError(f"Gemma3ForCausalLM rope_parameters {sorted(params)}: expected one entry per "
                       "layer type, 'full_attention' and 'sliding_attention'")
  if hf.get("rope_scaling"):
    raise InteropError("Gemma3ForCausalLM with both rope_parameters and rope_scaling: give one")
  full = dict(params.get("full_attention") or {})
  glob = _rope({"rope_parameters": full, "rope_theta": get("rope_theta")})
  sliding = dict(params.get("sliding_attention") or {})
  if sliding.get("rope_type", "default") != "default" or set(sliding) - {"rope_type", "rope_theta"}:
    raise InteropError(f"Gemma3ForCausalLM sliding_attention RoPE {sliding}: jaxlm's local layers "
                       "use plain RoPE (rope_type default)")
  return glob, float(sliding.get("rope_theta", get("rope_local_base_freq")))


_GEMMA_FEATURES = ("norm_plus_one", "scale_embeddings", "post_norms", "layer_pattern",
                   "rope_local_theta", "query_pre_attn_scalar")


def _family(m) -> str:
  """The HF architecture that expresses jaxlm model config `m` exactly; InteropError if none does."""
  if m.moe_num_experts:
    return hf_moe.family(m)
  common = {"norm_kind": m.norm_kind != "rmsnorm", "position_kind": m.position_kind != "rope",
            # MLA (DeepSeek) and its YaRN factors: no export wired yet
            "attention_kind": m.attention_kind != "standard", "yarn_mscale": m.yarn_mscale != 1,
            "yarn_mscale_all_dim": bool(m.yarn_mscale_all_dim)}
  if not any(m[name] for name in _GEMMA_FEATURES):
    refuse("no supported Hugging Face architecture", {
        **common, "mlp_kind": m.mlp_kind != "swiglu", "attn_logit_softcap": bool(m.attn_logit_softcap),
        "final_logit_softcap": bool(m.final_logit_softcap)})
    if m.qk_norm:
      return "Qwen3ForCausalLM"
    if m.attention_bias:
      return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if m.sliding_window else "LlamaForCausalLM"
  # Gemma: GeGLU, (1 + w) RMSNorms and scaled embeddings always come together
  refuse("Gemma (the architectures with model fields "
          f"{[k for k in _GEMMA_FEATURES if m[k]]} set)", {
              **common, "mlp_kind": m.mlp_kind != "geglu", "norm_plus_one": not m.norm_plus_one,
              "scale_embeddings": not m.scale_embeddings, "attention_bias": m.attention_bias,
              "mlp_bias": m.mlp_bias})
  if m.qk_norm:
    refuse("Gemma3ForCausalLM", {"post_norms": not m.post_norms,
                                  "attn_logit_softcap": bool(m.attn_logit_softcap)})
    kinds = layer_kinds(m) or (bool(m.sliding_window),) * m.num_layers
    if m.rope_scaling != "none" and any(kinds) and not m.rope_local_theta:
      raise InteropError("Gemma3ForCausalLM's local layers have unscaled RoPE; this config scales "
                         "theirs (model.rope_scaling without model.rope_local_theta): set "
                         "model.rope_local_theta")
    return "Gemma3ForCausalLM"
  if m.post_norms:
    if m.rope_local_theta and (m.rope_local_theta != m.rope_theta or m.rope_scaling != "none"):
      raise InteropError("Gemma2ForCausalLM has one RoPE for every layer; this config sets "
                         "model.rope_local_theta")
    return "Gemma2ForCausalLM"
  refuse("GemmaForCausalLM (Gemma 1)", {
      "sliding_window": bool(m.sliding_window), "layer_pattern": bool(m.layer_pattern),
      "rope_local_theta": bool(m.rope_local_theta), "query_pre_attn_scalar": bool(m.query_pre_attn_scalar),
      "attn_logit_softcap": bool(m.attn_logit_softcap), "final_logit_softcap": bool(m.final_logit_softcap),
      "qk_norm": m.qk_norm})
  return "GemmaForCausalLM"


def _gemma_to_hf(arch: str, m, head_dim: int) -> dict:
  """The Gemma-specific config.json fields of jaxlm model config `m`."""
  if arch == "GemmaForCausalLM":
    return {"hidden_act": _GEMMA_ACTIVATION, "attention_bias": False}
  kinds = layer_kinds(m) or (bool(m.sliding_window),) * m.num_layers
  scalar = m.query_pre_attn_scalar or head_dim
  if scalar != int(scalar):
    raise InteropError(f"model.query_pre_attn_scalar {scalar}: transformers' {arch} takes a whole number")
  hf = {
      "hidden_activation": _GEMMA_ACTIVATION, "attention_bias": False,
      "query_pre_attn_scalar": int(scalar),
      # unused when no layer slides; transformers still builds the sliding mask, so give it a size
      "sliding_window": m.sliding_window or m.max_seq_len,
      "layer_types": ["sliding_attention" if k else "full_attention" for k in kinds],
      "attn_logit_softcapping": m.attn_logit_softcap or None,
      "final_logit_softcapping": m.final_logit_softcap or None,
  }
  if arch == "Gemma3ForCausalLM":
    hf["rope_local_base_freq"] = m.rope_local_theta or m.rope_theta
  return hf


def config_to_hf(m) -> dict:
  """The HF config.json of jaxlm model config `m` (written in the transformers 4 spelling, which
  transformers 5 reads too)."""
  arch = _family(m)
  head_dim = m.head_dim or m.d_model // m.num_heads
  rope = None
  if m.rope_scaling != "none":
    rope = {"rope_type": m.rope_scaling}
    rope.update({hf_name: m[name] for hf_name, name in _ROPE_FIELDS[m.rope_scaling].items()})
    if "original_max_position_embeddings" in rope:
      rope["original_max_position_embeddings"] = m.rope_original_max_len or m.max_seq_len
  model_type = {"Gemma3ForCausalLM": "gemma3_text"}.get(arch, arch.removesuffix("ForCausalLM").lower())
  hf = {
      "architectures": [arch], "model_type": model_type,
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.mlp_dim,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads, "head_dim": head_dim, "hidden_act": "silu",
      "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta, "rope_scaling": rope, "tie_word_embeddings": m.tie_embeddings,
      "torch_dtype": "float32",
  }
  if arch in GEMMA:
    del hf["hidden_act"]
    hf.update(_gemma_to_hf(arch, m, head_dim))
    return hf
  if arch in hf_moe.FAMILIES:
    hf_moe.config_to_hf(arch, m, hf)
    return hf
  if arch == "LlamaForCausalLM":
    hf.update(attention_bias=False, mlp_bias=m.mlp_bias)
  elif arch == "MistralForCausalLM":
    hf["sliding_window"] = m.sliding_window
  else:
    hf.update(use_sliding_window=False, sliding_window=None)
    if arch == "Qwen3ForCausalLM":
      hf["attention_bias"] = m.attention_bias
  if m.mlp_bias and arch != "LlamaForCausalLM":
    raise InteropError(f"{arch} has no MLP biases; this config sets model.mlp_bias")
  if m.sliding_window and arch != "MistralForCausalLM":
    raise InteropError(f"{arch} as exported here has no sliding window; this config sets one")
  return hf
