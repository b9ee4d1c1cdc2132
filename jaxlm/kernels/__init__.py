"""jaxlm's own Pallas kernels.

`flash_attention` (flash_attention.py) is the entry point; the kernels are in flash_tpu.py.

Backends and why:
  TPU   Pallas Mosaic TPU: grid with a reduction ("arbitrary") axis, VMEM scratch, pl.when.
  CPU   the same TPU-style kernels under Pallas interpret mode (tests, CPU training).
  GPU   not implemented yet. The deliberate choice for it is Pallas Mosaic GPU (JAX's default
        Pallas GPU backend since 0.9; the Triton backend is deprecated in 0.11), because only it
        reaches Hopper's wgmma/TMA/warp-specialised pipelines that flash attention needs to run
        near the H100's limit, and a Triton-backend kernel would be written against a backend
        that is going away. It needs its own kernel structure (explicit pipelining over key blocks
        inside one program, no grid reduction axis), which could not be written and validated
        without a GPU. Until then model.attention="flash" on GPU logs a warning and runs the xla
        reference (jaxlm/models/attention_kernels.py); "cudnn" is available there for speed.
"""

from jaxlm.kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
