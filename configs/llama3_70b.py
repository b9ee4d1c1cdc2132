"""Llama-3.1-70B with its published shapes: 70.6B parameters.

Shapes (Meta's config.json): vocab 128256, d_model 8192, 80 layers, 64 query and 8 KV heads (GQA,
head_dim 128), SwiGLU 28672, RMSNorm eps 1e-5, RoPE theta 500000 with llama3 scaling (factor 8,
low 1, high 4, original context 8192), untied embeddings. The parameter count is exact.

Where it runs: a TPU v5p-512 slice (256 chips, 64 hosts), pure FSDP over all 256 chips (float32
weights and Adam state: 1.13 TB, 4.4 GB a chip); global batch 512 rows x 8192 tokens = 4M tokens a
step, 2 rows a chip, full remat. On GPUs: 32 nodes of 8 H100 (256 GPUs), the same mesh;
--config.mesh.tensor=8 keeps tensor parallelism inside a node (NVLink) with FSDP across nodes.
Sizes are planned, not yet measured.

Tokenizer: as for llama3_8b (the Hugging Face directory's tokenizer.json, or a SentencePiece of
the same size trained here).
"""

from jaxlm.presets import llama3_1, pretrain_config

TPU_SLICE = "v5p-512"
MESH = dict(data=1, fsdp=-1, tensor=1, sequence=1, stage=1)
GPU_NODES = 32  # x 8 H100
PUBLISHED_PARAMS = 70.6e9


def get_config():
  return pretrain_config(
      name="llama3_70b", mesh=MESH,
      **llama3_1(d_model=8192, num_layers=80, num_heads=64, mlp_dim=28672),
      seq_len=8192, batch_size=512, steps=100_000, learning_rate=1.5e-4, warmup_steps=2000)
