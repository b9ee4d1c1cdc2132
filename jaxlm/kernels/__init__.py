"""jaxlm's own Pallas kernels.

`flash_attention` (flash_attention.py) is the entry point; the kernels are in flash_tpu.py.

Backends and why:
  TPU   Pallas Mosaic TPU (flash_tpu.py): grid with a reduction ("arbitrary") axis, VMEM scratch,
        pl.when.
  GPU   Pallas Mosaic GPU for Hopper (flash_gpu.py): JAX's default Pallas GPU backend since 0.9
        (the Triton backend is deprecated in 0.11), and the one that reaches wgmma, TMA and
        warp-specialised pipelines; the reduction is an in-kernel loop fed by a producer warp group.
  CPU   the TPU-style kernels under Pallas interpret mode (tests, CPU training); the GPU kernels
        also run on CPU under Pallas' GPU interpreter (backend "gpu_interpret", tests only).
"""

from jaxlm.kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
