"""Named, versioned per-document scores kept beside a token store's arrays.

`STORE/score_sets/NAME/vN/` holds `values` (float32 [num_docs], NaN for unscored) and
`info.json` ({name, version, kind, params, num_docs, done, complete}). A store holds any number
of names and versions; writing a score never changes the store's own arrays or checksums. A
writer commits `done` every chunk, so an interrupted scoring with the same params continues its
own version; other params start a new version. 'source' names the score the task's
`score_field` gave at prepare time (the store's `scores` array).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorstore as ts

from pretrainx import storage
from pretrainx.data import side_arrays

SOURCE = "source"  # the store's own `scores` array (FileTask.score_field)
LENGTH = "length"  # each document's token count, from the store's offsets (no score set)
KIND = "score_sets"  # the folder beside the store's arrays
# Values per zarr chunk: a writer's commit rewrites only the chunks it touches (256 KiB each),
# not one object holding every document's value.
_CHUNK = 1 << 16


class ScoreSetError(ValueError):
  """A score that the store does not hold, or a name that cannot be one."""


def check_name(name: str) -> str:
  if name in (SOURCE, LENGTH) or not side_arrays.NAME.match(name or ""):
    raise ScoreSetError(f"score name {name!r}: use letters, digits, '_', '.', '-' (not "
                        f"{SOURCE!r} or {LENGTH!r}, which the store itself gives).")
  return name


def _root(store_path: str) -> str:
  return storage.join(store_path, KIND)


def version_path(store_path: str, name: str, version: int) -> str:
  return side_arrays.version_path(store_path, KIND, name, version)


def _info(store_path: str, name: str, version: int) -> dict | None:
  path = storage.join(version_path(store_path, name, version), "info.json")
  return storage.read_json(path) if storage.exists(path) else None


def _versions(store_path: str, name: str) -> list[int]:
  return side_arrays.versions(store_path, KIND, name)


def list_scores(store_path: str) -> dict[str, list[int]]:
  """{name: [complete versions, oldest first]} of the score sets written into the store."""
  root = _root(store_path)
  if not storage.isdir(root):
    return {}
  out = {}
  for name in sorted(s.rstrip("/") for s in storage.listdir(root)):
    done = [v for v in _versions(store_path, name)
            if (_info(store_path, name, v) or {}).get("complete")]
    if done:
      out[name] = done
  return out


def read_scores(store_path: str, name: str, version: int | None = None,
                num_docs: int | None = None) -> tuple[np.ndarray, dict]:
  """(float32 [num_docs], info) of a complete score set; the newest version when None."""
  held = list_scores(store_path)
  if name not in held:
    raise ScoreSetError(
        f"the token store {store_path} holds no score {name!r} (it holds "
        f"{[SOURCE] + sorted(held)}); write it with `python -m pretrainx score TASK "
        f"--by=perplexity|reference_ratio|file --name={name}`.")
  version = held[name][-1] if version is None else int(version)
  if version not in held[name]:
    raise ScoreSetError(f"score {name!r} of {store_path} has versions {held[name]}, not "
                        f"{version}; pick one of them (or None for the newest).")
  info = _info(store_path, name, version)
  arr = ts.open({"driver": "zarr", "kvstore": storage.kvstore(
      storage.join(version_path(store_path, name, version), "values"))}, open=True).result()
  values = np.asarray(arr.read().result(), np.float32)
  if num_docs is not None and len(values) != num_docs:
    raise ScoreSetError(f"score {name!r} v{version} of {store_path} has {len(values)} values "
                        f"for {num_docs} documents; score the store again.")
  return values, info


class ScoreWriter:
  """Writes one version of a score, a chunk at a time, resumably.

  begin() picks the version: the newest incomplete one written with the same kind and params
  (an interrupted run) is continued from its `done`; otherwise a new version is made.
  """

  def __init__(self, store_path: str, name: str, kind: str, params: dict[str, Any],
               num_docs: int):
    self.store_path, self.name = store_path, check_name(name)
    self.kind, self.params, self.num_docs = kind, params, int(num_docs)
    versions = _versions(store_path, name)
    last = versions[-1] if versions else 0
    info = _info(store_path, name, last) if versions else None
    if (info is not None and not info.get("complete") and info.get("kind") == kind and
        info.get("params") == side_arrays.as_json(params) and
        info.get("num_docs") == self.num_docs):
      self.version, self.done = last, int(info["done"])
      self._arr = ts.open({"driver": "zarr", "kvstore": storage.kvstore(
          storage.join(self.path, "values"))}, open=True).result()
    else:
      self.version, self.done = last + 1, 0
      storage.makedirs(self.path)
      spec = {"driver": "zarr", "kvstore": storage.kvstore(storage.join(self.path, "values")),
              "metadata": {"shape": [self.num_docs], "chunks": [max(1, min(self.num_docs, _CHUNK))],
                           "dtype": "<f4", "fill_value": "NaN"}}
      self._arr = ts.open(spec, create=True).result()
      self._write_info(False)

  @property
  def path(self) -> str:
    return version_path(self.store_path, self.name, self.version)

  def _write_info(self, complete: bool) -> None:
    storage.write_json(storage.join(self.path, "info.json"), {
        "name": self.name, "version": self.version, "kind": self.kind,
        "params": side_arrays.as_json(self.params), "num_docs": self.num_docs, "done": self.done,
        "complete": complete})

  def write(self, start: int, values: np.ndarray) -> None:
    """Scores of documents [start, start + len(values)); commits `done` when contiguous."""
    values = np.asarray(values, np.float32)
    self._arr[start:start + len(values)].write(values).result()
    if start <= self.done:
      self.done = max(self.done, start + len(values))
      self._write_info(False)

  def finish(self) -> int:
    """Marks the version complete (every document written); returns the version."""
    if self.done < self.num_docs:
      raise ScoreSetError(f"score {self.name!r} v{self.version}: {self.done} of "
                          f"{self.num_docs} documents written; it cannot be finished.")
    self._write_info(True)
    return self.version

