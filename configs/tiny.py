"""A seconds-long config for tests and smoke runs: tiny model, few steps."""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.vocab_size = c.tokenizer.vocab_size = 512
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 64, 2, 4, 2, 128
  m.max_seq_len = c.data.seq_len = 64
  c.train.steps, c.train.batch_size, c.train.warmup_steps = 20, 8, 5
  c.train.log_every = 5
  c.train.eval_batches = 4
  c.tokenizer.train_max_bytes = 1_000_000
  c.train.workdir = "runs/tiny"
  c.sample.max_new_tokens = 16
  return c
