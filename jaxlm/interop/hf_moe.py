"""Hugging Face's mixture-of-experts families: Mixtral, Qwen3-MoE and DeepSeek-V3 (with its
multi-head latent attention). Their config.json fields <-> model.moe_* (and the MLA fields), and
the tensor tables of their MoE layers and of MLA, which hf.py adds to the Llama tables they
otherwise share.

HF keeps one tensor per expert (model.layers.<i>.mlp.experts.<e>.gate_proj.weight; Mixtral's
block_sparse_moe.experts.<e>.w1/w2/w3 are gate/down/up); jaxlm stacks them: up/gate [experts,
embed, mlp], down [experts, mlp, embed]. A table name with "{e}" is one tensor per expert. The
router (gate.weight [experts, embed]) is jaxlm's router [embed, experts], DeepSeek's
e_score_correction_bias its router_bias, and DeepSeek's shared experts the MLP `shared`.

Routing as transformers computes it, which jaxlm's route() reproduces: Mixtral softmax, top-k,
weights renormalized; Qwen3-MoE the same, renormalized only with norm_topk_prob; DeepSeek-V3
sigmoid scores, the top-k of scores + bias among the best topk_group of n_group groups, weights
renormalized with norm_topk_prob, times routed_scaling_factor. Every token reaches all its experts
(no capacity), as in jaxlm's default dropless dispatch.

DeepSeek-V3 with rope_interleave (its default, and its published checkpoints): transformers
reorders each RoPE slice of the query and of the shared key from (x0, x1, x2, x3, ...) to
(x0, x2, ..., x1, x3, ...) before its half-split rotation, so those projection rows are permuted on
the way in (and back on the way out); the scores are the same.
"""

from __future__ import annotations

import numpy as np

from jaxlm.interop.errors import InteropError, refuse
from jaxlm.interop.sharded_load import UNNAMED

MIXTRAL, QWEN3_MOE = "MixtralForCausalLM", "Qwen3MoeForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
FAMILIES = (MIXTRAL, QWEN3_MOE, DEEPSEEK_V3)
MODEL_TYPES = {MIXTRAL: "mixtral", QWEN3_MOE: "qwen3_moe", DEEPSEEK_V3: "deepseek_v3"}
# transformers' defaults (its config classes) for the fields read here that a config.json may omit
_DEFAULTS = {
    MIXTRAL: {"num_local_experts": 8, "num_experts_per_tok": 2, "router_jitter_noise": 0.0},
    QWEN3_MOE: {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
    DEEPSEEK_V3: {"n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 2048, "routed_scaling_factor": 2.5, "n_group": 8,
                  "topk_group": 4, "first_k_dense_replace": 3, "norm_topk_prob": True,
                  "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                  "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True},
}
# Fields transformers ignores but DeepSeek's own code reads: any other value is another model.
_DEEPSEEK_FIXED = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1}


def _getter(arch: str, hf: dict):
  return lambda name: hf[name] if name in hf else _DEFAULTS[arch].get(name)


def split_yarn_mscale(arch: str, hf: dict) -> tuple[dict, dict]:
  """(hf with DeepSeek's YaRN mscale fields taken out of its RoPE parameters, the model fields they
  give). transformers scales cos/sin by mscale(mscale) / mscale(mscale_all_dim) only when both are
  set (else by mscale(1)), and DeepSeek's softmax by mscale(mscale_all_dim)**2."""
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope = dict(hf.get(key) or {})
  if arch != DEEPSEEK_V3 or not ({"mscale", "mscale_all_dim"} & set(rope)):
    return hf, {}
  mscale, all_dim = rope.pop("mscale", None), rope.pop("mscale_all_dim", None)
  if all_dim and not mscale:
    raise InteropError(f"{key} mscale_all_dim {all_dim} without mscale: transformers then scales "
                       "RoPE by mscale(1) but the softmax by mscale(mscale_all_dim)**2, which "
                       "jaxlm's model.yarn_mscale fields do not express; give both")
  fields = {"yarn_mscale": float(mscale), "yarn_mscale_all_dim": float(all_dim)} if all_dim else {}
  return {**hf, key: rope}, fields


def config_fields(arch: str, hf: dict) -> dict:
  """The model fields of a MoE family's config.json beyond the Llama layout's (set after them)."""
  get = _getter(arch, hf)
  layers = hf["num_hidden_layers"]
  k = get("num_experts_per_tok")
  if arch == MIXTRAL:
    if get("router_jitter_noise"):
      raise InteropError(f"MixtralForCausalLM with router_jitter_noise {get('router_jitter_noise')}:"
                         " transformers then multiplies the router's input by random noise in "
                         "training, which jaxlm's router has no field for; set it to 0")
    return dict(moe_num_experts=get("num_local_experts"), moe_experts_per_token=k, moe_norm_topk=True)
  mlp_dim, f = hf["intermediate_size"], get("moe_intermediate_size")
  if arch == QWEN3_MOE:
    experts = hf.get("num_experts", hf.get("num_local_experts", get("num_experts")))
    first, every = _qwen3_sparse_layers(get("decoder_sparse_step"), get("mlp_only_layers"))
    return dict(qk_norm=True, moe_num_experts=experts, moe_experts_per_token=k,
                moe_mlp_dim=0 if f == mlp_dim else f, moe_norm_topk=bool(get("norm_topk_prob")),
                moe_first_dense_layers=first, moe_every=every)
  for name, value in _DEEPSEEK_FIXED.items():
    if name in hf and hf[name] != value:
      raise InteropError(f"DeepseekV3ForCausalLM with {name} {hf[name]!r}: jaxlm loads "
                         f"DeepSeek-V3's routing ({name} {value!r}) only")
  if hf.get("attention_bias"):
    raise InteropError("DeepseekV3ForCausalLM with attention_bias: jaxlm's MLA projections have "
                       "no biases")
  groups = get("n_group") or 0
  # one group holds every expert: the same as no group limit
  groups, topk_groups = (groups, get("topk_group")) if groups > 1 else (0, 0)
  first, experts = get("first_k_dense_replace"), get("n_routed_experts") or 0
  return dict(
      attention_kind="mla", num_kv_heads=hf["num_attention_heads"], head_dim=0,
      q_lora_rank=get("q_lora_rank") or 0, kv_lora_rank=get("kv_lora_rank"),
      qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
      v_head_dim=get("v_head_dim"),
      moe_num_experts=experts if first < layers else 0, moe_experts_per_token=k,
      moe_mlp_dim=0 if f == mlp_dim else f, moe_shared_experts=get("n_shared_experts") or 0,
      moe_router="sigmoid", moe_norm_topk=bool(get("norm_topk_prob")),
      moe_routed_scale=float(get("routed_scaling_factor")),
      moe_groups=groups, moe_topk_groups=topk_groups,
      moe_first_dense_layers=first)


def _qwen3_sparse_layers(step: int, mlp_only: list) -> tuple[int, int]:
  """(moe_first_dense_layers, moe_every) of Qwen3-MoE's decoder_sparse_step and mlp_only_layers:
  layer i is MoE iff i is not in mlp_only_layers and (i + 1) % step == 0."""
  mlp_only = sorted(mlp_only or [])
  if not mlp_only:
    return 0, step
  if step == 1 and mlp_only == list(range(len(mlp_only))):
    return len(mlp_only), 1
  raise InteropError(f"Qwen3MoeForCausalLM with mlp_only_layers {mlp_only} and decoder_sparse_step "
                     f"{step}: jaxlm's dense layers are the first moe_first_dense_layers, then "
                     "every moe_every-th layer is MoE; only dense leading layers (with step 1) or no "
                     "mlp_only_layers load")


def arch_of(m) -> str:
  """The HF family whose tensor names a MoE model config `m` uses (family() checks the rest)."""
  if m.attention_kind == "mla":
    return DEEPSEEK_V3
  return QWEN3_MOE if m.qk_norm else MIXTRAL


def family(m) -> str:
  """The HF architecture that expresses MoE model config `m` exactly; InteropError if none does."""
  arch = arch_of(m)
  refuse(arch, {
      "norm_kind": m.norm_kind != "rmsnorm", "position_kind": m.position_kind != "rope",
      "mlp_kind": m.mlp_kind != "swiglu", "mlp_bias": m.mlp_bias,
      **{name: bool(m[name]) for name in (
          "norm_plus_one", "scale_embeddings", "post_norms", "layer_pattern", "rope_local_theta",
          "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap")},
      "moe_router": m.moe_router != ("sigmoid" if arch == DEEPSEEK_V3 else "softmax"),
      "yarn_mscale": arch != DEEPSEEK_V3 and m.yarn_mscale != 1,
  })
  if arch == DEEPSEEK_V3:
    refuse(arch, {"moe_every": m.moe_every != 1, "attention_bias": m.attention_bias,
                  "sliding_window": bool(m.sliding_window),
                  # mscale without mscale_all_dim: transformers would not scale RoPE by it
                  "yarn_mscale": m.yarn_mscale != 1 and not m.yarn_mscale_all_dim})
    return arch
  refuse(arch, {"moe_shared_experts": bool(m.moe_shared_experts), "moe_groups": bool(m.moe_groups),
                "moe_routed_scale": m.moe_routed_scale != 1})
  if arch == QWEN3_MOE:
    refuse(arch, {"sliding_window": bool(m.sliding_window),
                  "moe_first_dense_layers": bool(m.moe_first_dense_layers and m.moe_every != 1)})
    return arch
  refuse(arch, {"moe_norm_topk": not m.moe_norm_topk, "attention_bias": m.attention_bias,
                "moe_first_dense_layers": bool(m.moe_first_dense_layers),
                "moe_every": m.moe_every != 1,
                "moe_mlp_dim": m.moe_mlp_dim not in (0, m.mlp_dim)})
  return arch


def config_to_hf(arch: str, m, hf: dict) -> None:
  """Adds family `arch`'s fields for model config `m` to config.json `hf` (the Llama fields)."""
  f = m.moe_mlp_dim or m.mlp_dim
  hf["model_type"] = MODEL_TYPES[arch]
  hf["num_experts_per_tok"] = m.moe_experts_per_token
  if arch == MIXTRAL:
    hf.update(intermediate_size=f, num_local_experts=m.moe_num_experts, router_jitter_noise=0.0,
              sliding_window=m.sliding_window or None)
    return
  hf["moe_intermediate_size"] = f
  hf["norm_topk_prob"] = m.moe_norm_topk
  if arch == QWEN3_MOE:
    first = m.moe_first_dense_layers
    hf.update(num_experts=m.moe_num_experts, decoder_sparse_step=1 if first else m.moe_every,
              mlp_only_layers=list(range(first)), attention_bias=m.attention_bias,
              use_sliding_window=False, sliding_window=None)
    return
  rope = hf["rope_scaling"]
  if rope and m.yarn_mscale_all_dim:
    rope.update(mscale=m.yarn_mscale, mscale_all_dim=m.yarn_mscale_all_dim)
  hf.update(
      num_key_value_heads=m.num_heads, head_dim=m.qk_rope_head_dim,
      q_lora_rank=m.q_lora_rank or None,
      kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
      qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, rope_interleave=True,
      n_routed_experts=m.moe_num_experts, n_shared_experts=m.moe_shared_experts,
      routed_scaling_factor=m.moe_routed_scale, n_group=m.moe_groups or 1,
      topk_group=m.moe_topk_groups or 1, first_k_dense_replace=m.moe_first_dense_layers,
      attention_bias=False)


def rope_interleaved(hf: dict) -> bool:
  """Whether config.json `hf` stores DeepSeek's RoPE rows interleaved (see the module doc)."""
  return (hf.get("architectures") or ["?"])[0] == DEEPSEEK_V3 and bool(
      _getter(DEEPSEEK_V3, hf)("rope_interleave"))


def _rope_rows(width: int, rope: int) -> tuple:
  """(from_hf, to_hf) moving the last `rope` of `width` entries of a block's last axis between
  transformers' interleaved order and jaxlm's halves."""
  halves = np.arange(rope).reshape(-1, 2).T.ravel()  # 0, 2, 4, ..., 1, 3, 5, ...
  order = np.concatenate([np.arange(width - rope), width - rope + halves])
  inverse = np.argsort(order)

  def from_hf(x):
    if x.shape[-1] != width:
      raise InteropError(f"a RoPE-interleaved DeepSeek projection is read {x.shape[-1]} of "
                         f"{width} rows at a time: keep its last axis (head_dim, latent) unsharded "
                         "to load it")
    return x[..., order]
  return from_hf, lambda x: x[..., inverse]


def mla_weights(m, interleaved: bool) -> dict:
  """DeepSeek's attention parameters (HF name inside model.layers.<i>.); see hf._layer_weights."""
  qk, rope = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_rope_head_dim
  q_rows = (_rope_rows(qk, rope),) if interleaved else ()
  kv_rows = (_rope_rows(m.kv_lora_rank + rope, rope),) if interleaved else ()
  return {
      ("attn", "q"): ("self_attn.q_proj.weight", (("heads", "head_dim"), "embed"), *q_rows),
      ("attn", "q_a"): ("self_attn.q_a_proj.weight", ("latent", "embed")),
      ("attn", "q_a_norm", "scale"): ("self_attn.q_a_layernorm.weight", ("latent",)),
      ("attn", "q_b"): ("self_attn.q_b_proj.weight", (("heads", "head_dim"), "latent"), *q_rows),
      ("attn", "kv_a"): ("self_attn.kv_a_proj_with_mqa.weight", ("latent", "embed"), *kv_rows),
      ("attn", "kv_a_norm", "scale"): ("self_attn.kv_a_layernorm.weight", ("latent",)),
      ("attn", "kv_b"): ("self_attn.kv_b_proj.weight", (("heads", "head_dim"), "latent")),
      ("attn", "o"): ("self_attn.o_proj.weight", ("embed", ("heads", "head_dim"))),
  }


def moe_weights(arch: str) -> dict:
  """A MoE layer's MLP parameters (HF name inside model.layers.<i>.; "{e}": one per expert)."""
  if arch == MIXTRAL:
    return {("mlp", "router"): ("block_sparse_moe.gate.weight", (UNNAMED, "embed")),
            ("mlp", "gate"): ("block_sparse_moe.experts.{e}.w1.weight", ("mlp", "embed")),
            ("mlp", "down"): ("block_sparse_moe.experts.{e}.w2.weight", ("embed", "mlp")),
            ("mlp", "up"): ("block_sparse_moe.experts.{e}.w3.weight", ("mlp", "embed"))}
  table = {("mlp", "router"): ("mlp.gate.weight", (UNNAMED, "embed")),
           ("mlp", "router_bias"): ("mlp.gate.e_score_correction_bias", (UNNAMED,))}
  for name in ("gate", "up", "down"):
    dims = ("embed", "mlp") if name == "down" else ("mlp", "embed")
    table["mlp", name] = (f"mlp.experts.{{e}}.{name}_proj.weight", dims)
    table["mlp", "shared", name] = (f"mlp.shared_experts.{name}_proj.weight", dims)
  return table
