"""Model definitions (Flax NNX), used through nnx.split / nnx.merge."""

from jaxlm.models.transformer import Transformer

__all__ = ["Transformer"]
