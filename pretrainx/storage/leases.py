"""Exclusive access across hosts: an flock on disk, an expiring lease object in a bucket.

A bucket lease is created by conditional write, renewed by its holder's heartbeat (also a
conditional write), and taken over, with a warning naming the dead holder, once it has not been
renewed for its TTL. Used as `storage.exclusive`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from absl import logging

from pretrainx.storage import (StorageError, _fs, basename, bucket, check_bucket, errors, is_remote,
                               kvstore, parent, resolve, scheme)

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


