"""Eight simulated CPU devices for every test process (set before anything imports jax).

Code that is not given a mesh still runs on one device (jax.jit places unsharded inputs on the
first device); tests/test_parallel.py builds meshes over all eight. The flag reaches subprocesses
(CLI tests, the notebook kernel) through the environment too.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
