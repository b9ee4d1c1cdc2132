"""jaxlm's own Pallas kernels.

Where things are:
  flash_attention.py   `flash_attention`, the entry point: backend choice, padding, custom_vjp;
                       `attention_work`, the block pairs one call (e.g. one sequence shard) computes.
  flash_spec.py        `Spec` (what is static about one call) and which key/query blocks a block
                       of the other side sees: the block skipping every backend shares.
  masking.py           MASKED and the visibility and score rules every kernel (and the XLA
                       reference) must apply alike.
  flash_tpu.py         the Mosaic TPU kernels (forward, dq, dK/dV); also run in interpret mode.
  flash_gpu.py         the Mosaic GPU (Hopper) kernels: forward, dq, dK/dV.
  flash_gpu_parts.py   their building blocks: wgmma tiles, block ranges, the producer/consumer ring.
  splash.py            `splash_attention`: JAX's TPU splash-attention kernel in the model's layout.

Backends and why:
  TPU   Pallas Mosaic TPU (flash_tpu.py): grid with a reduction ("arbitrary") axis, VMEM scratch,
        pl.when.
  GPU   Pallas Mosaic GPU for Hopper (flash_gpu.py): JAX's default Pallas GPU backend since 0.9
        (the Triton backend is deprecated in 0.11), and the one that reaches wgmma, TMA and
        warp-specialised pipelines; the reduction is an in-kernel loop fed by a producer warp group.
  CPU   the TPU-style kernels under Pallas interpret mode (tests, CPU training); the GPU kernels
        also run on CPU under Pallas' GPU interpreter (backend "gpu_interpret", tests only).

Nothing here reads the model's mesh or axis rules: callers pass the backend
(`backend_for_platform(platform)`) when it is not `jax.default_backend()`'s.
"""

from jaxlm.kernels.flash_attention import attention_work, backend_for_platform, flash_attention

__all__ = ["attention_work", "backend_for_platform", "flash_attention"]
