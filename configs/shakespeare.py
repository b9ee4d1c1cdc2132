"""The default job: a small Llama-style model on the embedded Shakespeare corpus, sized for a CPU.

python -m jaxlm.train --config=configs/shakespeare.py
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.train.workdir = "runs/shakespeare"
  return c
