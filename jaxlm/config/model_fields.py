"""The config's `model` section: the architecture (sizes, attention and position kinds, norms, MoE
and MLA), every field with its default and meaning. The other sections: jaxlm/config/fields.py."""

from __future__ import annotations

from ml_collections import ConfigDict


def model_fields() -> ConfigDict:
  """The `model` section with its defaults (a Llama-style decoder)."""
  m = ConfigDict()
  # Token ids the model knows. 0: the tokenizer's vocabulary size, filled in when the run starts
  # (config.json records the number); > 0 (a published architecture) must equal the tokenizer's,
  # or exceed it for a Hugging Face tokenizer (Qwen2.5's embedding has rows past its tokenizer's
  # ids; those ids never occur in the data).
  m.vocab_size = 0
  # Embedding rows (and logits) are padded up to a multiple of this: 128 keeps TPU/GPU matmuls on
  # whole tiles for any vocabulary. Padded ids' logits are masked, so they are never predicted.
  m.vocab_multiple = 1
  m.d_model = 256  # residual stream width ("embed")
  m.num_layers = 4
  m.num_heads = 4  # query heads
  m.num_kv_heads = 4  # = num_heads: MHA; 1: MQA; in between: GQA (must divide num_heads)
  m.head_dim = 0  # 0: d_model // num_heads
  # "standard": multi-head attention with num_kv_heads K/V heads (MHA / GQA / MQA) |
  # "mla": DeepSeek's multi-head latent attention (jaxlm/models/mla.py). Keys and values come from
  # one shared latent of kv_lora_rank values per token (RMS-normalised, expanded per head by a
  # [kv_lora_rank, heads, qk_nope_head_dim + v_head_dim] projection) plus one RoPE key of
  # qk_rope_head_dim shared by every head; the KV cache holds just those kv_lora_rank +
  # qk_rope_head_dim values per token and layer. Scores are scaled by (qk_nope_head_dim +
  # qk_rope_head_dim)**-0.5. MLA needs position_kind rope, num_kv_heads = num_heads, head_dim 0,
  # and no sliding window, layer pattern, soft-capping, QK-norm, biases or query_pre_attn_scalar.
  m.attention_kind = "standard"
  m.q_lora_rank = 0  # mla: queries through a [embed, q_lora_rank] bottleneck + RMSNorm; 0: direct
  m.kv_lora_rank = 0  # mla: width of the shared key/value latent (the cache's per-token latent)
  m.qk_nope_head_dim = 0  # mla: per-head query/key features without RoPE
  m.qk_rope_head_dim = 0  # mla: query/key features with RoPE (the key's shared by all heads); even
  m.v_head_dim = 0  # mla: per-head value width (what the output projection reads)
  m.mlp_dim = 768  # hidden width of the MLP ("mlp")
  m.mlp_kind = "swiglu"  # swiglu | geglu | gelu
  m.norm_kind = "rmsnorm"  # rmsnorm | layernorm
  m.norm_eps = 1e-5
  m.position_kind = "rope"  # rope | learned (absolute, GPT-2 style)
  m.rope_theta = 10000.0
  m.rope_scaling = "none"  # none | linear | llama3 | yarn (context extension of a pretrained model)
  m.rope_scaling_factor = 1.0  # how many times the original context is stretched
  m.rope_original_max_len = 0  # llama3/yarn: the context the model was pretrained with (0: max_seq_len)
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths above original_len / low_freq_factor are scaled
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths below original_len / high_freq_factor are kept
  m.yarn_beta_fast = 32.0  # yarn: rotations per context above which a dimension is not interpolated
  m.yarn_beta_slow = 1.0  # yarn: rotations per context below which a dimension is fully interpolated
  # yarn: DeepSeek's two magnitude factors, mscale(s) = 0.1 s ln(factor) + 1. RoPE's cos/sin are
  # scaled by mscale(yarn_mscale) / mscale(yarn_mscale_all_dim) (the second 1 when it is 0), and
  # with attention_kind "mla" the softmax scale is multiplied by mscale(yarn_mscale_all_dim)**2.
  # Defaults (1, 0): plain YaRN, 0.1 ln(factor) + 1 on cos/sin. DeepSeek-V3: 1.0 and 1.0.
  m.yarn_mscale = 1.0
  m.yarn_mscale_all_dim = 0.0
  m.max_seq_len = 256  # longest sequence the model accepts (size of learned positions, KV cache)
  m.tie_embeddings = True  # output projection reuses the token embedding
  m.qk_norm = False  # RMSNorm on queries and keys per head (Gemma-3, OLMo-2 style)
  m.attention_bias = False  # bias on q/k/v projections (Qwen2 style); the output projection has none
  m.mlp_bias = False
  # 0: full causal attention; w > 0: each query sees the last w keys (q - k < w), in every layer
  # or, with model.layer_pattern, in its local (L) layers only
  m.sliding_window = 0
  # Which layers slide: "" (every layer alike: each has model.sliding_window) or a cyclic string of
  # L (local: a sliding window of model.sliding_window keys, RoPE theta rope_local_theta) and G
  # (global: full causal attention, RoPE rope_theta with rope_scaling); layer i is
  # pattern[i % len(pattern)]. Gemma 2: "LG" (layer 0 local); Gemma 3: "LLLLLG".
  m.layer_pattern = ""
  # RoPE theta of the pattern's L layers. 0: they use the G layers' RoPE (rope_theta and
  # rope_scaling, as Gemma 2); > 0: plain RoPE of this theta, never scaled (Gemma 3's
  # rope_local_base_freq 10000 beside a global theta of 1e6 with linear scaling).
  m.rope_local_theta = 0.0
  # Attention scores are scaled by query_pre_attn_scalar**-0.5 (Gemma 2/3). 0: head_dim, the usual.
  m.query_pre_attn_scalar = 0.0
  m.attn_logit_softcap = 0.0  # 0: off; c > 0: scores become c * tanh(scores / c) (Gemma-2)
  m.final_logit_softcap = 0.0  # same, on the output logits
  # Gemma's parametrisations. post_norms: each block also normalizes its attention and MLP outputs
  # before the residual add ("sandwich" norms, Gemma 2/3: 4 norms a layer). norm_plus_one: every
  # norm (QK-norm included) stores w, zeros at init, and scales by (1 + w) in float32 (Gemma 1/2/3).
  # scale_embeddings: token embeddings are multiplied by sqrt(d_model), the factor first rounded to
  # float32 and then to the activation dtype, as transformers does (Gemma 1/2/3).
  m.post_norms = False
  m.norm_plus_one = False
  m.scale_embeddings = False
  m.init_std = 0.02  # normal init of embeddings and projections; residual outputs scaled by depth
  # Mixture of experts (jaxlm/models/moe.py). moe_num_experts 0: every layer has the dense MLP of
  # model.mlp_dim. E > 0: the MoE layers (below) route each token to moe_experts_per_token (top-k)
  # of E expert MLPs of width moe_mlp_dim (model.mlp_kind), weighted by the router, plus
  # moe_shared_experts experts every token passes through (one MLP of their summed width).
  m.moe_num_experts = 0
  m.moe_experts_per_token = 2  # top-k
  m.moe_mlp_dim = 0  # hidden width of one routed expert; 0: model.mlp_dim
  m.moe_shared_experts = 0  # DeepSeek-V3: 1; Qwen2-MoE: its shared width / moe_mlp_dim
  # softmax: top-k of softmax(router logits) (Mixtral, Qwen3-MoE) | sigmoid: sigmoid scores, the
  # top-k picked with a learned per-expert bias added (DeepSeek-V3's auxiliary-loss-free
  # balancing: train.moe_bias_rate moves the bias; it never scales an output)
  m.moe_router = "softmax"
  m.moe_norm_topk = True  # divide the k weights by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3)
  m.moe_routed_scale = 1.0  # the routed experts' weights are multiplied by this (DeepSeek-V3: 2.5)
  # Group-limited routing (DeepSeek-V3): experts split into moe_groups equal groups, each scored by
  # the sum of its two best scores; only the best moe_topk_groups groups are eligible. 0: off.
  m.moe_groups = 0
  m.moe_topk_groups = 0
  # Which layers are MoE: layer i (from 0) is MoE when i >= moe_first_dense_layers and
  # (i - moe_first_dense_layers + 1) % moe_every == 0; the others keep the dense MLP.
  # DeepSeek-V3: first 3 dense, every 1; Qwen2-MoE/Llama-4 style interleaving: every 2 (layers 1, 3, ...).
  m.moe_first_dense_layers = 0
  m.moe_every = 1
  # 0: dropless (every assignment computed: tokens sorted by expert, grouped matmuls). c > 0: each
  # expert takes at most ceil(c * tokens * k / E) assignments of a layer's batch (first choices
  # first); the rest are dropped (they add nothing; metric moe/dropped counts them).
  m.moe_capacity_factor = 0.0
  # Expert parallelism (mesh.expert > 1), dropless dispatch: the all-to-all buffers. 0: room for all
  # of a device's T*k assignments for every expert rank (never drops; memory and traffic ep x T*k
  # rows). f > 0: room for ceil(f * T*k / ep) per rank (f * T*k rows); assignments past it are
  # dropped, first choices kept first, and counted in moe/dropped. Balanced routing fills T*k / ep.
  m.moe_exchange_factor = 0.0
  return m
