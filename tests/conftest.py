"""Test-session settings that must be in place before JAX initialises its backends."""

import os

# With libtpu installed (the test extra, for the TPU AOT tests), every JAX process probes for TPUs
# and libtpu takes /tmp/libtpu_lockfile; a second process (another xdist worker, or any other JAX
# program on the machine) then cannot build the abstract TPU topology. The AOT tests use no TPU,
# so sharing libtpu between processes is safe.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
