"""Storage: every user path (run dirs, checkpoints, token stores, data files, exports, results)
may be local, `gs://bucket/...` or `s3://bucket/...`; this module is the one place that touches it.

Files go through `etils.epath` (gcsfs / s3fs for buckets, as Orbax does) and arrays through
TensorStore kvstore specs. Object stores have no rename, no append and no locks, so writes here are
whole objects (atomic on a bucket, tmp + rename on disk), `move_tree` copies before it deletes, and
`exclusive` takes a lease object by conditional create. Errors name the path and the fix.

The package: this module (names, errors, files, TensorStore specs), `leases.py` (exclusive access
across hosts: flocks on disk, expiring lease objects in a bucket) and `staged.py` (directories
written locally and mirrored to a bucket, growing files as bounded part objects); everything is
used as `storage.<name>`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import IO, Any, Iterator


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
    elif os.environ.get("AWS_SHARED_CREDENTIALS_FILE"):
      # TensorStore's default chain reads only ~/.aws/credentials: name the file given (and a
      # config file, which its profile reader needs to exist: AWS_CONFIG_FILE, else the same).
      creds = os.environ["AWS_SHARED_CREDENTIALS_FILE"]
      spec["aws_credentials"] = {"type": "profile",
                                 "profile": os.environ.get("AWS_PROFILE") or "default",
                                 "credentials_file": creds,
                                 "config_file": os.environ.get("AWS_CONFIG_FILE") or creds}
  return spec


# The other parts of the package, after the names they import from here.
# pylint: disable=wrong-import-position,cyclic-import
from pretrainx.storage.leases import LEASE_HEARTBEAT_S, LEASE_TTL_S, exclusive  # noqa: E402,F401
from pretrainx.storage.staged import (MERGE_PARTS, PARTS_BESIDE, PARTS_DIR,  # noqa: E402,F401
                                      StagedDir, read_appended, remove_parts)
