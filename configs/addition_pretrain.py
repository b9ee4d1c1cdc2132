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
0.376 on 500 problems (the second command, 11 s); 0.370 since decoding reads the KV cache in a
new layout (the same weights; a net three of 500 greedy answers changed with the order of the sums). Training is deterministic, so the accuracy is
the same on a rerun; the time is not. Longer training goes past partial accuracy quickly, and
3-digit problems need far more than this budget.
"""

from jaxlm.posttrain import addition_configs


def get_config():
  return addition_configs.pretrain_config(data_dir="runs/addition/data", digits=2)
