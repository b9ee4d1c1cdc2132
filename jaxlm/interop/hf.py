"""Hugging Face checkpoints in and out of jaxlm: config.json <-> config.model, safetensors <-> parameters.

    model, config = hf.load_model("path/to/hf_dir")   # config.json + *.safetensors
    hf.save_model(model, "path/to/out")             # what transformers.AutoModelForCausalLM loads

Supported so far: Llama 2/3/3.1/3.2 (RoPE scalings llama3, linear, yarn), Mistral (sliding window),
Qwen2/2.5 (q/k/v biases), Qwen3 (QK-norm), Gemma 1, Gemma 2 and Gemma 3 text-only (Gemma3ForCausalLM,
model_type gemma3_text), and the mixture-of-experts families Mixtral, Qwen3-MoE and DeepSeek-V3 (MLA
attention; their expert and MLA tables and config fields are in hf_moe.py). An architecture or a
config value jaxlm cannot reproduce exactly is refused
with a message naming it; nothing is approximated silently. The config.json side of each family
lives in hf_config.py; this module maps tensors.

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

from jaxlm.config import ConfigDict, moe_layers, parse_rules
from jaxlm.interop import hf_moe
from jaxlm.interop.hf_config import FAMILIES, GEMMA, SUPPORTED, config_from_hf, config_to_hf  # noqa: F401
from jaxlm.interop.errors import InteropError
from jaxlm.interop.safetensors_reader import Checkpoint, Recorder
from jaxlm.interop.sharded_load import UNNAMED, Layout, read_param
from jaxlm.models import build_model
from jaxlm.parallel.mesh import platform
from jaxlm.parallel.sharding import tree_shardings

# Architecture -> the model fields its family fixes beyond the Llama layout they all share.
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
  """Where one jaxlm parameter comes from: HF tensor(s) (one per layer when layers are stacked,
  one per expert for experts HF keeps apart)."""
  path: tuple  # the parameter's path in the model's nnx state
  names: list  # nested: [layers][experts] as the parameter stacks them, or [name]
  layout: Layout  # one tensor's layout
  shape: tuple[int, ...]  # the whole parameter's shape ([layers, experts, ...] when stacked)
  dtype: np.dtype
  elementwise: tuple | None  # (from_hf, to_hf) of the table entry, or None

  def grid(self) -> np.ndarray:
    """The names as an array over the parameter's leading axes that index HF tensors."""
    lead = len(self.shape) - len(self.layout.shape)
    return np.array(self.names if lead else self.names[0], object)

  def all_names(self) -> list[str]:
    return [str(n) for n in self.grid().ravel()]


def _stack_tables(m, interleaved_rope: bool) -> dict:
  """Per stack of blocks: (its table, the HF layer index of each of its blocks)."""
  kinds = moe_layers(m) if m is not None else ()
  dense = _layer_weights(m is not None and m.post_norms)
  if m is not None and m.attention_kind == "mla":
    dense |= hf_moe.mla_weights(m, interleaved_rope)
  tables = {"blocks": (dense, [i for i, moe in enumerate(kinds) if not moe] if kinds else None)}
  if any(kinds):
    tables["moe_blocks"] = (dense | hf_moe.moe_weights(hf_moe.arch_of(m)),
                            [i for i, moe in enumerate(kinds) if moe])
  return tables


def tensor_sources(state: nnx.State, scan_layers: bool, m=None, interleaved_rope: bool = True
                   ) -> list[Source]:
  """Every parameter of `state` (nnx Params, arrays or abstract) with the HF tensors that hold it.
  m: the model's config.model (its norms, attention and MoE layers choose the tables; None: a
  dense Llama-layout model); interleaved_rope: config.json's rope_interleave (DeepSeek, hf_moe)."""
  top, tables = _top_weights(), _stack_tables(m, interleaved_rope)
  out = []
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    axes = tuple(UNNAMED if a is None else a for a in var.get_metadata().get("out_sharding") or ())
    shape = tuple(value.shape)
    stack = tables.get(path[0])
    if stack:
      table, hf_layers = stack
      entry = table.get(path[1:] if scan_layers else path[2:])
      layers = range(shape[0]) if scan_layers else [path[1]]
      prefixes = [f"model.layers.{hf_layers[i] if hf_layers else i}." for i in layers]
    else:
      entry, prefixes = top.get(path), [""]
    if entry is None:
      raise InteropError(f"parameter {'.'.join(map(str, path))} has no Hugging Face tensor: this "
                         "model's architecture has no HF equivalent")
    lead = int(bool(stack) and scan_layers)  # [layers, ...]: one HF tensor per layer
    if "{e}" in entry[0]:  # [..., experts, ...]: one HF tensor per expert
      names = [[p + entry[0].format(e=e) for e in range(shape[lead])] for p in prefixes]
      lead += 1
    else:
      names = [p + entry[0] for p in prefixes]
    if not scan_layers or not stack:
      names = names[0] if lead else names  # one layer: its experts' names, or [name]
    layout = Layout.of(entry[1], axes[lead:], shape[lead:])
    out.append(Source(path, names, layout, shape, np.dtype(value.dtype),
                      entry[2] if len(entry) > 2 else None))
  return out


def _put(tree: dict, keys: tuple, value) -> None:
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


def read_config(path: str) -> ConfigDict:
  """The jaxlm config of a Hugging Face model directory's config.json."""
  return config_from_hf(_config_json(path))


def _config_json(path: str) -> dict:
  if not os.path.isdir(path):
    raise InteropError(f"{path} is not a directory: point at a Hugging Face model directory "
                       "(config.json and *.safetensors, e.g. a huggingface_hub snapshot)")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise InteropError(f"{config_path} not found: point at a Hugging Face model directory "
                       "(config.json beside the *.safetensors)")
  with open(config_path) as f:
    return json.load(f)


def load_model(path: str, mesh: jax.sharding.Mesh | None = None, dtype=None,
               recorder: Recorder | None = None):
  """(Transformer, full jaxlm config) of a Hugging Face model directory.

  mesh: parameters are placed with the rules table's shardings on it (None: the default device).
    Each device's shard is read from the files on its own, so memory holds the model once, and in a
    multi-process run each process reads only the slices its own devices hold.
  dtype: master-weight dtype (default compute.param_dtype, float32).
  recorder: called as recorder(tensor name, ((start, stop) per dim)) for every slice read.
  """
  hf_config = _config_json(path)
  config = config_from_hf(hf_config)
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
  sources = tensor_sources(state, config.compute.scan_layers, config.model,
                           hf_moe.rope_interleaved(hf_config))
  missing = checkpoint.missing([n for s in sources for n in s.all_names()])
  if missing:
    raise InteropError(f"{len(missing)} tensors the architecture in config.json needs are missing "
                       f"from the checkpoint in {path}: {', '.join(map(repr, missing[:6]))}"
                       f"{' ...' if len(missing) > 6 else ''}; the checkpoint is incomplete or "
                       "config.json describes another model")
  for s in sources:  # every shape and dtype checked before anything is read
    for name in s.all_names():
      checkpoint.expect(name, s.layout.hf_shape)
  values = {}
  for s in sources:
    _put(values, s.path, read_param(checkpoint, s.names, s.layout, s.shape, s.dtype,
                                    shardings[s.path], s.elementwise[0] if s.elementwise else None))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state), config


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
  for s in tensor_sources(state, model.compute.scan_layers, m):
    value = np.asarray(jax.device_get(params[s.path].get_value()))
    if s.elementwise:
      value = s.elementwise[1](value)
    names = s.grid()
    for i in np.ndindex(names.shape):
      name, hf_value = names[i], s.layout.to_hf(value[i])
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
