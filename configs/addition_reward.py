"""A reward model on the addition task: the fine-tuned model (configs/addition_sft.py) with a fresh
scalar head, trained with the Bradley-Terry loss to score a problem's sum above a near miss.

python -m jaxlm.train --config=configs/addition_pretrain.py     # the pretrained model
python -m jaxlm.train --config=configs/addition_sft.py          # the starting checkpoint
python -m jaxlm.train --config=configs/addition_reward.py        # prints held-out pair accuracy

A small learning rate matters: at 1e-3 the trunk forgets the arithmetic the head has to read (held-out
accuracy stays near 0.6, chance on pairs that differ in the last digit); at 1e-4 it keeps it.
"""

from jaxlm.posttrain import addition_configs


def get_config():
  c = addition_configs.offline_config("reward")
  c.checkpoint.init_from = "runs/addition/sft"
  t = c.train
  t.learning_rate = 1e-4
  t.steps = 4000
  t.eval_every = 1000
  return c
