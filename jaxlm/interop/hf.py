"""Hugging Face checkpoints in and out of jaxlm: config.json <-> config.model, safetensors <-> parameters.

    model, config = hf.load_model("path/to/hf_dir")   # config.json + *.safetensors
    hf.save_model(model, "path/to/out")             # what transformers.AutoModelForCausalLM loads

Supported so far: Llama 2/3/3.1/3.2 (RoPE scalings llama3, linear, yarn), Mistral (sliding window),
Qwen2/2.5 (q/k/v biases), Qwen3 (QK-norm). An architecture or a config value jaxlm cannot
reproduce exactly is refused with a message naming it; nothing is approximated silently.

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

from jaxlm.config import ConfigDict, base_config, parse_rules
from jaxlm.models import build_model
from jaxlm.parallel.mesh import platform
from jaxlm.parallel.sharding import tree_shardings

# Architecture -> the model fields its family fixes beyond the Llama layout they all share.
FAMILIES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},  # q, k, v biases; the output projection has none
    "Qwen3ForCausalLM": {"qk_norm": True},  # RMSNorm over head_dim on queries and keys, before RoPE
}
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
    raise InteropError(f"architecture {arch!r} is not supported; jaxlm loads {list(SUPPORTED)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise InteropError(f"hidden_act {hf['hidden_act']!r}: Llama's MLP in jaxlm is SwiGLU (silu)")
  if hf.get("pretraining_tp", 1) != 1:
    raise InteropError("pretraining_tp > 1 splits the projections differently; save with 1")
  window = 0
  if arch == "MistralForCausalLM":
    window = hf.get("sliding_window") or 0  # every layer
  elif hf.get("use_sliding_window"):
    raise InteropError(f"{arch} with use_sliding_window: a per-layer window pattern is not "
                       "supported yet; load a checkpoint saved with use_sliding_window=false")
  if set(hf.get("layer_types") or ["full_attention"]) != {"full_attention"} and arch != "MistralForCausalLM":
    raise InteropError(f"layer_types {sorted(set(hf['layer_types']))}: per-layer attention "
                       "patterns are not supported yet")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  c = base_config()
  c.model.update(
      vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=0 if hf.get("head_dim", d // heads) == d // heads else hf["head_dim"],
      mlp_dim=hf["intermediate_size"], mlp_kind="swiglu", norm_kind="rmsnorm",
      norm_eps=hf.get("rms_norm_eps", 1e-6), position_kind="rope",
      max_seq_len=hf["max_position_embeddings"],
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
      sliding_window=window, **_rope(hf))
  c.model.update(**FAMILIES[arch])
  c.tokenizer.vocab_size = hf["vocab_size"]
  return c


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


def _layer_weights(num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
  """jaxlm block parameter path -> (HF name inside layers.<i>., HF -> jaxlm, jaxlm -> HF)."""
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
      ("mlp_norm", "scale"): ("post_attention_layernorm.weight", *same),
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
  for keys, (hf_name, convert, _) in _layer_weights(m.num_heads, m.num_kv_heads, head_dim).items():
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


def _family(m) -> str:
  """The HF architecture that expresses jaxlm model config `m` exactly; InteropError if none does."""
  unsupported = {
      "mlp_kind": m.mlp_kind != "swiglu", "norm_kind": m.norm_kind != "rmsnorm",
      "position_kind": m.position_kind != "rope", "attn_logit_softcap": bool(m.attn_logit_softcap),
      "final_logit_softcap": bool(m.final_logit_softcap),
  }
  if any(unsupported.values()):
    raise InteropError(f"no supported Hugging Face architecture has model fields "
                       f"{sorted(k for k, v in unsupported.items() if v)} as this config sets them")
  if m.qk_norm:
    return "Qwen3ForCausalLM"
  if m.attention_bias:
    return "Qwen2ForCausalLM"
  return "MistralForCausalLM" if m.sliding_window else "LlamaForCausalLM"


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
  hf = {
      "architectures": [arch], "model_type": arch.removesuffix("ForCausalLM").lower(),
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.mlp_dim,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads, "head_dim": head_dim, "hidden_act": "silu",
      "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta, "rope_scaling": rope, "tie_word_embeddings": m.tie_embeddings,
      "torch_dtype": "float32",
  }
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


def save_model(model, path: str, max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> None:
  """Writes `model` (a jaxlm Transformer) as a Hugging Face model directory: config.json,
  model-0000i-of-0000n.safetensors shards of at most max_shard_bytes, and their index; with a
  tokenizer (jaxlm.data.tokenizer.load_tokenizer's), its files too (its `save`).

  Tensors keep the parameters' dtype; padded vocabulary rows are dropped.
  """
  m = model.cfg
  hf_config = config_to_hf(m)
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  vocab = m.vocab_size
  tensors = {"model.embed_tokens.weight": params["embed"][:vocab]}
  head_dim = m.head_dim or m.d_model // m.num_heads
  blocks = params["blocks"]
  for keys, (hf_name, _, to_hf) in _layer_weights(m.num_heads, m.num_kv_heads, head_dim).items():
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
  if tokenizer is not None:
    tokenizer.save(path)
