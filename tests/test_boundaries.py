"""The package's module boundaries, checked on the source: what may import what, and no reaching
into another module's private names."""

import ast
import os

import pytest

pytestmark = pytest.mark.fast  # unit tests: the `-m fast` tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = ("jaxlm", "tests", "benchmarks", "launch", "configs")
# Documented public APIs whose names start with an underscore by the library's own convention.
PUBLIC_DESPITE_UNDERSCORE = {"os._exit"}
# Private names of other libraries, each with the reason it cannot be avoided. Only ever here:
# jaxlm's own modules never reach into each other.
THIRD_PARTY_PRIVATE = {
    # The Pallas GPU interpreter's parameters (race detection) have no public path in jax 0.10;
    # imported only in interpret mode, i.e. in tests.
    ("jaxlm/kernels/flash_gpu_parts.py", "jax._src.pallas.mosaic_gpu.interpret.params"),
    # The coordination service's list of live processes (to name a lost peer) has no public path;
    # any failure there only makes the message say "another process".
    ("jaxlm/train/distributed.py", "jax._src"),
    # The fake bucket must clear orbax's cached bucket lookups between tests; orbax keeps that
    # cache in a private module (tests only).
    ("tests/fake_gcs.py", "orbax.checkpoint._src.path"),
}


def python_files(*trees):
  for tree in trees:
    for folder, _, files in os.walk(os.path.join(ROOT, tree)):
      yield from (os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))


def _private(name: str) -> bool:
  return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def private_uses(path: str) -> list[str]:
  """Imports of a private module or name, and `module._name` on a module this file imported."""
  tree = ast.parse(open(path).read(), path)
  found, modules = [], set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        modules.add(alias.asname or alias.name.split(".")[0])
        if _private(alias.name):
          found.append(f"{node.lineno}: import {alias.name}")
    elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
      for alias in node.names:
        modules.add(alias.asname or alias.name)
        if (_private(node.module or "") or _private(alias.name)) and (
            os.path.relpath(path, ROOT), node.module) not in THIRD_PARTY_PRIVATE:
          found.append(f"{node.lineno}: from {node.module} import {alias.name}")
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules and _private(node.attr)
        and f"{node.value.id}.{node.attr}" not in PUBLIC_DESPITE_UNDERSCORE):
      found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
  return found


def jaxlm_imports(path: str) -> set[str]:
  """Every jaxlm module a file imports (top-level or inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("jaxlm")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxlm"):
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return out


def test_no_module_uses_another_modules_private_names():
  offenders = {os.path.relpath(p, ROOT): uses for p in python_files(*TREES) if (uses := private_uses(p))}
  assert not offenders, offenders


def test_the_checks_see_what_they_look_for(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from jaxlm.train.setup import _init\nfrom jaxlm.parallel import rules\n"
                 "x = rules._ACTIVE\ndef f():\n  import jaxlm.train.loop\n")
  assert [u.split(": ")[1] for u in private_uses(str(bad))] == [
      "from jaxlm.train.setup import _init", "rules._ACTIVE"]
  assert "jaxlm.train.loop" in jaxlm_imports(str(bad))


@pytest.mark.parametrize("tree, forbidden", [
    ("jaxlm/models", ("jaxlm.train", "jaxlm.parallel.pipeline", "jaxlm.inference")),
    ("jaxlm/inference", ("jaxlm.train",)),
    ("jaxlm/kernels", ("jaxlm.train", "jaxlm.parallel", "jaxlm.models", "jaxlm.inference")),
    ("jaxlm/parallel", ("jaxlm.train", "jaxlm.inference")),
    ("jaxlm/data", ("jaxlm.train", "jaxlm.models", "jaxlm.inference")),
])
def test_layers_import_only_downwards(tree, forbidden):
  offenders = {}
  for path in python_files(tree):
    bad = sorted(m for m in jaxlm_imports(path) if m.startswith(forbidden))
    if bad:
      offenders[os.path.relpath(path, ROOT)] = bad
  assert not offenders, offenders
