"""Llama-3.1-405B with its published shapes: 405.9B parameters (405,853,388,800).

Shapes (Meta's config.json): vocab 128256, d_model 16384, 126 layers, 128 query and 8 KV heads
(GQA, head_dim 128), SwiGLU 53248, RMSNorm eps 1e-5, RoPE theta 500000 with llama3 scaling
(factor 8, low 1, high 4, original context 8192), untied embeddings. The parameter count is exact.

Where it runs: a TPU v5p-2048 slice (1024 chips, 256 hosts): FSDP over 128 and tensor parallel over
8 (float32 weights and Adam state: 6.5 TB, 6.3 GB a chip; tensor=8 splits the 16384-wide
activations that full remat still keeps per layer); global batch 512 rows x 8192 tokens = 4M tokens
a step. On GPUs: 128 nodes of 8 H100 (1024 GPUs), tensor=8 inside a node. Meta trained it with
pipeline and context parallelism as well; this plan is an estimate, not measured.

Tokenizer: as for llama3_8b (the Hugging Face directory's tokenizer.json, or a SentencePiece of
the same size trained here).
"""

from jaxlm.presets import llama3_1, pretrain_config

TPU_SLICE = "v5p-2048"
MESH = dict(data=1, fsdp=-1, tensor=8, sequence=1, stage=1)
GPU_NODES = 128  # x 8 H100
PUBLISHED_PARAMS = 405.9e9


def get_config():
  return pretrain_config(
      name="llama3_405b", mesh=MESH,
      **llama3_1(d_model=16384, num_layers=126, num_heads=128, mlp_dim=53248),
      seq_len=8192, batch_size=512, steps=100_000, learning_rate=8e-5, warmup_steps=8000)
