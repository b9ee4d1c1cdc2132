"""Qwen2.5-7B with its published shapes: 7.62B parameters (the model card rounds to 7.61B).

Shapes (Qwen's config.json): vocab 152064, d_model 3584, 28 layers, 28 query and 4 KV heads (GQA,
head_dim 128), SwiGLU 18944, RMSNorm eps 1e-6, RoPE theta 1e6, bias on the q/k/v projections (none
on the output projection or the MLP), untied embeddings. The parameter count is exact.

Where it runs: a TPU v5p-64 slice (32 chips), pure FSDP; global batch 256 rows x 4096 tokens = 1M
tokens a step (Qwen2.5 pretrains at 4096 and extends the context later). On GPUs: 4 nodes of 8
H100. Sizes are planned, not yet measured.

Tokenizer: --config.tokenizer.path=path/to/Qwen2.5-7B (the Hugging Face directory: its
tokenizer.json, fewer ids than the embedding's 152064 rows, which jaxlm allows for a Hugging Face
tokenizer); left empty, jaxlm trains a 152064-piece SentencePiece on the data.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5p-64"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1)
GPU_NODES = 4  # x 8 H100
PUBLISHED_PARAMS = 7.61e9


def get_config():
  return pretrain_config(
      name="qwen2_5_7b", mesh=MESH,
      vocab_size=152064, d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4, mlp_dim=18944,
      norm_eps=1e-6, rope_theta=1_000_000.0,
      attention_bias=True,  # Qwen2: bias on q, k, v
      max_seq_len=131072,  # the model card's context (beyond 32K with YaRN, which this preset leaves off)
      tie_embeddings=False,
      seq_len=4096, batch_size=256, steps=100_000, learning_rate=3e-4, warmup_steps=2000)
