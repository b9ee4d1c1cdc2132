"""Settings every test process needs in place before anything imports jax.

Eight simulated CPU devices for every test process: code that is not given a mesh still runs on
one device (jax.jit places unsharded inputs on the first device); tests/test_parallel.py builds
meshes over all eight. The flag reaches subprocesses (CLI tests, the notebook kernel) through the
environment too.

With libtpu installed (the test extra, for the TPU AOT tests), every JAX process probes for TPUs
and libtpu takes /tmp/libtpu_lockfile; a second process (another xdist worker, or any other JAX
program on the machine) then cannot build the abstract TPU topology. The AOT tests use no TPU, so
sharing libtpu between processes is safe.
"""

import os
import shutil
import tempfile

import pytest

import xla_flags  # tests/xla_flags.py: plain strings, imports no jax

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags.cpu(8)]).strip()
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# One JAX persistent compilation cache for the whole run: many tests train the same small configs,
# each train() compiles its programs anew, and with the cache the second compile of a program is a
# load of the first one's executable (the same machine code, so results are bit for bit those of
# a compile). The first pytest process of a run makes the folder; xdist's workers and the processes
# tests start inherit it through the environment. A test that sets its own cache (the
# `compile_cache` fixtures, tests that hand subprocesses one) still uses its own. The size limit
# turns on JAX's file lock, so two workers never read an entry while the other writes it; programs
# that compile in under 0.3 s are not worth the write.
_RUN_CACHE = "JAXLM_TEST_RUN_JAX_CACHE"
_MADE_RUN_CACHE = _RUN_CACHE not in os.environ
if _MADE_RUN_CACHE:
  os.environ[_RUN_CACHE] = tempfile.mkdtemp(prefix="jaxlm-tests-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_RUN_CACHE])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))


def pytest_unconfigure(config):
  if _MADE_RUN_CACHE:
    shutil.rmtree(os.environ[_RUN_CACHE], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Tests marked `heavy` (subprocess training runs, a minute or more each) run first. `-n 2` hands
  tests to its two workers in collection order: started first, the long ones are split between
  the workers while the many short ones fill in behind, instead of one worker finishing a long test
  alone at the end while the other idles. The order of the rest is unchanged (a stable sort)."""
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture
def compile_cache(tmp_path):
  """JAX's persistent compilation cache (tests/jax_cache.py) for one test's runs: a test that trains
  several times (a run and its resume) compiles each program once. Yields the cache folder, which
  subprocesses can be pointed at."""
  import jax_cache  # here, not at the top: this file runs before anything imports jax
  with jax_cache.persistent(tmp_path / "jax_cache") as path:
    yield path


@pytest.fixture(scope="module")
def module_compile_cache(tmp_path_factory):
  """The same for all of a module's tests (runs that share programs across tests)."""
  import jax_cache
  with jax_cache.persistent(tmp_path_factory.mktemp("jax_cache")) as path:
    yield path
