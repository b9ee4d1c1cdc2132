"""jaxlm: a JAX/Flax NNX training stack for large language models."""

import flax

# Parameters carry logical axis names as metadata (see jaxlm/parallel/rules.py); they are placed
# on devices by the jitted init and train step, never eagerly at construction.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
