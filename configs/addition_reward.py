"""A reward model on the addition task: the pretrained model (configs/addition_pretrain.py) with a
fresh scalar head, trained with the Bradley-Terry loss to score a problem's sum above a near miss.

python -m jaxlm.train --config=configs/addition_pretrain.py     # the starting checkpoint
python -m jaxlm.train --config=configs/addition_reward.py        # prints held-out pair accuracy
"""

from jaxlm.posttrain import addition


def get_config():
  c = addition.offline_config("reward")
  c.train.learning_rate = 1e-3
  return c
