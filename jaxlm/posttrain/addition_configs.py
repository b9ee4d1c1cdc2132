"""The run configs of the addition demos (configs/addition_*.py): the pretraining config and the
post-training ones built on it, each writing its data (jaxlm/posttrain/addition.py) on first load."""

from __future__ import annotations

from jaxlm.config import base_config
from jaxlm.posttrain.addition import ANSWER_END, write_pretrain_data, write_records, write_rl_data


def rl_config(objective: str, data_dir: str = "runs/addition/data", digits: int = 2):
  """The shared part of configs/addition_grpo.py and configs/addition_ppo.py: the pretrained
  addition model (checkpoint.init_from) sampled on training-side prompts, graded by exact match,
  evaluated greedily on the 500 held-out problems of `exact_match`."""
  c = pretrain_config(data_dir=data_dir, digits=digits)
  write_rl_data(data_dir, digits=digits)
  c.checkpoint.init_from = c.train.workdir  # the pretraining run's latest checkpoint
  c.data.train_paths = f"{data_dir}/rl_train.jsonl"
  c.data.eval_paths = f"{data_dir}/rl_eval.jsonl"
  # [bos] + "99+99=" is 7 tokens, and an answer at most 3 digits and "\n": rows of 16 positions.
  c.data.seq_len = 16
  p = c.posttrain
  p.objective = objective
  p.rewards = "exact_match"
  p.stop = ANSWER_END
  p.max_new_tokens = digits + 3  # the longest sum, its newline, and one token to spare
  c.train.workdir = f"runs/addition/{objective}"
  c.sample.prompt = "12+45="
  return c


def pretrain_config(data_dir: str = "runs/addition/data", digits: int = 2):
  """The config of configs/addition_pretrain.py (the data written into data_dir first)."""
  write_pretrain_data(data_dir, digits=digits, train_docs=10_000)
  c = base_config()
  c.data.source = "jsonl"
  c.data.train_paths = f"{data_dir}/train.jsonl"
  c.data.eval_paths = f"{data_dir}/eval.jsonl"
  c.data.seq_len = 128  # about one document of 8 problems (~90 tokens) a row
  c.tokenizer.path = data_dir  # its tokenizer.json: 259 ids, one per byte
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 128, 2, 4, 4, 512
  m.max_seq_len = 128
  c.compute.scan_layers = False  # 2 layers compile fast unrolled
  c.compute.matmul_dtype = "bfloat16"  # bf16 operands, float32 accumulation: ~2x XLA:CPU matmul rate
  t = c.train
  t.batch_size = 16
  t.steps = 300
  t.warmup_steps = 50
  t.learning_rate = 3e-3
  t.weight_decay = 0.0
  t.log_every = 50
  t.workdir = "runs/addition/pretrain"
  c.sample.prompt = "12+45="
  c.sample.max_new_tokens = 4
  c.sample.temperature = 0.0
  return c


def offline_config(objective: str, data_dir: str = "runs/addition/data", digits: int = 2):
  """The config of configs/addition_{dpo,kto,reward}.py: `objective` from the pretraining run
  (runs/addition/pretrain), on near-miss records written into data_dir first."""
  c = pretrain_config(data_dir=data_dir, digits=digits)
  kind = "kto" if objective == "kto" else "preference"
  train, held_out = write_records(data_dir, kind, digits=digits, n=20_000, n_eval=512)
  c.checkpoint.init_from = c.train.workdir  # the pretraining run's latest checkpoint
  c.posttrain.objective = objective
  c.posttrain.beta = 0.1
  # DPO alone lowers the chosen answers' likelihood with the near misses' and greedy exact match
  # falls (README "Post-training" has both figures); the chosen answer's NLL holds it up (RPO).
  c.posttrain.rpo_alpha = 1.0 if objective in ("dpo", "ipo") else 0.0
  c.data.train_paths = train
  c.data.eval_paths = held_out
  c.data.seq_len = 16  # "ab+cd=" and a 3-digit answer with bos, newline and eos: 13 tokens at most
  t = c.train
  t.batch_size = 32  # examples (pairs for dpo/reward), two rows each
  t.steps = 1000
  t.warmup_steps = 50
  t.learning_rate = 5e-4
  t.eval_every = 250
  t.workdir = f"runs/addition/{objective}"
  if objective == "kto":  # at 5e-4 every log-prob collapses (the undesirable side's loss wins)
    c.posttrain.beta = 0.5
    t.learning_rate = 1e-4
  return c
