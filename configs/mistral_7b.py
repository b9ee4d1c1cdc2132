"""Mistral-7B-v0.1 with its published shapes: 7.24B parameters, sliding-window attention.

Shapes (Mistral AI's config.json): vocab 32000, d_model 4096, 32 layers, 32 query and 8 KV heads
(GQA, head_dim 128), SwiGLU 14336, RMSNorm eps 1e-5, RoPE theta 10000, sliding window 4096 on
every layer, untied embeddings. The parameter count is exact.

Where it runs: a TPU v5p-64 slice (32 chips), pure FSDP; global batch 128 rows x 8192 tokens = 1M
tokens a step. Rows are twice the window, so the window really limits attention (each query sees at
most 4096 keys). On GPUs: 4 nodes of 8 H100. Sizes are planned, not yet measured.

Tokenizer: Mistral ships a SentencePiece model (tokenizer.model, 32000 pieces): set
--config.tokenizer.path to it; left empty, jaxlm trains a SentencePiece of the same size.
"""

from jaxlm.presets import pretrain_config

TPU_SLICE = "v5p-64"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1)
GPU_NODES = 4  # x 8 H100
PUBLISHED_PARAMS = 7.24e9


def get_config():
  return pretrain_config(
      name="mistral_7b", mesh=MESH,
      vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336,
      norm_eps=1e-5, rope_theta=10000.0,
      sliding_window=4096,  # each query attends to the last 4096 keys, on every layer
      max_seq_len=32768,  # the config's max_position_embeddings
      tie_embeddings=False,
      seq_len=8192, batch_size=128, steps=100_000, learning_rate=3e-4, warmup_steps=2000)
