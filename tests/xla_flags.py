"""XLA_FLAGS for the test processes (pytest's, and the worker scripts it starts).

The two LLVM settings compile the tests' many small CPU programs faster (tests/test_pipeline.py:
186 s -> 129 s on one core); they leave float semantics alone, though the unoptimized code sums in
another order than the optimized build (tests that compare runs compile every side alike).
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu(devices: int) -> str:
  """`devices` simulated CPU devices, compiled fast."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
