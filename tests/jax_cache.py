"""JAX's persistent compilation cache for the training runs of one test in this process.

Each jaxlm.train.loop.train() call builds and jits its step functions anew, so a test that trains
several times compiles the same programs again each time; with the cache on, the later runs load
the first run's executables (the very programs compiled, so their results are bit for bit those of
a fresh compile).
"""

import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def persistent(path):
  """The cache in `path` for every program, however fast it compiles; the process's own settings
  are put back afterwards."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(path))
  jax.config.update(names[1], 0)
  compilation_cache.reset_cache()  # read the settings again at the next compile
  try:
    yield str(path)
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()
