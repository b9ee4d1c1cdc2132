"""Hugging Face checkpoints in and out of jaxlm: config.json <-> config.model, safetensors <-> parameters.

    model, config = hf.load_model("path/to/hf_dir")   # config.json + *.safetensors
    hf.save_model(model, "path/to/out")             # what transformers.AutoModelForCausalLM loads

Supported so far: Llama 2/3/3.1/3.2 (RoPE scalings llama3, linear, yarn), Mistral (sliding window),
Qwen2/2.5 (q/k/v biases), Qwen3 (QK-norm), Gemma 1, Gemma 2 and Gemma 3 text-only (Gemma3ForCausalLM,
model_type gemma3_text). An architecture or a config value jaxlm cannot reproduce exactly is refused
with a message naming it; nothing is approximated silently.

Gemma, as transformers computes it: GeGLU with tanh GELU (gelu_pytorch_tanh), RMSNorms that store
w and scale by (1 + w), embeddings times sqrt(hidden_size) (rounded to the activations' dtype),
tied embeddings by default. Gemma 2 and 3 add a norm on each sublayer's output
(post_attention_layernorm, then pre_feedforward_layernorm and post_feedforward_layernorm: in Llama,
post_attention_layernorm is the MLP's input norm instead), scores scaled by
query_pre_attn_scalar**-0.5, and local (sliding window: a query sees keys with q - k < window) and
global layers by layer_types (model.layer_pattern). Gemma 2 soft-caps attention and output logits;
Gemma 3 has QK-norm and gives its local layers their own RoPE theta (rope_local_base_freq), unscaled,
while rope_theta and rope_scaling apply to the global layers only.

Layout: HF stores each projection as torch's Linear weight [out, in]; jaxlm keeps [in, *out] with
heads as their own axis (q: [embed, heads, head_dim], o: [heads, head_dim, embed]). Both use the
half-split RoPE pairing, so q/k rows need no permutation. Safetensors are memory-mapped and each
tensor is read once (in its stored dtype, bfloat16 included) into its parameter's place.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.config import ConfigDict, base_config, layer_kinds, parse_rules
from jaxlm.models import build_model
from jaxlm.parallel.mesh import platform
from jaxlm.parallel.sharding import tree_shardings

# Architecture -> the model fields its family fixes beyond the Llama layout they all share.
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


class InteropError(ValueError):
  """A checkpoint jaxlm cannot load exactly; the message names what and the fix."""


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
  fields = _gemma_fields(arch, hf) if arch in GEMMA else _llama_fields(arch, hf)
  head_dim = fields.pop("head_dim")
  c = base_config()
  c.model.update(
      vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=0 if head_dim == d // heads else head_dim, mlp_dim=hf["intermediate_size"],
      norm_kind="rmsnorm", position_kind="rope", **fields)
  c.model.update(**FAMILIES[arch])
  c.tokenizer.vocab_size = hf["vocab_size"]
  return c


def _llama_fields(arch: str, hf: dict) -> dict:
  """Model fields of the Llama-layout families (Llama, Mistral, Qwen2, Qwen3)."""
  if hf.get("hidden_act", "silu") != "silu":
    raise InteropError(f"hidden_act {hf['hidden_act']!r}: Llama's MLP in jaxlm is SwiGLU (silu)")
  window = 0
  if arch == "MistralForCausalLM":
    window = hf.get("sliding_window") or 0  # every layer
  elif hf.get("use_sliding_window"):
    raise InteropError(f"{arch} with use_sliding_window: a per-layer window pattern is not "
                       "supported yet; load a checkpoint saved with use_sliding_window=false")
  if set(hf.get("layer_types") or ["full_attention"]) != {"full_attention"} and arch != "MistralForCausalLM":
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


def _tensors(path: str) -> dict:
  """name -> (file, name) for every tensor of the checkpoint's safetensors file(s)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
  single = os.path.join(path, "model.safetensors")
  if not os.path.exists(single):
    raise InteropError(f"no model.safetensors or model.safetensors.index.json in {path}: is it a "
                       "Hugging Face model directory saved with safe_serialization?")
  with safe_open(single, framework="flax") as f:
    return {name: single for name in f.keys()}


def _layer_weights(num_heads: int, num_kv_heads: int, head_dim: int, post_norms: bool = False) -> dict:
  """jaxlm block parameter path -> (HF name inside layers.<i>., HF -> jaxlm, jaxlm -> HF).

  post_norms (Gemma 2/3): post_attention_layernorm is the attention output's norm and the MLP's
  input norm is pre_feedforward_layernorm; in Llama (and Gemma 1) post_attention_layernorm is the
  MLP's input norm.
  """
  def heads_in(n):  # HF [n * head_dim, embed] <-> jaxlm [embed, n, head_dim]
    return (lambda w: w.T.reshape(w.shape[1], n, head_dim), lambda p: p.reshape(p.shape[0], -1).T)

  def head_bias(n):  # HF [n * head_dim] <-> jaxlm [n, head_dim]
    return (lambda b: b.reshape(n, head_dim), lambda p: p.reshape(-1))

  heads_out = (lambda w: w.T.reshape(num_heads, head_dim, -1), lambda p: p.reshape(-1, p.shape[-1]).T)
  linear = (lambda w: w.T, lambda p: p.T)  # HF [out, in] <-> jaxlm [in, out]
  same = (lambda w: w, lambda p: p)
  return {
      ("attn", "q"): ("self_attn.q_proj.weight", *heads_in(num_heads)),
      ("attn", "k"): ("self_attn.k_proj.weight", *heads_in(num_kv_heads)),
      ("attn", "v"): ("self_attn.v_proj.weight", *heads_in(num_kv_heads)),
      ("attn", "o"): ("self_attn.o_proj.weight", *heads_out),
      ("attn", "q_bias"): ("self_attn.q_proj.bias", *head_bias(num_heads)),
      ("attn", "k_bias"): ("self_attn.k_proj.bias", *head_bias(num_kv_heads)),
      ("attn", "v_bias"): ("self_attn.v_proj.bias", *head_bias(num_kv_heads)),
      ("mlp", "gate"): ("mlp.gate_proj.weight", *linear),
      ("mlp", "up"): ("mlp.up_proj.weight", *linear),
      ("mlp", "down"): ("mlp.down_proj.weight", *linear),
      ("mlp", "gate_bias"): ("mlp.gate_proj.bias", *same),
      ("mlp", "up_bias"): ("mlp.up_proj.bias", *same),
      ("mlp", "down_bias"): ("mlp.down_proj.bias", *same),
      ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", *same),
      ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", *same),
      ("attn_norm", "scale"): ("input_layernorm.weight", *same),
      **({("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", *same),
          ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", *same),
          ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", *same)} if post_norms else
         {("mlp_norm", "scale"): ("post_attention_layernorm.weight", *same)}),
  }


def _has(tree: dict, keys: tuple) -> bool:
  for key in keys:
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def _put(tree: dict, keys: tuple, value) -> None:
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


def load_model(path: str, mesh: jax.sharding.Mesh | None = None, dtype=None):
  """(Transformer, full jaxlm config) of a Hugging Face model directory.

  mesh: parameters are placed with the rules table's shardings on it (None: the default device).
  dtype: master-weight dtype (default compute.param_dtype, float32).
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise InteropError(f"{config_path} not found: point at a Hugging Face model directory")
  with open(config_path) as f:
    config = config_from_hf(json.load(f))
  if dtype is not None:
    config.compute.param_dtype = np.dtype(dtype).name
  m = config.model
  target_platform = platform(mesh) if mesh is not None else jax.default_backend()
  abstract = nnx.eval_shape(lambda: build_model(config, platform=target_platform))
  graphdef, state = nnx.split(abstract, nnx.Param)
  shapes = nnx.to_pure_dict(state)
  files = _tensors(path)
  handles = {}

  def read(name):
    if name not in files:
      raise InteropError(f"tensor {name!r} missing from the checkpoint in {path}")
    file = files[name]
    if file not in handles:
      # framework="flax": numpy has no bfloat16, the dtype most published checkpoints are in.
      handles[file] = safe_open(file, framework="flax")
    return handles[file].get_tensor(name)

  head_dim = m.head_dim or m.d_model // m.num_heads
  out = {"embed": read("model.embed_tokens.weight"), "final_norm": {"scale": read("model.norm.weight")}}
  if not m.tie_embeddings:
    out["unembed"] = read("lm_head.weight").T
  layers = [{} for _ in range(m.num_layers)]
  block = shapes["blocks"] if config.compute.scan_layers else shapes["blocks"][0]
  for keys, (hf_name, convert, _) in _layer_weights(m.num_heads, m.num_kv_heads, head_dim,
                                                    m.post_norms).items():
    if not _has(block, keys):  # an optional weight this architecture does not have
      continue
    for i in range(m.num_layers):
      _put(layers[i], keys, convert(read(f"model.layers.{i}.{hf_name}")))
  if config.compute.scan_layers:
    out["blocks"] = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *layers)
  else:
    out["blocks"] = dict(enumerate(layers))

  def place(value, shape):
    if value.shape != shape.shape:
      raise InteropError(f"a tensor of shape {value.shape} does not fit the parameter of shape "
                         f"{shape.shape} that config.json describes; the checkpoint and its "
                         "config.json disagree")
    return value.astype(shape.dtype)

  values = jax.tree.map(place, out, shapes)
  nnx.replace_by_pure_dict(state, values)
  if mesh is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), state)
  else:
    shardings = tree_shardings(state, mesh, parse_rules(config.mesh.rules))
  state = jax.device_put(state, shardings)
  return nnx.merge(graphdef, state), config


_GEMMA_FEATURES = ("norm_plus_one", "scale_embeddings", "post_norms", "layer_pattern",
                   "rope_local_theta", "query_pre_attn_scalar")


def _refuse(what: str, fields: dict) -> None:
  """InteropError naming the model fields (name -> True where the config sets it so) `what` lacks."""
  bad = sorted(k for k, v in fields.items() if v)
  if bad:
    raise InteropError(f"{what} has no model fields {bad} as this config sets them")


def _family(m) -> str:
  """The HF architecture that expresses jaxlm model config `m` exactly; InteropError if none does."""
  common = {"norm_kind": m.norm_kind != "rmsnorm", "position_kind": m.position_kind != "rope"}
  if not any(m[name] for name in _GEMMA_FEATURES):
    _refuse("no supported Hugging Face architecture", {
        **common, "mlp_kind": m.mlp_kind != "swiglu", "attn_logit_softcap": bool(m.attn_logit_softcap),
        "final_logit_softcap": bool(m.final_logit_softcap)})
    if m.qk_norm:
      return "Qwen3ForCausalLM"
    if m.attention_bias:
      return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if m.sliding_window else "LlamaForCausalLM"
  # Gemma: GeGLU, (1 + w) RMSNorms and scaled embeddings always come together
  _refuse("Gemma (the architectures with model fields "
          f"{[k for k in _GEMMA_FEATURES if m[k]]} set)", {
              **common, "mlp_kind": m.mlp_kind != "geglu", "norm_plus_one": not m.norm_plus_one,
              "scale_embeddings": not m.scale_embeddings, "attention_bias": m.attention_bias,
              "mlp_bias": m.mlp_bias})
  if m.qk_norm:
    _refuse("Gemma3ForCausalLM", {"post_norms": not m.post_norms,
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
  _refuse("GemmaForCausalLM (Gemma 1)", {
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


def save_model(model, path: str, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `model` (a jaxlm Transformer) as a Hugging Face model directory: config.json,
  model-0000i-of-0000n.safetensors shards of at most max_shard_bytes, and their index.

  Tensors keep the parameters' dtype; padded vocabulary rows are dropped.
  """
  m = model.cfg
  hf_config = config_to_hf(m)
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  vocab = m.vocab_size
  tensors = {"model.embed_tokens.weight": params["embed"][:vocab]}
  head_dim = m.head_dim or m.d_model // m.num_heads
  blocks = params["blocks"]
  for keys, (hf_name, _, to_hf) in _layer_weights(m.num_heads, m.num_kv_heads, head_dim,
                                                  m.post_norms).items():
    layer0 = blocks if model.compute.scan_layers else blocks[0]
    if not _has(layer0, keys):
      continue
    for i in range(m.num_layers):
      value = blocks if model.compute.scan_layers else blocks[i]
      for key in keys:
        value = value[key]
      tensors[f"model.layers.{i}.{hf_name}"] = to_hf(value[i] if model.compute.scan_layers else value)
  tensors["model.norm.weight"] = params["final_norm"]["scale"]
  if not m.tie_embeddings:
    tensors["lm_head.weight"] = params["unembed"][:, :vocab].T
  tensors = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
  hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype)

  shards, size = [[]], 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += value.nbytes
  os.makedirs(path, exist_ok=True)
  weight_map = {}
  for i, names in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: tensors[n] for n in names}, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({n: file for n in names})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
