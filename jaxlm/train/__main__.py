"""`python -m jaxlm.train --config=configs/<name>.py [--config.train.steps=...]`.

Trains (resuming from train.workdir if it holds a checkpoint), evaluates on the held-out split,
and prints a sample from the trained model.
"""

import jax
from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a jaxlm config file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from flax import nnx

  from jaxlm.inference.generate import generate_text
  from jaxlm.train.loop import train

  config = _CONFIG.value
  result = train(config)
  metrics = result["metrics"]
  if "eval_bits_per_byte" in metrics:
    print(f"validation: loss {metrics['eval_loss']:.4f} nats/token, perplexity "
          f"{metrics['eval_perplexity']:.2f}, bits per byte {metrics['eval_bits_per_byte']:.4f}")
  model = nnx.merge(result["graphdef"], result["state"].params)
  key = jax.random.fold_in(result["state"].rng, 1)
  text = generate_text(model, result["tokenizer"], config.sample.prompt, config.sample, key)
  print(f"sample:\n{config.sample.prompt}{text}")


if __name__ == "__main__":
  app.run(main)


def run():
  """Console-script entry point (`jaxlm-train`)."""
  app.run(main)
