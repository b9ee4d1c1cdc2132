"""Gemma-2-2B's published shapes (2,614,341,888 parameters): logit soft-capping, GeGLU.

Shapes (Google's config.json): vocab 256000, d_model 2304, 26 layers, 8 query and 4 KV heads
(head_dim 256, so q/k/v are wider than d_model), GeGLU 9216 (tanh GELU), RMSNorm eps 1e-6, RoPE
theta 10000, tied embeddings, attention logits soft-capped at 50 and output logits at 30. The query
scale is head_dim^-0.5, as Gemma-2-2B's query_pre_attn_scalar 256 gives.

What our model does NOT replicate:
- post-norms: Gemma-2 also normalizes each attention and MLP output before the residual add (4
  norms a layer; ours has 2). Our count is 26 x 2 x 2304 = 119,808 parameters short (0.005%).
- alternating attention: Gemma-2's even layers use a 4096-token sliding window, odd layers global.
  Ours uses one pattern for every layer; with rows of 4096 tokens (this preset) a 4096 window hides
  nothing, so all-global attention is exactly Gemma-2's. Longer rows would differ.
- embedding scale: Gemma multiplies the embeddings by sqrt(d_model); ours does not.
- norm parametrization: Gemma stores RMSNorm scales as (1 + w) with w = 0 at init; ours stores the
  scale itself (1 at init). Same function, different initial values of the stored weights.
So this preset trains a Gemma-2-shaped model; it cannot load Gemma-2 weights as they are.

Where it runs: a TPU v5p-32 slice (16 chips), pure FSDP; global batch 128 rows x 4096 tokens = 0.5M
tokens a step, in 2 microbatches (float32 logits over a 256000 vocabulary are 4.2 GB a row). On
GPUs: 2 nodes of 8 H100. Sizes are planned, not yet measured.

Tokenizer: Gemma ships a SentencePiece model (256000 pieces): set --config.tokenizer.path to it.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5p-32"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1)
GPU_NODES = 2  # x 8 H100
PUBLISHED_PARAMS = 2_614_341_888  # ours: 119,808 fewer (no post-norms)


def get_config():
  c = pretrain_config(
      name="gemma2_2b", mesh=MESH,
      vocab_size=256000, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
      head_dim=256,  # not d_model / num_heads (288)
      mlp_dim=9216, mlp_kind="geglu", norm_eps=1e-6, rope_theta=10000.0,
      attn_logit_softcap=50.0,  # scores -> 50 tanh(scores / 50)
      final_logit_softcap=30.0,  # logits -> 30 tanh(logits / 30)
      max_seq_len=8192, tie_embeddings=True,
      seq_len=4096, batch_size=128, steps=100_000, learning_rate=3e-4, warmup_steps=2000)
  c.train.grad_accum_steps = 2  # halves the live 256000-wide logits
  return c
