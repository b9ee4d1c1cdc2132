"""A tiny model pretrained on 2-digit addition: the starting point of the post-training demos.

python -m jaxlm.train --config=configs/addition_pretrain.py
python -m jaxlm.posttrain.addition --eval --workdir=runs/addition/pretrain

Loading this config writes the corpus (jaxlm/posttrain/addition.py) into DATA_DIR unless it is
already there: 10,000 JSONL documents of 8 training-side problems each ("12+45=57", one a line),
250 documents of held-out problems for the validation loss, and the byte-level tokenizer (one
token per digit; jaxlm/posttrain/byte_tokenizer.py) that tokenizer.path points at. The files are
the same on every machine.

It is meant to stop part-way, so post-training has room to improve it: 300 steps of 16 rows of
128 tokens (0.8 of an epoch of the 763K training tokens) with a 0.56M-parameter, 2-layer model.
Measured on this project's 2-core CPU machine while other jobs shared it (load average 6.6-8):
1m45s for the whole first command (data, compile, training, validation), and held-out exact match
0.376 on 500 problems (the second command, 11 s). Training is deterministic, so the accuracy is
the same on a rerun; the time is not. Longer training goes past partial accuracy quickly, and
3-digit problems need far more than this budget.
"""

from jaxlm.config import base_config
from jaxlm.posttrain import addition

DATA_DIR = "runs/addition/data"
DIGITS = 2


def get_config():
  addition.write_pretrain_data(DATA_DIR, digits=DIGITS, train_docs=10_000)
  c = base_config()
  c.data.source = "jsonl"
  c.data.train_paths = f"{DATA_DIR}/train.jsonl"
  c.data.eval_paths = f"{DATA_DIR}/eval.jsonl"
  c.data.seq_len = 128  # about one document of 8 problems (~90 tokens) a row
  c.tokenizer.path = DATA_DIR  # its tokenizer.json: 259 ids, one per byte
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
