"""An offline stand-in for a Google Cloud Storage bucket, for testing `gs://` run directories.

A `gs://BUCKET/NAME` object is the file ROOT/BUCKET/NAME of a local directory, reached three ways,
each through the client a real `gs://` run uses, with only the storage behind it replaced:
  - etils.epath (config.json, tokenizer files, metrics, TensorBoard events, and orbax's own
    directory listing, commit markers and deletions): epath sends `gs://` to fsspec's "gcs"
    protocol (gcsfs in a real run); `FakeGCSFileSystem` is registered under that protocol. Like
    gcsfs it cannot append to an object.
  - TensorStore (the checkpoint arrays orbax writes): its own `gcs` driver speaks the GCS JSON API
    over HTTP; `FakeGCSServer` answers that API (media downloads and uploads, object metadata,
    listing, deletion, generation preconditions) at the URL TensorStore's TENSORSTORE_GCS_HTTP_URL
    points to.
  - google.cloud.storage: orbax asks it whether the bucket has a hierarchical namespace; a stub
    module answers "no", as for an ordinary bucket.
What it does not model: object-listing consistency delays, credentials, retries on server errors,
and gcsfs's own caching.
"""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import types
import urllib.parse

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

_ROOT = {"path": None}  # the bucket directory root of the current test (set by `serve`)


def _root() -> str:
  if _ROOT["path"] is None:
    raise RuntimeError("the fake gs:// bucket is not set up")
  return _ROOT["path"]


class FakeGCSFileSystem(DirFileSystem):
  """fsspec's "gcs"/"gs" protocol over ROOT: gs://BUCKET/NAME is ROOT/BUCKET/NAME."""
  protocol = ("gs", "gcs")

  def __init__(self, *args, **kwargs):  # epath passes finalize_on_close=True (a gcsfs option)
    super().__init__(path="/", fs=LocalFileSystem(auto_mkdir=True))  # no folders to make first

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, list):
      return [cls._strip_protocol(p) for p in path]
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip("/")

  def _join(self, path):
    if isinstance(path, list):
      return [self._join(p) for p in path]
    return os.path.join(_root(), self._strip_protocol(path))

  def _relpath(self, path):
    if isinstance(path, list):
      return [self._relpath(p) for p in path]
    return os.path.relpath(path, _root())

  def open(self, path, mode="rb", *args, **kwargs):
    if "a" in mode or "+" in mode:  # an object is written whole, as gcsfs does
      raise NotImplementedError(f"gs:// objects cannot be opened with mode {mode!r}")
    return super().open(path, mode, *args, **kwargs)


class _Bucket:
  """Objects as files under ROOT/BUCKET, each with a generation that changes when it is rewritten."""

  def __init__(self):
    self.lock = threading.Lock()
    self.generations: dict[str, tuple[int, int, int]] = {}  # file -> (mtime_ns, size, generation)
    self.counter = 1

  def file(self, bucket: str, name: str) -> str:
    return os.path.join(_root(), bucket, name)

  def generation(self, path: str) -> int | None:
    """The object's generation, None if it does not exist (callers hold the lock)."""
    if not os.path.isfile(path):
      return None
    st = os.stat(path)
    seen = self.generations.get(path)
    if seen is None or seen[:2] != (st.st_mtime_ns, st.st_size):
      self.counter += 1
      seen = (st.st_mtime_ns, st.st_size, self.counter)
      self.generations[path] = seen
    return seen[2]

  def write(self, path: str, data: bytes) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.fake-upload"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
    self.counter += 1
    st = os.stat(path)
    self.generations[path] = (st.st_mtime_ns, st.st_size, self.counter)
    return self.counter


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  bucket_store: _Bucket

  def log_message(self, *args):
    pass

  def _reply(self, code: int, body: bytes = b"", headers: dict | None = None):
    self.send_response(code)
    for k, v in (headers or {}).items():
      self.send_header(k, str(v))
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if body and self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, code: int, obj: dict, headers: dict | None = None):
    self._reply(code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

  def _parse(self):
    _REQUESTS.append((self.command, self.path))
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
    parts = url.path.split("/")  # '', ['upload',] 'storage', 'v1', 'b', BUCKET, 'o', [NAME]
    if parts[1] == "upload":
      parts = parts[1:]
    bucket = parts[4] if len(parts) > 4 else ""
    name = urllib.parse.unquote(parts[6]) if len(parts) > 6 else None
    return url.path.startswith("/upload/"), bucket, name, query

  def _precondition_failed(self, query: dict, generation: int | None) -> bool:
    current = generation or 0
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != current:
      return True
    return "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == current

  def _metadata(self, bucket: str, name: str, generation: int, size: int) -> dict:
    return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(size),
            "generation": str(generation), "metageneration": "1"}

  def do_GET(self):
    upload, bucket, name, query = self._parse()
    store = self.bucket_store
    if name is None:  # objects.list
      return self._list(bucket, query)
    path = store.file(bucket, name)
    with store.lock:
      generation = store.generation(path)
      data = open(path, "rb").read() if generation is not None else None
    if generation is None:
      return self._json(404, {"error": {"code": 404, "message": "No such object"}})
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
      return self._reply(304, headers={"x-goog-generation": generation})
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
      return self._json(412, {"error": {"code": 412, "message": "Precondition Failed"}})
    if query.get("alt") != "media":
      return self._json(200, self._metadata(bucket, name, generation, len(data)))
    headers = {"x-goog-generation": generation, "Content-Type": "application/octet-stream"}
    spec = self.headers.get("Range")
    if spec and spec.startswith("bytes="):
      first, _, last = spec[len("bytes="):].partition("-")
      if first == "":
        start, stop = max(0, len(data) - int(last)), len(data)
      else:
        start, stop = int(first), (int(last) + 1 if last else len(data))
      if start >= len(data) and len(data) > 0:
        return self._reply(416, headers=headers)
      stop = min(stop, len(data))
      headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
      return self._reply(206, data[start:stop], headers)
    return self._reply(200, data, headers)

  def do_HEAD(self):
    self.do_GET()

  def do_POST(self):
    upload, bucket, name, query = self._parse()
    length = int(self.headers.get("Content-Length") or 0)
    data = self.rfile.read(length) if length else b""
    if not upload or query.get("uploadType") != "media":
      return self._json(400, {"error": {"code": 400, "message": "only uploadType=media uploads"}})
    name = query["name"]
    store = self.bucket_store
    path = store.file(bucket, name)
    with store.lock:
      if self._precondition_failed(query, store.generation(path)):
        return self._json(412, {"error": {"code": 412, "message": "Precondition Failed"}})
      generation = store.write(path, data)
    self._json(200, self._metadata(bucket, name, generation, len(data)))

  def do_DELETE(self):
    _, bucket, name, query = self._parse()
    store = self.bucket_store
    path = store.file(bucket, name)
    with store.lock:
      generation = store.generation(path)
      if generation is None:
        return self._json(404, {"error": {"code": 404, "message": "No such object"}})
      if self._precondition_failed(query, generation):
        return self._json(412, {"error": {"code": 412, "message": "Precondition Failed"}})
      os.remove(path)
      store.generations.pop(path, None)
    self._reply(204)

  def _list(self, bucket: str, query: dict):
    top = os.path.join(_root(), bucket)
    prefix = query.get("prefix", "")
    start, end = query.get("startOffset", ""), query.get("endOffset", "")
    items = []
    store = self.bucket_store
    with store.lock:
      for dirpath, _, files in os.walk(top):
        for f in files:
          if f.endswith(".fake-upload"):
            continue
          path = os.path.join(dirpath, f)
          name = os.path.relpath(path, top)
          if name.startswith(prefix) and name >= start and (not end or name < end):
            items.append(self._metadata(bucket, name, store.generation(path), os.path.getsize(path)))
    items.sort(key=lambda x: x["name"])
    self._json(200, {"kind": "storage#objects", "items": items})


class FakeGCSServer:
  """The GCS JSON API on 127.0.0.1 for TensorStore's gcs driver, one per test process."""

  def __init__(self):
    handler = type("Handler", (_Handler,), {"bucket_store": _Bucket()})
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def _storage_stub() -> types.ModuleType:
  """google.cloud.storage as orbax uses it here: Client().get_bucket(name), an ordinary bucket."""
  storage = types.ModuleType("google.cloud.storage")

  class Client:
    def get_bucket(self, name):
      return types.SimpleNamespace(name=name, hierarchical_namespace_enabled=False)

  storage.Client = Client
  return storage


_SERVER = {"server": None}
_REQUESTS: list[tuple[str, str]] = []  # (method, path) of every request since `serve`


def requests(method: str) -> list[str]:
  """The paths of the requests TensorStore sent with `method` since `serve`."""
  return [path for m, path in _REQUESTS if m == method]


def serve(root: str, monkeypatch) -> None:
  """Points every gs:// client of this process at the fake bucket directory `root`."""
  if _SERVER["server"] is None:  # TensorStore reads its endpoint once per process: one server
    _SERVER["server"] = FakeGCSServer()
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = _SERVER["server"].url
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "offline-test-token"
  monkeypatch.setitem(_ROOT, "path", str(root))
  _REQUESTS.clear()
  for protocol in FakeGCSFileSystem.protocol:  # what fsspec.register_implementation sets, undone after
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, FakeGCSFileSystem)
  monkeypatch.setitem(sys.modules, "google.cloud.storage", _storage_stub())
  clear_caches()


def clear_caches() -> None:
  """Forgets the filesystem objects epath, fsspec and orbax cached (at set-up and tear-down)."""
  from etils.epath import backend
  from orbax.checkpoint._src.path import gcs_utils
  backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps one filesystem per protocol
  FakeGCSFileSystem.clear_instance_cache()
  gcs_utils.get_bucket.cache_clear()
