"""DPO on the addition task from the pretrained checkpoint (configs/addition_pretrain.py): each pair
is a problem's sum (chosen) against a near miss (rejected: one digit changed, off by one or two, or
a dropped carry); the reference is a frozen copy of the starting model.

python -m jaxlm.train --config=configs/addition_pretrain.py     # the starting checkpoint
python -m jaxlm.train --config=configs/addition_dpo.py           # prints held-out pair accuracy
python -m jaxlm.posttrain.addition --eval --workdir=runs/addition/dpo

--config.posttrain.objective=ipo gives IPO; --config.posttrain.reference=precomputed computes the
reference log-probs once instead of keeping a frozen copy.
"""

from jaxlm.posttrain import addition_configs


def get_config():
  return addition_configs.offline_config("dpo")
