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
half-split RoPE pairing, so q/k rows need no permutation. The tables `_top_weights` and
`_layer_weights` are the one description of which HF tensor holds which parameter and how its
dimensions map (see sharded_load.Layout); loading reads each device's slice of each tensor on its
own (in its stored dtype, bfloat16 included, cast to the parameter dtype), straight into the mesh.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxlm.config import ConfigDict, base_config, layer_kinds, parse_rules
from jaxlm.interop.errors import InteropError
from jaxlm.interop.safetensors_reader import Checkpoint, Recorder
from jaxlm.interop.sharded_load import Layout, read_param
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


# Table entries: jaxlm parameter path -> (HF tensor name, the HF tensor's dimensions in the
# parameter's logical axis names (a tuple: one HF dimension holding those axes flattened row-major),
# and optionally an elementwise (from_hf, to_hf) pair for values HF stores under another formula).
# Torch's Linear keeps weights [out, in]; jaxlm keeps [in, *out] with heads as their own axis.
def _top_weights() -> dict:
  """Parameters outside the blocks."""
  return {
      ("embed",): ("model.embed_tokens.weight", ("vocab", "embed")),
      ("unembed",): ("lm_head.weight", ("vocab", "embed")),  # jaxlm [embed, vocab]
      ("final_norm", "scale"): ("model.norm.weight", ("embed",)),
  }


def _layer_weights(post_norms: bool = False) -> dict:
  """Block parameters (one layer's; HF name inside model.layers.<i>.).

  post_norms (Gemma 2/3): post_attention_layernorm is the attention output's norm and the MLP's
  input norm is pre_feedforward_layernorm; in Llama (and Gemma 1) post_attention_layernorm is the
  MLP's input norm.
  """
  norms = {("mlp_norm", "scale"): ("post_attention_layernorm.weight", ("embed",))}
  if post_norms:
    norms = {("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", ("embed",)),
             ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", ("embed",)),
             ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", ("embed",))}
  return {
      ("attn", "q"): ("self_attn.q_proj.weight", (("heads", "head_dim"), "embed")),
      ("attn", "k"): ("self_attn.k_proj.weight", (("kv_heads", "head_dim"), "embed")),
      ("attn", "v"): ("self_attn.v_proj.weight", (("kv_heads", "head_dim"), "embed")),
      ("attn", "o"): ("self_attn.o_proj.weight", ("embed", ("heads", "head_dim"))),
      ("attn", "q_bias"): ("self_attn.q_proj.bias", (("heads", "head_dim"),)),
      ("attn", "k_bias"): ("self_attn.k_proj.bias", (("kv_heads", "head_dim"),)),
      ("attn", "v_bias"): ("self_attn.v_proj.bias", (("kv_heads", "head_dim"),)),
      ("mlp", "gate"): ("mlp.gate_proj.weight", ("mlp", "embed")),
      ("mlp", "up"): ("mlp.up_proj.weight", ("mlp", "embed")),
      ("mlp", "down"): ("mlp.down_proj.weight", ("embed", "mlp")),
      ("mlp", "gate_bias"): ("mlp.gate_proj.bias", ("mlp",)),
      ("mlp", "up_bias"): ("mlp.up_proj.bias", ("mlp",)),
      ("mlp", "down_bias"): ("mlp.down_proj.bias", ("embed",)),
      ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", ("head_dim",)),
      ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", ("head_dim",)),
      ("attn_norm", "scale"): ("input_layernorm.weight", ("embed",)),
      **norms,
  }


class Source(NamedTuple):
  """Where one jaxlm parameter comes from: HF tensor(s) (one per layer when layers are stacked)."""
  path: tuple  # the parameter's path in the model's nnx state
  names: Sequence[str]
  layout: Layout  # one tensor's (one layer's) layout
  shape: tuple[int, ...]  # the whole parameter's shape ([layers, ...] when stacked)
  dtype: np.dtype
  elementwise: tuple | None  # (from_hf, to_hf) of the table entry, or None


def tensor_sources(state: nnx.State, scan_layers: bool, post_norms: bool = False) -> list[Source]:
  """Every parameter of `state` (nnx Params, arrays or abstract) with the HF tensors that hold it;
  post_norms: the model's model.post_norms (it renames one norm, see _layer_weights)."""
  top, layer = _top_weights(), _layer_weights(post_norms)
  out = []
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    axes, shape = tuple(var.get_metadata().get("out_sharding") or ()), tuple(value.shape)
    stacked = scan_layers and path[0] == "blocks"  # [layers, ...]: one HF tensor per layer
    if path[0] == "blocks":
      entry = layer.get(path[1:] if scan_layers else path[2:])
      layers = range(shape[0]) if scan_layers else [path[1]]
      names = [f"model.layers.{i}.{entry[0]}" for i in layers] if entry else []
    else:
      entry = top.get(path)
      names = [entry[0]] if entry else []
    if entry is None:
      raise InteropError(f"parameter {'.'.join(map(str, path))} has no Hugging Face tensor: this "
                         "model's architecture has no HF equivalent")
    layout = Layout.of(entry[1], axes[1:] if stacked else axes, shape[1:] if stacked else shape)
    out.append(Source(path, names, layout, shape, np.dtype(value.dtype),
                      entry[2] if len(entry) > 2 else None))
  return out


def _put(tree: dict, keys: tuple, value) -> None:
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


def read_config(path: str) -> ConfigDict:
  """The jaxlm config of a Hugging Face model directory's config.json."""
  if not os.path.isdir(path):
    raise InteropError(f"{path} is not a directory: point at a Hugging Face model directory "
                       "(config.json and *.safetensors, e.g. a huggingface_hub snapshot)")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise InteropError(f"{config_path} not found: point at a Hugging Face model directory "
                       "(config.json beside the *.safetensors)")
  with open(config_path) as f:
    return config_from_hf(json.load(f))


def load_model(path: str, mesh: jax.sharding.Mesh | None = None, dtype=None,
               recorder: Recorder | None = None):
  """(Transformer, full jaxlm config) of a Hugging Face model directory.

  mesh: parameters are placed with the rules table's shardings on it (None: the default device).
    Each device's shard is read from the files on its own, so memory holds the model once, and in a
    multi-process run each process reads only the slices its own devices hold.
  dtype: master-weight dtype (default compute.param_dtype, float32).
  recorder: called as recorder(tensor name, ((start, stop) per dim)) for every slice read.
  """
  config = read_config(path)
  if dtype is not None:
    config.compute.param_dtype = np.dtype(dtype).name
  target_platform = platform(mesh) if mesh is not None else jax.default_backend()
  abstract = nnx.eval_shape(lambda: build_model(config, platform=target_platform))
  graphdef, state = nnx.split(abstract, nnx.Param)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, state)
  else:
    shardings = tree_shardings(state, mesh, parse_rules(config.mesh.rules))
  shardings = {path: var.get_value() for path, var in nnx.to_flat_state(shardings)}
  checkpoint = Checkpoint(path, recorder)
  sources = tensor_sources(state, config.compute.scan_layers, config.model.post_norms)
  missing = checkpoint.missing([n for s in sources for n in s.names])
  if missing:
    raise InteropError(f"{len(missing)} tensors the architecture in config.json needs are missing "
                       f"from the checkpoint in {path}: {', '.join(map(repr, missing[:6]))}"
                       f"{' ...' if len(missing) > 6 else ''}; the checkpoint is incomplete or "
                       "config.json describes another model")
  for s in sources:  # every shape and dtype checked before anything is read
    for name in s.names:
      checkpoint.expect(name, s.layout.hf_shape)
  values = {}
  for s in sources:
    _put(values, s.path, read_param(checkpoint, s.names, s.layout, s.shape, s.dtype,
                                    shardings[s.path], s.elementwise[0] if s.elementwise else None))
  nnx.replace_by_pure_dict(state, values)
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


def _hf_order(name: str):
  """Embeddings, then the layers in order, then the final norm and the output head (as HF writes)."""
  if name.startswith("model.layers."):
    return (1, int(name.split(".")[2]), name)
  return (0 if "embed" in name else 2 if name.startswith("model.") else 3, 0, name)


def save_model(model, path: str, max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> None:
  """Writes `model` (a jaxlm Transformer) as a Hugging Face model directory: config.json,
  model-0000i-of-0000n.safetensors shards of at most max_shard_bytes, and their index; with a
  tokenizer (jaxlm.data.tokenizer.load_tokenizer's), its files too (its `save`).

  Tensors keep the parameters' dtype; padded vocabulary rows are dropped.
  """
  m = model.cfg
  if getattr(model, "lora", None) is not None:
    raise InteropError("this model has LoRA adapters, which a Hugging Face model has no place for; "
                       "export jaxlm.posttrain.lora.merge(model) (their update merged into the "
                       "weights) instead")
  hf_config = config_to_hf(m)
  state = nnx.state(model, nnx.Param)
  params = dict(nnx.to_flat_state(state))
  tensors = {}
  for s in tensor_sources(state, model.compute.scan_layers, m.post_norms):
    value = np.asarray(jax.device_get(params[s.path].get_value()))
    if s.elementwise:
      value = s.elementwise[1](value)
    for i, name in enumerate(s.names):
      stacked = value.ndim > len(s.layout.shape)  # [layers, ...]
      hf_value = s.layout.to_hf(value[i] if stacked else value)
      # Padded vocabulary rows (model.vocab_multiple) are not part of the HF model.
      tensors[name] = hf_value[tuple(slice(0, m.vocab_size) if g == ("vocab",) else slice(None)
                                     for g in s.layout.groups)]
  tensors = dict(sorted(tensors.items(), key=lambda kv: _hf_order(kv[0])))
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
  if tokenizer is not None:
    tokenizer.save(path)
