"""Llama-3.1-8B with its published shapes: 8.03B parameters.

python -m jaxlm.train --config=configs/llama3_8b.py --config.data.tfds_data_dir=/path/to/tfds

Shapes (Meta's config.json): vocab 128256, d_model 4096, 32 layers, 32 query and 8 KV heads (GQA,
head_dim 128), SwiGLU 14336, RMSNorm eps 1e-5, RoPE theta 500000 with llama3 scaling (factor 8,
low 1, high 4, original context 8192), untied embeddings, no biases. Every weight of the published
model has its counterpart here, so the parameter count is exact.

Where it runs: a TPU v5p-64 slice (32 chips, 8 hosts), pure FSDP over all 32 chips (float32 weights
and Adam state: 128 GB, 4 GB a chip); global batch 128 rows x 8192 tokens = 1M tokens a step, 4 rows
a chip. On GPUs: 4 nodes of 8 H100 (32 GPUs), the same mesh. Sizes are planned, not yet measured.

Tokenizer: --config.tokenizer.path=path/to/Llama-3.1-8B (the Hugging Face directory: its
tokenizer.json); left empty, jaxlm trains a 128256-piece SentencePiece on the data. Loading the
published weights needs the published tokenizer.
"""

from jaxlm.presets import llama3_1, pretrain_config

TPU_SLICE = "v5p-64"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1)
GPU_NODES = 4  # x 8 H100
PUBLISHED_PARAMS = 8.03e9


def get_config():
  return pretrain_config(
      name="llama3_8b", mesh=MESH,
      **llama3_1(d_model=4096, num_layers=32, num_heads=32, mlp_dim=14336),
      seq_len=8192, batch_size=128, steps=100_000, learning_rate=3e-4, warmup_steps=2000)
