"""Checkpoints of other ecosystems in and out of jaxlm: `from jaxlm.interop import hf`."""
