"""Gemma-2-2B (2,614,341,888 parameters), exactly: local and global layers, post-norms, soft-capping.

Architecture (Google's config.json, as transformers computes it): vocab 256000, d_model 2304, 26
layers, 8 query and 4 KV heads (head_dim 256, so q/k/v are wider than d_model), GeGLU 9216 (tanh
GELU), RMSNorm eps 1e-6 with (1 + w) scales, a norm on each attention and MLP output before the
residual add (4 norms a layer), embeddings times sqrt(2304), RoPE theta 10000, tied embeddings.
Layers alternate a 4096-token sliding window (even layers, layer 0 first) and global attention;
scores are scaled by query_pre_attn_scalar 256 (= head_dim) ** -0.5 and soft-capped at 50, output
logits at 30. `python -m jaxlm.convert --from_hf` loads the published weights into this architecture
(tests/test_hf.py checks that its config.json reads as this preset's model).

Where it runs: a TPU v5p-32 slice (16 chips), pure FSDP; global batch 128 rows x 4096 tokens = 0.5M
tokens a step, in 2 microbatches (float32 logits over a 256000 vocabulary are 4.2 GB a row). On
GPUs: 2 nodes of 8 H100. Sizes are planned, not yet measured.

Tokenizer: Gemma ships a SentencePiece model (256000 pieces): set --config.tokenizer.path to it.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5p-32"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1)
GPU_NODES = 2  # x 8 H100
PUBLISHED_PARAMS = 2_614_341_888


def get_config():
  c = pretrain_config(
      name="gemma2_2b", mesh=MESH,
      vocab_size=256000, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
      head_dim=256,  # not d_model / num_heads (288)
      mlp_dim=9216, mlp_kind="geglu", norm_eps=1e-6, rope_theta=10000.0,
      layer_pattern="LG", sliding_window=4096,  # even layers local (4096-token window), odd global
      post_norms=True, norm_plus_one=True, scale_embeddings=True,
      attn_logit_softcap=50.0,  # scores -> 50 tanh(scores / 50)
      final_logit_softcap=30.0,  # logits -> 30 tanh(logits / 30)
      max_seq_len=8192, tie_embeddings=True,
      seq_len=4096, batch_size=128, steps=100_000, learning_rate=3e-4, warmup_steps=2000)
  c.train.grad_accum_steps = 2  # halves the live 256000-wide logits
  return c
