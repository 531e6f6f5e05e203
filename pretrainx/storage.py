"""Storage: every user path (run dirs, checkpoints, token stores, data files, exports, results)
may be local, `gs://bucket/...` or `s3://bucket/...`; this module is the one place that touches it.

Files go through `etils.epath` (gcsfs / s3fs for buckets, as Orbax does) and arrays through
TensorStore kvstore specs. Object stores have no rename, no append and no locks, so writes here are
whole objects (atomic on a bucket, tmp + rename on disk), `move_tree` copies before it deletes, and
`exclusive` takes a lease object by conditional create. Errors name the path and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import IO, Any, Iterator

from absl import logging

# With TensorFlow installed (seqio brings it), etils would send gs:// through tf.io.gfile, which
# neither honours STORAGE_EMULATOR_HOST nor belongs on the core path: use fsspec (gcsfs, s3fs).
os.environ.setdefault("EPATH_USE_TF", "false")

REMOTE_SCHEMES = ("gs", "s3")
_HINT = {
    "gs": "check `gcloud auth application-default login` (or GOOGLE_APPLICATION_CREDENTIALS) and "
          "that the account may use the bucket; STORAGE_EMULATOR_HOST points at another endpoint",
    "s3": "check the AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID, ~/.aws) and the bucket "
          "policy; AWS_ENDPOINT_URL points at another endpoint",
}
_CREATE = {"gs": "gcloud storage buckets create gs://{bucket}", "s3": "aws s3 mb s3://{bucket}"}


class StorageError(ValueError):
  """A path that cannot be used: missing bucket, denied access, no matches, unsupported place."""


# -- names ------------------------------------------------------------------------------------


def scheme(path: Any) -> str:
  """'gs', 's3' or 'file'."""
  text = os.fspath(path)
  head, sep, _ = text.partition("://")
  if not sep:
    return "file"
  if head not in REMOTE_SCHEMES:
    raise StorageError(f"{text}: unsupported storage scheme {head}://; use a local path, gs:// "
                       "or s3://.")
  return head


def is_remote(path: Any) -> bool:
  return scheme(path) != "file"


def bucket(path: Any) -> str:
  return os.fspath(path).split("://", 1)[1].split("/", 1)[0]


def resolve(path: Any) -> str:
  """An absolute local path (~ expanded) or a normalised bucket URL, as text."""
  text = os.fspath(path)
  if not is_remote(text):
    return os.path.abspath(os.path.expanduser(text))
  head, rest = text.split("://", 1)
  parts = [p for p in rest.split("/") if p and p != "."]
  return f"{head}://" + "/".join(parts)


def join(base: Any, *names: str) -> str:
  base = os.fspath(base)
  if not is_remote(base):
    return os.path.join(base, *names)
  return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def basename(path: Any) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: Any) -> str:
  text = resolve(path)
  if not is_remote(text):
    return os.path.dirname(text)
  head = f"{scheme(text)}://{bucket(text)}"
  return text.rsplit("/", 1)[0] if len(text) > len(head) else text


def epath(path: Any):
  """The etils.epath.Path of `path` (what Orbax takes)."""
  from etils import epath as ep  # pylint: disable=import-outside-toplevel

  configure_endpoints()
  return ep.Path(resolve(path))


def configure_endpoints() -> None:
  """One variable per emulator is enough: STORAGE_EMULATOR_HOST also points TensorStore there,
  with a placeholder token (the emulator checks none) and without the storage-layout API that
  real GCS has and the emulator lacks."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL",
                          host if "://" in host else f"http://{host}")
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# -- errors -----------------------------------------------------------------------------------


def _explain(err: BaseException, path: str, action: str) -> StorageError | None:
  """A StorageError naming the path and the fix, for errors that are about the bucket."""
  kind = scheme(path)
  text = f"{type(err).__name__}: {err}"
  low = text.lower()
  b = bucket(path) if kind != "file" else ""
  if kind == "file":
    if isinstance(err, PermissionError):
      return StorageError(f"cannot {action} {path}: permission denied; check the directory's "
                          "owner and mode, or pick another path.")
    return None
  if ("nosuchbucket" in low or "bucket does not exist" in low or "bucket not found" in low
      or (isinstance(err, FileNotFoundError) and not _bucket_exists_quiet(path))):
    return StorageError(f"cannot {action} {path}: bucket {kind}://{b} does not exist; create it "
                        f"(`{_CREATE[kind].format(bucket=b)}`) or fix the path.")
  if (isinstance(err, PermissionError) or re.search(r"\b40[13]\b", low) or any(
      word in low for word in ("accessdenied", "access denied", "forbidden", "invalidaccesskeyid",
                               "signaturedoesnotmatch", "unauthorized"))):
    return StorageError(f"cannot {action} {path}: access to bucket {kind}://{b} is denied; "
                        f"{_HINT[kind]}.")
  return None


def _bucket_exists_quiet(path: str) -> bool:
  try:
    return bucket_exists(path)
  except Exception:  # pylint: disable=broad-except
    return True  # unknown: do not claim the bucket is missing


@contextlib.contextmanager
def errors(path: Any, action: str) -> Iterator[None]:
  """Turns storage errors about `path` into one StorageError line that says what to do."""
  try:
    yield
  except StorageError:
    raise
  except (OSError, RuntimeError, ValueError) as err:
    explained = _explain(err, os.fspath(path), action)
    if explained is None:
      raise
    raise explained from err


def _fs(path: str):
  """The fsspec filesystem of a bucket path."""
  import fsspec  # pylint: disable=import-outside-toplevel

  configure_endpoints()
  if scheme(path) == "gs":  # the instance etils.epath uses, so that one cache is dropped for both
    return fsspec.filesystem("gcs", finalize_on_close=True)
  return fsspec.filesystem("s3")


def bucket_exists(path: Any) -> bool:
  path = resolve(path)
  if not is_remote(path):
    return True
  fs = _fs(path)
  b = bucket(path)
  if scheme(path) == "s3":
    import botocore.exceptions  # pylint: disable=import-outside-toplevel

    try:
      fs.call_s3("head_bucket", Bucket=b)
      return True
    except FileNotFoundError:
      return False
    except botocore.exceptions.ClientError as err:
      if err.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
        return False
      raise
  try:
    fs.info(b)
    return True
  except FileNotFoundError:
    return False


def check_bucket(path: Any, action: str = "use") -> None:
  """Fails early, with the fix, when the bucket of `path` is missing or denied (no-op on disk)."""
  path = resolve(path)
  if not is_remote(path):
    return
  with errors(path, action):
    if not bucket_exists(path):
      kind, b = scheme(path), bucket(path)
      raise StorageError(f"cannot {action} {path}: bucket {kind}://{b} does not exist; create "
                         f"it (`{_CREATE[kind].format(bucket=b)}`) or fix the path.")


# -- files ------------------------------------------------------------------------------------


def _fresh(path: Any):
  """epath.Path of `path`, with fsspec's cached listings of it dropped: other processes and hosts
  write the same bucket, so what it holds is asked again, never remembered."""
  p = epath(path)
  if is_remote(path):
    _fs(os.fspath(path)).invalidate_cache()
  return p


def exists(path: Any) -> bool:
  with errors(path, "read"):
    return _fresh(path).exists()


def isdir(path: Any) -> bool:
  with errors(path, "read"):
    return _fresh(path).is_dir()


def isfile(path: Any) -> bool:
  with errors(path, "read"):
    return _fresh(path).is_file()


def listdir(path: Any) -> list[str]:
  """Names in a directory (a bucket prefix), sorted; [] if there is none."""
  with errors(path, "list"):
    p = _fresh(path)
    if not p.is_dir():
      return []
    return sorted({c.name for c in p.iterdir() if c.name})


def makedirs(path: Any) -> None:
  """Creates a local directory; buckets have none to create (a prefix exists with its objects)."""
  if not is_remote(path):
    with errors(path, "create"):
      os.makedirs(resolve(path), exist_ok=True)


def open_file(path: Any, mode: str = "r") -> IO:
  """A streaming file object (read or whole-object write; no append on a bucket)."""
  if "a" in mode and is_remote(path):
    raise StorageError(f"{path}: buckets cannot append; rewrite the whole object instead.")
  with errors(path, "read" if "r" in mode else "write"):
    if not is_remote(path):
      return open(resolve(path), mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    return epath(path).open(mode)


def read_bytes(path: Any) -> bytes:
  with errors(path, "read"):
    return epath(path).read_bytes()


def read_text(path: Any) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: Any, data: bytes) -> str:
  """Writes a whole file atomically: a reader sees the old content or the new, never a part."""
  path = resolve(path)
  with errors(path, "write"):
    if is_remote(path):
      epath(path).write_bytes(data)  # one object upload: atomic on GCS and S3
      return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  return path


def write_text(path: Any, text: str) -> str:
  return write_bytes(path, text.encode("utf-8"))


def read_json(path: Any) -> Any:
  return json.loads(read_text(path))


def write_json(path: Any, value: Any) -> str:
  return write_text(path, json.dumps(value, indent=1, sort_keys=True))


def remove(path: Any) -> None:
  """Deletes a file if it exists (in a bucket, with its parts if a StagedDir appended to it)."""
  _remove_object(path)
  if is_remote(path):
    remove_parts(path)


def _remove_object(path: Any) -> None:
  with errors(path, "delete"):
    p = epath(path)
    if p.exists() and not p.is_dir():
      p.unlink()


def rmtree(path: Any) -> None:
  """Deletes a directory (a bucket prefix) and everything under it, if it exists."""
  with errors(path, "delete"):
    if not is_remote(path):
      shutil.rmtree(resolve(path), ignore_errors=True)
      return
    p = epath(path)
    if p.exists():
      p.rmtree()


def move_tree(src: Any, dst: Any, delete_first: tuple[str, ...] = ()) -> str:
  """Moves a directory. On disk a rename; on a bucket (no rename) every object is copied first,
  then `delete_first` (e.g. a commit marker, so that a half-deleted source no longer looks
  complete) and then the rest of the source are deleted: a crash never loses the only copy."""
  src, dst = resolve(src), resolve(dst)
  with errors(src, "move"):
    if not is_remote(src):
      os.rename(src, dst)
      return dst
    fs = _fs(src)
    strip = lambda p: p.split("://", 1)[1]
    fs.copy(strip(src), strip(dst), recursive=True)
    for name in delete_first:
      remove(join(src, name))
    fs.rm(strip(src), recursive=True)
  return dst


def glob(pattern: Any) -> list[str]:
  """Sorted matches of a glob (`*`, `?`, `[..]`, `**` across directories) on disk or in a bucket."""
  pattern = os.fspath(pattern)
  if not is_remote(pattern):
    import glob as globlib  # pylint: disable=import-outside-toplevel

    return sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))
  with errors(pattern, "list"):
    check_bucket(pattern, "list")
    head = f"{scheme(pattern)}://"
    fs = _fs(pattern)
    fs.invalidate_cache()
    found = fs.glob(pattern.split("://", 1)[1])
    if "**" in pattern:  # fsspec's '**' needs at least one directory; match zero too
      found = list(found) + list(fs.glob(pattern.split("://", 1)[1].replace("**/", "")))
    return sorted({head + f for f in found if not fs.isdir(f)})


@contextlib.contextmanager
def local_copy(path: Any) -> Iterator[str]:
  """A local path holding `path`'s file: itself on disk, a temporary download from a bucket
  (for readers that need a real file, such as memory-mapped safetensors)."""
  path = resolve(path)
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="pretrainx-download-") as tmp:
    local = os.path.join(tmp, basename(path))
    with errors(path, "read"):
      _fs(path).get(path.split("://", 1)[1], local)
    yield local


# -- TensorStore ------------------------------------------------------------------------------


def kvstore(path: Any) -> dict[str, Any]:
  """The TensorStore kvstore spec of a directory: file, gcs or s3 (endpoint, region and, when
  they are there, the credentials from the standard AWS variables)."""
  path = resolve(path)
  kind = scheme(path)
  if kind == "file":
    return {"driver": "file", "path": path + "/"}
  configure_endpoints()
  rest = path.split("://", 1)[1]
  key = rest.split("/", 1)[1] + "/" if "/" in rest else ""
  spec: dict[str, Any] = {"driver": "gcs" if kind == "gs" else "s3", "bucket": bucket(path),
                          "path": key}
  if kind == "s3":
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
      spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
      spec["aws_region"] = region
    if (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
        and not os.environ.get("AWS_PROFILE")):
      # Keys in the environment: say so, or TensorStore's default chain also parses ~/.aws/config
      # and ~/.aws/credentials at every open, logging 5 lines each time they are missing.
      spec["aws_credentials"] = {"type": "environment"}
  return spec


# -- exclusive access -------------------------------------------------------------------------

LEASE_TTL_S = 600.0  # a bucket lease not renewed for this long is taken over
LEASE_HEARTBEAT_S = 60.0  # how often its holder renews it (at most a third of the TTL)


def _seconds(name: str, given: float | None, default: float) -> float:
  """`given`, else the environment variable `name`, else `default`: a positive number of s."""
  text = os.environ.get(name, "") if given is None else str(given)
  if not text:
    return default
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not (value > 0 and value != float("inf")):
    raise StorageError(f"{name}={text!r} is not a positive number of seconds; set it to e.g. "
                       f"{default:g}, or unset it.")
  return value


class _LeaseObject:
  """A lease object in a bucket, read with its version and written only while that version
  holds: a GCS generation precondition (TensorStore), S3 If-None-Match / If-Match (s3fs)."""

  def __init__(self, lock: str):
    self.kind = scheme(lock)
    if self.kind == "gs":
      import tensorstore as ts  # pylint: disable=import-outside-toplevel

      self._kv = ts.KvStore.open(kvstore(parent(lock))).result()
      self._key = basename(lock)
    else:
      self._fs = _fs(lock)
      self._bucket, self._key = bucket(lock), lock.split("://", 1)[1].split("/", 1)[1]

  def read(self) -> tuple[dict | None, Any]:
    """(holder, version); holder is None when there is no lease."""
    if self.kind == "gs":
      got = self._kv.read(self._key).result()
      return (json.loads(got.value) if got.state == "value" else None), got.stamp.generation
    from fsspec.asyn import sync  # pylint: disable=import-outside-toplevel

    async def get():
      try:
        got = await self._fs._call_s3("get_object", Bucket=self._bucket, Key=self._key)  # pylint: disable=protected-access
      except FileNotFoundError:
        return None, None
      async with got["Body"] as body:
        return json.loads(await body.read()), got["ETag"]
    return sync(self._fs.loop, get)

  def write(self, data: bytes | None, version: Any) -> Any:
    """Writes (None: deletes) if the object is still at `version`; its new version, or None if
    another process changed it first."""
    if self.kind == "gs":
      done = self._kv.write(self._key, data, if_equal=version).result()
      return done.generation or None
    if data is None:
      self._fs.call_s3("delete_object", Bucket=self._bucket, Key=self._key)
      return True
    cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
    try:
      return self._fs.call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=data,
                              **cond)["ETag"]
    except OSError as err:  # 412 PreconditionFailed, 409 ConditionalRequestConflict
      if isinstance(err, FileExistsError) or "condition" in str(err).lower():
        return None
      raise


class _Lease:
  """This process's claim on a bucket lease: taken by conditional write, renewed by a thread
  every `heartbeat` seconds (a conditional rewrite), and taken over by others once it has not
  been renewed for `ttl` seconds (its holder died)."""

  def __init__(self, lock: str, what: str, ttl: float, heartbeat: float):
    self.lock, self.what, self.ttl = lock, what, ttl
    self.heartbeat = min(heartbeat, ttl / 3)
    self.obj = _LeaseObject(lock)
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                  "since": _utc(time.time()), "heartbeat_s": self.heartbeat}
    self.version: Any = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _body(self) -> bytes:
    now = time.time()
    return json.dumps({**self.owner, "beat": now, "beat_utc": _utc(now)}).encode()

  def _claim(self, version: Any) -> bool:
    """Writes our lease over `version` (absent, or a dead holder's); reading it back also
    catches servers that ignore the condition (the GCS emulator)."""
    got = self.obj.write(self._body(), version)
    if got is None:
      return False
    time.sleep(0.05)
    holder, self.version = self.obj.read()
    return holder is not None and holder.get("token") == self.owner["token"]

  def acquire(self, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    seen: tuple[Any, float] | None = None  # a holder's version, and since when we see it
    while True:
      holder, version = self.obj.read()
      if holder is None:
        if self._claim(version):
          break
        continue
      if seen is None or seen[0] != version:
        seen = (version, time.monotonic())
      age = max(time.time() - float(holder.get("beat", time.time())), time.monotonic() - seen[1])
      if age > max(self.ttl, 2 * float(holder.get("heartbeat_s", 0))):
        logging.warning("taking over the lease %s: its holder (host %s, pid %s, since %s) has not "
                        "renewed it for %.0f s (TTL %g s), so it died or hangs", self.lock,
                        holder.get("host"), holder.get("pid"), holder.get("since"), age, self.ttl)
        if self._claim(version):
          break
        continue
      if time.monotonic() >= deadline:
        raise StorageError(
            f"another process (host {holder.get('host')}, pid {holder.get('pid')}, since "
            f"{holder.get('since')}) is {self.what}: it holds the lease {self.lock}. Wait for it "
            f"to finish; if that process died, run again {max(self.ttl - age, 0):.0f} s from now, "
            f"when its lease expires (TTL {self.ttl:g} s, PRETRAINX_LEASE_TTL_S).")
      time.sleep(min(1.0, self.ttl / 4))
    self._thread = threading.Thread(target=self._renew, name="pretrainx-lease", daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.heartbeat):
      try:
        holder, version = self.obj.read()
        mine = holder is not None and holder.get("token") == self.owner["token"]
        self.version = self.obj.write(self._body(), version) if mine else None
      except Exception as err:  # pylint: disable=broad-except
        logging.warning("could not renew the lease %s (%s); trying again in %g s", self.lock,
                        err, self.heartbeat)
        continue
      if self.version is None:
        logging.error("lost the lease %s to %s: another process took it over while this one was "
                      "%s; stop one of them", self.lock, holder, self.what)
        return

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    with contextlib.suppress(Exception):
      holder, version = self.obj.read()
      if holder is not None and holder.get("token") == self.owner["token"]:
        self.obj.write(None, version)


def _utc(seconds: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


@contextlib.contextmanager
def exclusive(lock: Any, what: str, wait_seconds: float = 0.0, ttl_s: float | None = None,
              heartbeat_s: float | None = None) -> Iterator[None]:
  """Holds `lock` (a file path) for the duration: one holder at a time, across hosts.

  On disk an flock (released when the process dies). On a bucket a lease object created by
  conditional write, renewed every `heartbeat_s` (PRETRAINX_LEASE_HEARTBEAT_S, default 60 s) and
  deleted on exit; a lease not renewed for `ttl_s` (PRETRAINX_LEASE_TTL_S, default 600 s) is
  taken over with a warning that names its dead holder. Waits up to wait_seconds for a live
  holder, then says who holds it."""
  lock = resolve(lock)
  if not is_remote(lock):
    with _flock(lock, what, wait_seconds):
      yield
    return
  ttl = _seconds("PRETRAINX_LEASE_TTL_S", ttl_s, LEASE_TTL_S)
  heartbeat = _seconds("PRETRAINX_LEASE_HEARTBEAT_S", heartbeat_s, LEASE_HEARTBEAT_S)
  with errors(lock, "lock"):
    check_bucket(lock, "lock")
    lease = _Lease(lock, what, ttl, heartbeat)
    lease.acquire(wait_seconds)
  try:
    yield
  finally:
    lease.release()


@contextlib.contextmanager
def _flock(lock: str, what: str, wait_seconds: float) -> Iterator[None]:
  import fcntl  # pylint: disable=import-outside-toplevel

  deadline = time.monotonic() + wait_seconds
  os.makedirs(os.path.dirname(lock), exist_ok=True)
  with open(lock, "a+b") as f:
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          raise StorageError(f"another process is {what} (it holds {lock}); wait for it to "
                             "finish, then run again.") from None
        time.sleep(0.2)
    yield  # released when the file closes


# -- files that grow: staged locally, appended to a bucket as part objects --------------------

PARTS_DIR = "{name}.parts/{part}"  # an appended file's parts in a folder beside it
PARTS_BESIDE = "{name}.{part}"  # ...or next to it (TensorBoard reads every *tfevents* file)
MERGE_PARTS = 64  # this many small parts are merged into one object
_PART = re.compile(r"(\d{4})-(\d{12})$")  # a part's id: the writer's epoch, then its byte offset


def _part_path(path: str, template: str, epoch: int, offset: int) -> str:
  return template.format(name=path, part=f"{epoch:04d}-{offset:012d}")


def _list_parts(path: str, template: str) -> dict[int, dict[int, str]]:
  """{epoch: {offset: object}} of an appended file's parts in a bucket."""
  prefix = template.format(name=path, part="")
  fs = _fs(path)
  head = f"{scheme(path)}://"
  try:
    names = fs.ls(parent(prefix + "x").split("://", 1)[1], detail=False, refresh=True)
  except FileNotFoundError:
    return {}
  found: dict[int, dict[int, str]] = {}
  for name in names:
    name = head + name.rstrip("/")
    match = _PART.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
    if match:
      found.setdefault(int(match[1]), {})[int(match[2])] = name
  return found


def read_appended(path: Any, template: str = PARTS_DIR) -> bytes:
  """The whole of a file that a StagedDir appends to: on disk the file; in a bucket its newest
  epoch's parts joined in order (merged parts cover the small ones they replace), or the plain
  object where there are no parts."""
  path = resolve(path)
  if not is_remote(path):
    return read_bytes(path)
  with errors(path, "read"):
    for _ in range(10):  # a writer that merges parts meanwhile deletes some: list again
      parts = _list_parts(path, template)
      if not parts:
        return read_bytes(path)
      ordered = sorted(parts[max(parts)].items())
      try:
        blobs = _fs(path).cat([p.split("://", 1)[1] for _, p in ordered], on_error="raise")
      except FileNotFoundError:
        continue
      out, end = bytearray(), 0
      for offset, part in ordered:
        data = blobs[part.split("://", 1)[1]]
        if offset > end:
          break  # a gap: a part went away while we read
        out += data[end - offset:] if offset + len(data) > end else b""
        end = max(end, offset + len(data))
      else:
        return bytes(out)
    raise StorageError(f"cannot read {path}: its parts keep changing; stop the process writing "
                       "it, or read it again.")


def remove_parts(path: Any, template: str = PARTS_DIR, below_epoch: int | None = None) -> None:
  """Deletes an appended file's parts in a bucket (those of epochs below `below_epoch`)."""
  path = resolve(path)
  if not is_remote(path):
    return
  with errors(path, "delete"):
    doomed = [p.split("://", 1)[1] for e, ps in _list_parts(path, template).items()
              if below_epoch is None or e < below_epoch for p in ps.values()]
    if doomed:
      _fs(path).rm(doomed)


class StagedDir:
  """A local directory mirrored to a bucket directory: writers write locally (buckets cannot
  append) and `sync()`, at every log point, uploads what changed. On disk it is the directory
  itself and `sync()` does nothing.

  A file matching a pattern of `appended` ({glob of its relative path: PARTS_DIR or
  PARTS_BESIDE}) only grows: each sync uploads just its new bytes as a part object named by
  (epoch, byte offset), and every MERGE_PARTS small parts become one, so the bytes per sync stay
  O(interval) and the objects few; `read_appended` joins them. Other files are uploaded whole
  when they change. `pull` names files to download first (to go on appending after a resume);
  `replaced(name)` says a pulled file was rewritten, not appended to: it is uploaded whole as a
  new epoch, and the parts of older epochs deleted."""

  def __init__(self, target: Any, pull: tuple[str, ...] = (), appended: dict[str, str] = None):
    self.target = resolve(target)
    self.remote = is_remote(self.target)
    self.appended = dict(appended or {})
    self._sent: dict[str, tuple[int, int]] = {}
    self._parts: dict[str, dict[str, Any]] = {}  # appended file -> its upload state
    if not self.remote:
      os.makedirs(self.target, exist_ok=True)
      self.local = self.target
      return
    self.local = tempfile.mkdtemp(prefix="pretrainx-staged-")
    for name in pull:
      self._pull(name)

  def _template(self, rel: str) -> str | None:
    import fnmatch  # pylint: disable=import-outside-toplevel

    return next((t for pattern, t in self.appended.items()
                 if fnmatch.fnmatchcase(rel, pattern)), None)

  def _pull(self, name: str) -> None:
    remote, local = join(self.target, name), os.path.join(self.local, name)
    template = self._template(name)
    parts = _list_parts(remote, template) if template else {}
    if not parts and not exists(remote):
      return
    data = read_appended(remote, template) if template else read_bytes(remote)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(local, "wb") as f:
      f.write(data)
    self._sent[name] = self._stamp(local)
    if template:  # go on appending in the newest epoch; a plain object becomes parts
      self._parts[name] = {"epoch": max(parts, default=0), "sent": len(data),
                           "merged": len(data), "small": [], "rebase": not parts}

  def replaced(self, name: str) -> None:
    if self.remote and name in self._parts:
      self._parts[name]["rebase"] = True

  @staticmethod
  def _stamp(local: str) -> tuple[int, int]:
    st = os.stat(local)
    return st.st_size, st.st_mtime_ns

  def path(self, *names: str) -> str:
    return os.path.join(self.local, *names)

  def sync(self) -> None:
    if not self.remote:
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        local = os.path.join(root, name)
        rel = "/".join(os.path.relpath(local, self.local).split(os.sep))
        template = self._template(rel)
        if template:
          self._append(rel, local, template)
          continue
        stamp = self._stamp(local)
        if self._sent.get(rel) != stamp:
          with open(local, "rb") as f:
            write_bytes(join(self.target, rel), f.read())
          self._sent[rel] = stamp

  def _append(self, rel: str, local: str, template: str) -> None:
    """Uploads the new bytes of an appended file as a part (see the class)."""
    st = self._parts.setdefault(rel, {"epoch": 0, "sent": 0, "merged": 0, "small": [],
                                      "rebase": False})
    remote = join(self.target, rel)
    size = os.path.getsize(local)
    if st["rebase"] or size < st["sent"]:  # rewritten: a new epoch, whole
      st.update(epoch=st["epoch"] + 1, sent=0, merged=0, small=[], rebase=False)
      self._upload(local, _part_path(remote, template, st["epoch"], 0), 0, size)
      remove_parts(remote, template, below_epoch=st["epoch"])
      _remove_object(remote)  # a plain object from before parts
      st.update(sent=size, merged=size)
      return
    if size == st["sent"]:
      return
    self._upload(local, _part_path(remote, template, st["epoch"], st["sent"]), st["sent"], size)
    st["small"].append(st["sent"])
    st["sent"] = size
    if len(st["small"]) >= MERGE_PARTS:  # one object over the first small part, then the rest go
      self._upload(local, _part_path(remote, template, st["epoch"], st["merged"]), st["merged"],
                   size)
      with errors(remote, "delete"):
        _fs(remote).rm([_part_path(remote, template, st["epoch"], o).split("://", 1)[1]
                        for o in st["small"][1:]])
      st.update(merged=size, small=[])

  @staticmethod
  def _upload(local: str, remote: str, start: int, end: int) -> None:
    with open(local, "rb") as f:
      f.seek(start)
      write_bytes(remote, f.read(end - start))

  def close(self) -> None:
    self.sync()
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)
