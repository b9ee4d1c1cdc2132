"""Where a run directory lives: a local path, or a gs:// URL (a bucket every host of a slice sees).

Every file of a run directory is read and written through etils.epath (config.json, the tokenizer
copy, metrics.jsonl, TensorBoard events) or orbax (checkpoints: epath for folders and commit
markers, TensorStore for the arrays), never through open/os.path on the run directory's name, so the
same code serves both kinds. Orbax's TensorStore reaches local paths (its file driver) and gs://
(its gcs driver) only, which is why those are the two kinds a run directory may be; any other
scheme is refused by jaxlm.config's `check_location` when the config is validated.

A gs:// run needs, besides network access and Google credentials: an epath backend for gs:// (gcsfs,
or tensorflow) and google-cloud-storage (orbax asks it about the bucket). `as_path` checks both at
the first touch of each scheme and raises one ConfigError naming what to install.
"""

from __future__ import annotations

import importlib
import os

from etils import epath

from jaxlm.config import RUN_DIR_SCHEMES, ConfigError, check_location, is_url

_READY: set[str] = set()  # schemes whose clients were found in this process


def absolute(location: str) -> str:
  """A local path made absolute (relative to the working directory, as open() reads it); a URL
  as given."""
  return str(location) if is_url(location) else os.path.abspath(location)


def as_path(location, field: str = "train.workdir") -> epath.Path:
  """`location` as an epath.Path: a local path made absolute, a URL as given once its scheme's
  clients are known to be installed (else ConfigError naming `field` and the packages)."""
  if not is_url(location):
    return epath.Path(os.path.abspath(location))
  location = str(location)
  check_location(location, field)
  _check_clients(location.partition("://")[0], location, field)
  return epath.Path(location)


def _check_clients(scheme: str, location: str, field: str) -> None:
  if scheme in _READY:
    return
  try:
    epath.Path(location).exists()  # epath resolves its gs:// backend here (gcsfs or tensorflow)
    importlib.import_module("google.cloud.storage")  # orbax's own client for the bucket
  except ImportError as e:
    raise ConfigError(
        f"{field}={location!r} is a {scheme}:// URL, but its clients are not installed ({e}); "
        f"pip install {RUN_DIR_SCHEMES[scheme][1]} (jaxlm's [{RUN_DIR_SCHEMES[scheme][0]}] extra), "
        "or give a local path") from e
  _READY.add(scheme)


def copy_tree(source: epath.Path, target: epath.Path) -> None:
  """Copies a file, or a folder's files recursively, from one epath location to another (a
  bucket has no folders to create: a file's name makes its folder)."""
  if source.is_dir():
    for child in source.iterdir():
      copy_tree(child, target / child.name)
  else:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
