"""`python -m jaxlm.train --config=configs/<name>.py [--config.train.steps=...]`.

Trains (resuming from train.workdir if it holds a checkpoint), evaluates on the held-out split,
and prints a sample from the trained model.
"""

import os
import sys

import jax
from absl import app, logging
from ml_collections import config_flags

from jaxlm import cli
from jaxlm.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a jaxlm config file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  from flax import nnx

  from jaxlm.inference.decode import generate_text
  from jaxlm.config import validate
  from jaxlm.runs import CheckpointError
  from jaxlm.train.distributed import lost_processes, maybe_initialize
  from jaxlm.train.guard import NonFiniteError
  from jaxlm.train.loop import train
  from jaxlm.train.preemption import PREEMPTED_EXIT_CODE, Preempted

  config = _CONFIG.value
  try:
    # before any computation: a multi-host job must agree on its devices first
    validate(config)  # the start-up fields too, before any process waits for another
    maybe_initialize(peer_timeout_seconds=config.train.peer_timeout_seconds, train_cfg=config.train)
    result = train(config)
  except (ConfigError, FileNotFoundError) as e:  # bad input: a message, not a trace
    sys.exit(f"jaxlm: {e}")
  except Preempted as e:
    print(f"jaxlm: {e}; exit code {PREEMPTED_EXIT_CODE}: requeue the same command to resume",
          file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      # Every process saved the same step and is alive: wait for all at jax.distributed's shutdown
      # barrier. Process 0 hosts the coordination service, and a peer still finishing its save
      # aborts if process 0 leaves first.
      jax.distributed.shutdown()
    _leave(PREEMPTED_EXIT_CODE)
  except NonFiniteError as e:
    print(f"jaxlm: {e}", file=sys.stderr, flush=True)
    _leave(1)
  except CheckpointError as e:
    # After a failed restore, orbax's I/O threads print "Event loop is closed" traces at interpreter
    # shutdown that would bury the message; nothing is left to flush, so leave at once.
    print(f"jaxlm: {e}", file=sys.stderr, flush=True)
    _leave(1)
  except Exception as e:  # a lost peer fails the next collective; say which one, then leave
    if jax.process_count() == 1:
      raise
    lost = lost_processes()
    who = f"process(es) {lost}" if lost else "another process"
    print(f"jaxlm: process {jax.process_index()} stops: {who} of {jax.process_count()} stopped "
          f"answering ({type(e).__name__}: {str(e)[:300]}). Relaunch the same command on every "
          "host to resume from the last checkpoint", file=sys.stderr, flush=True)
    _leave(1)
  metrics = result["metrics"]
  if "eval_bits_per_byte" in metrics:
    print(f"validation: loss {metrics['eval_loss']:.4f} nats/token, perplexity "
          f"{metrics['eval_perplexity']:.2f}, bits per byte {metrics['eval_bits_per_byte']:.4f}")
  elif any(k.startswith("eval_") for k in metrics):  # a post-training objective's own metrics
    print("validation: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_")))
  frozen = () if result["frozen"] is None else (result["frozen"],)  # LoRA's base weights
  model = nnx.merge(result["graphdef"], result["state"].params, *frozen)
  key = jax.random.fold_in(result["state"].rng, 1)
  text = generate_text(model, result["tokenizer"], config.sample.prompt, config.sample, key)
  print(f"sample:\n{config.sample.prompt}{text}")


def _leave(code: int):
  """Exits at once: a multi-process run would otherwise wait at jax.distributed's shutdown
  barrier for peers that are gone; a single process has flushed everything already."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def run():
  """Entry point of `python -m jaxlm.train` and the `jaxlm-train` console script."""
  cli.run(main, "jaxlm")


if __name__ == "__main__":
  run()
