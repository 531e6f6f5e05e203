"""Files that grow, staged locally and appended to a bucket as part objects.

`StagedDir` mirrors a local directory to a bucket directory at every log point; a file that only
grows (metrics.jsonl, TensorBoard events) is uploaded as bounded part objects that
`read_appended` joins, so each upload stays O(interval). Used as `storage.StagedDir`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any

from pretrainx.storage import (StorageError, _fs, _remove_object, errors, exists, is_remote,
                               join, parent, read_bytes, resolve, scheme, write_bytes)

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
