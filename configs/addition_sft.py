"""Supervised fine-tuning of the addition model (configs/addition_pretrain.py) on prompt/completion
pairs: the loss is on the answer's tokens only, examples packed with their own segment ids.

python -m jaxlm.train --config=configs/addition_pretrain.py     # the starting checkpoint
python -m jaxlm.train --config=configs/addition_sft.py
python -m jaxlm.posttrain.addition --eval --workdir=runs/addition/sft
"""

from jaxlm.posttrain import addition, addition_configs


def get_config():
  data = "runs/addition/data"
  c = addition_configs.pretrain_config(data_dir=data, digits=2)
  addition.write_sft_data(data, digits=2)
  c.checkpoint.init_from = c.train.workdir  # the pretraining run's latest checkpoint
  c.data.source = "chat"  # {"prompt", "completion"} records: the completion's tokens are the targets
  c.data.train_paths = f"{data}/sft_train.jsonl"
  c.data.eval_paths = f"{data}/sft_eval.jsonl"
  t = c.train
  t.steps = 200
  t.warmup_steps = 20
  t.learning_rate = 1e-3
  t.workdir = "runs/addition/sft"
  return c
