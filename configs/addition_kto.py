"""KTO on the addition task from the pretrained checkpoint (configs/addition_pretrain.py): unpaired
examples, alternately a problem's sum (desirable) and a near miss (undesirable).

python -m jaxlm.train --config=configs/addition_pretrain.py     # the starting checkpoint
python -m jaxlm.train --config=configs/addition_kto.py
python -m jaxlm.posttrain.addition --eval --workdir=runs/addition/kto
"""

from jaxlm.posttrain import addition_configs


def get_config():
  return addition_configs.offline_config("kto")
