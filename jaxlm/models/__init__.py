"""Model definitions (Flax NNX), used through nnx.split / nnx.merge."""

import jax
from flax import nnx

from jaxlm.models.compute import Compute, resolve
from jaxlm.models.layers import lora_spec, score_outputs
from jaxlm.models.transformer import Transformer


def build_model(config, seed: int = 0, platform: str | None = None) -> Transformer:
  """The Transformer a full config describes: architecture `config.model`, computed as
  `config.compute` resolves on `platform` (default: JAX's default backend, for models run where
  they are built; a mesh's caller passes the mesh's platform, see jaxlm/train/setup.py), with the
  LoRA adapters `config.lora` asks for (none when lora.rank is 0) and the score head of a reward
  model or PPO policy (posttrain.objective reward/ppo)."""
  compute = resolve(config.compute, platform or jax.default_backend(), 1,
                    config.model.attn_logit_softcap, config.model.attention_kind)
  return Transformer(config.model, nnx.Rngs(seed), compute, lora_spec(config), score_outputs(config))


__all__ = ["Compute", "Transformer", "build_model"]
