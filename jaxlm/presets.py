"""What the model presets in configs/ share: the base they build on, and counting their parameters.

Every preset is a file `configs/<name>.py` with `get_config()` (loadable as `--config=configs/<name>.py`,
so `--config.<section>.<field>=...` overrides any field) and module-level constants that document
where it is meant to run: `TPU_SLICE`, `MESH` (axis sizes, -1: the rest of the devices), `GPU_NODES`
(8-GPU nodes) and `PUBLISHED_PARAMS` (the count the published model card states, or for our own
shapes the count we state). get_config() applies MESH to config.mesh. A family's shared model
fields come from one function (llama3_1), so its presets state only their own shape.
"""

from __future__ import annotations

import importlib.util
import math
import os

from jaxlm.config import ConfigDict, base_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# train.loss_chunk of the pretraining presets: the head and loss run over 1024-token pieces of the
# sequence, so a chip never holds its rows' whole float32 logits (4 rows x 8192 x 128256 ids = 16.8
# GB on Llama-3.1-8B's v5p-64). `python -m jaxlm.aot --config=configs/llama3_8b.py --topology=v5p-64`
# (measured): temporaries 45.46 GB a chip without it, 27.85 GB with it. Costs one more forward of
# the head's matmul, 2 x vocab x d_model FLOPs a token: 2% of Llama-3.1-8B's training FLOPs
# (jaxlm.train.flops.train_flops_per_token), 10% of gpt2_small's and 4% of llama_350m's, which fit
# without it and set 0.
LOSS_CHUNK = 1024


def pretrain_config(*, name: str, mesh: dict, vocab_size: int, seq_len: int, batch_size: int,
                    steps: int, learning_rate: float, warmup_steps: int, remat_policy: str = "full",
                    loss_chunk: int = LOSS_CHUNK, **model) -> ConfigDict:
  """base_config() set up for a large pretraining run; `model` sets config.model fields (the
  architecture); remat_policy sets compute.remat_policy; set other compute fields on the result.
  name: the preset's name (train.workdir runs/<name>); mesh: its MESH, applied to config.mesh
  (the TPU_SLICE layout; override with --config.mesh.<axis>=...). loss_chunk: train.loss_chunk
  (LOSS_CHUNK by default; 0 where the logits fit anyway and the head's extra forward is not free).

  Data is a prepared TFDS dataset (C4) and the tokenizer vocabulary matches the model's, so the
  config validates as is; to train with a model's published tokenizer, point tokenizer.path at it
  as a SentencePiece .model (see each preset's docstring).
  """
  c = base_config()
  m = c.model
  m.update(vocab_size=vocab_size, **model)
  m.vocab_multiple = 128  # whole matmul tiles on TPU and GPU for any vocabulary (published ones are already)
  c.compute.compute_dtype = "bfloat16"  # bf16 activations; float32 master weights
  c.compute.remat_policy = remat_policy  # default full: recompute each layer in backward, activations fit
  c.compute.attention = "auto"  # a flash-style kernel on TPU and GPU: memory linear in seq_len
  c.tokenizer.vocab_size = vocab_size  # jaxlm trains a SentencePiece of this size when no path is given
  c.tokenizer.train_max_bytes = 1_000_000_000  # a large vocabulary needs far more text than the default
  c.data.source = "tfds"
  c.data.tfds_name = "c4/en:3.1.0"  # prepared in ArrayRecord format; set data.tfds_data_dir
  c.data.seq_len = seq_len
  t = c.train
  t.update(batch_size=batch_size, steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps)
  t.loss_chunk = loss_chunk
  t.b2 = 0.95
  t.weight_decay = 0.1
  t.eval_every = 2000
  t.eval_batches = 50  # a fixed slice of the validation split, not the whole of it
  t.log_every = 10
  t.progress_bar = False  # one log line per log step: readable in per-worker log files
  c.checkpoint.every = 1000  # what a preempted run loses at most
  t.workdir = f"runs/{name}"
  c.mesh.update(**mesh)
  return c


def llama3_1(**shape) -> dict:
  """config.model fields of a Llama-3.1 model (Meta's config.json) whose own shape is `shape`
  (d_model, num_layers, num_heads, mlp_dim): the 128256-token vocabulary, 8 KV heads, RMSNorm eps
  1e-5, RoPE theta 500000 with llama3 scaling (factor 8, low 1, high 4, original context 8192), a
  128K context and untied embeddings. Pass it to pretrain_config as `**llama3_1(...)`."""
  return dict(
      vocab_size=128256, num_kv_heads=8, norm_eps=1e-5, rope_theta=500000.0,
      rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
      rope_original_max_len=8192,  # the pretraining context; 3.1 extends it to 128K
      max_seq_len=131072,  # Llama-3.1's context; nothing is allocated per position
      tie_embeddings=False) | shape


def load(name_or_path: str):
  """Imports a preset module: `llama3_8b` or `configs/llama3_8b.py`."""
  path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIG_DIR, name_or_path + ".py")
  name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f"jaxlm_preset_{name}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def names() -> list[str]:
  """Every preset in configs/."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def active_param_count(model_cfg) -> int:
  """Parameters one token passes through: all of them but, in each MoE layer, the routed experts
  the router does not pick (moe_num_experts - moe_experts_per_token of them). The input embedding
  counts (a lookup, as model cards count it)."""
  from jaxlm.config import moe_layers  # noqa: PLC0415

  m = model_cfg
  if not m.moe_num_experts:
    return param_count(m)
  expert = m.d_model * (m.moe_mlp_dim or m.mlp_dim) * (2 if m.mlp_kind == "gelu" else 3)
  skipped = (m.moe_num_experts - m.moe_experts_per_token) * expert
  return param_count(m) - sum(moe_layers(m)) * skipped


def param_count(model_cfg) -> int:
  """Parameters of the model `model_cfg` describes, from the abstract model: no memory is allocated."""
  from flax import nnx  # imported here: configs import this module and should stay cheap to load

  import jax
  from jaxlm.models import Transformer

  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
