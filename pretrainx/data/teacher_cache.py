"""A teacher's top-k next-token distribution per token of a token store, cached beside it.

`STORE/teacher_caches/NAME/vN/` holds `info.json` and, per part p, `part_{p}/` with `ids` (int32
[n, k], the teacher's k most likely next tokens, most likely first), `logprobs` (float32 [n, k],
their log-probs at temperature 1), `target_logprob` (float32 [n], the log-prob of the token that
follows) and `progress.json` ({done_rows, rows, complete}). Entry t is the store's token t as an
input: the teacher saw its document's piece as `pack_layout` cuts it at the cache's seq_len
(tokens doc_start + ((t - doc_start) // seq_len) * seq_len .. t). A document's last token (its eos)
is never an input: its entry is FILLER (ids 0, log-probs [0, -inf, ...], a one-hot distribution,
target_logprob 0).

A version is split into parts, each a contiguous range of documents (and so of tokens) with its
own arrays, so that Ray workers never write the same chunk; each part commits its progress after
every batch. info.json (written by the driver) lists the parts, the params and the identity of
the store (its vocabulary, counts and checksums); a cache is read only against the store it was
written for. No JAX here: the writer of the entries is pretrainx/train/distill_cache.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorstore as ts

from pretrainx import storage
from pretrainx.data import side_arrays

KIND = "teacher_caches"  # the folder beside the store's arrays
CHUNK_TOKENS = 1 << 14  # tokens per zarr chunk (2 MiB of ids at k = 32)
IN_MEMORY_BYTES = 256 << 20  # parts at most this big are read whole, once
CACHE_BYTES = 64 << 20  # TensorStore chunk cache per opened array of a bigger part
FIELDS = {"ids": "<i4", "logprobs": "<f4", "target_logprob": "<f4"}
HOW = "`pretrainx distill cache --teacher=SRC --task=DOMAIN --name=NAME`"


class TeacherCacheError(ValueError):
  """A teacher cache that is missing, half-written, or written for another store."""


def check_name(name: str) -> str:
  if not side_arrays.NAME.match(name or ""):
    raise TeacherCacheError(f"teacher cache name {name!r}: use letters, digits, '_', '.', '-'.")
  return name


def store_identity(store) -> dict[str, Any]:
  """What changes when the store is prepared again from other text or another vocabulary."""
  m = store.manifest
  sums = m.get("checksums") or {}
  return side_arrays.as_json({"vocabulary": m.get("vocabulary"),
                              "num_docs": int(store.num_docs),
                              "num_tokens": int(store.num_tokens),
                              "checksums": {k: sums.get(k) for k in ("tokens", "doc_offsets")}})


def filler(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The entries of n positions that are no input: one-hot on id 0, target log-prob 0."""
  logprobs = np.full((n, k), -np.inf, np.float32)
  logprobs[:, 0] = 0.0
  return np.zeros((n, k), np.int32), logprobs, np.zeros(n, np.float32)


def split_parts(doc_offsets: np.ndarray, parts: int) -> list[dict[str, list[int]]]:
  """Up to `parts` contiguous document ranges of about equal token counts (none empty)."""
  offsets = np.asarray(doc_offsets, np.int64)
  num_docs = len(offsets) - 1
  parts = max(1, min(int(parts), num_docs))
  targets = np.linspace(0, offsets[-1], parts + 1)[1:-1]
  cuts = np.unique(np.concatenate([[0], np.searchsorted(offsets, targets), [num_docs]]))
  cuts = cuts[(cuts >= 0) & (cuts <= num_docs)]
  return [{"docs": [int(lo), int(hi)], "tokens": [int(offsets[lo]), int(offsets[hi])]}
          for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]


def version_path(store_path: str, name: str, version: int) -> str:
  return side_arrays.version_path(store_path, KIND, name, version)


def part_path(path: str, index: int) -> str:
  return storage.join(path, f"part_{int(index)}")


def _versions(store_path: str, name: str) -> list[int]:
  return side_arrays.versions(store_path, KIND, name)


def _info(path: str) -> dict | None:
  where = storage.join(path, "info.json")
  return storage.read_json(where) if storage.exists(where) else None


def _array(path: str, field: str, shape: tuple[int, ...] | None = None, cache: bool = False):
  spec: dict[str, Any] = {"driver": "zarr", "kvstore": storage.kvstore(storage.join(path, field))}
  if shape is None:
    if cache:  # a complete cache never changes: chunks read are kept for the next reads
      spec["context"] = {"cache_pool": {"total_bytes_limit": CACHE_BYTES}}
      spec["recheck_cached_data"] = "open"
    return ts.open(spec, open=True).result()
  spec["metadata"] = {"shape": list(shape), "chunks": [max(1, min(shape[0], CHUNK_TOKENS)),
                                                       *shape[1:]],
                      "dtype": FIELDS[field], "fill_value": 0}
  storage.rmtree(storage.join(path, field))  # (not delete_existing: see store.open_array)
  return ts.open(spec, create=True).result()


def read_progress(path: str, index: int) -> dict:
  return storage.read_json(storage.join(part_path(path, index), "progress.json"))


class PartWriter:
  """Writes one part's arrays (opened in whichever process computes the part)."""

  def __init__(self, path: str, index: int):
    self.path = part_path(path, index)
    self.progress = read_progress(path, index)
    self.arrays = {f: _array(self.path, f) for f in FIELDS}

  @property
  def done_rows(self) -> int:
    return int(self.progress["done_rows"])

  def write(self, start: int, ids: np.ndarray, logprobs: np.ndarray, target_logprob: np.ndarray,
            done_rows: int) -> None:
    """Entries of the part's tokens [start, start + n) (counted from the part's first token);
    then commits that `done_rows` packed rows are written."""
    n = len(target_logprob)
    futures = [self.arrays[f][start:start + n].write(np.asarray(v, FIELDS[f]))
               for f, v in (("ids", ids), ("logprobs", logprobs),
                            ("target_logprob", target_logprob))]
    for f in futures:
      f.result()
    self._commit(done_rows, False)

  def finish(self) -> None:
    self._commit(int(self.progress["rows"]), True)

  def _commit(self, done_rows: int, complete: bool) -> None:
    self.progress = {**self.progress, "done_rows": int(done_rows), "complete": complete}
    storage.write_json(storage.join(self.path, "progress.json"), self.progress)


class CacheWriter:
  """Picks and sets up the version a `distill cache` run writes.

  The newest version, when incomplete and written with the same params for the same store, is
  continued (its complete parts are kept, the others resume from their committed rows); otherwise
  a new version is made with every part's arrays created empty. `rows[p]` is part p's count of
  packed rows (what its progress counts).
  """

  def __init__(self, store, name: str, params: dict[str, Any], *, k: int, seq_len: int,
               parts: int, rows_of: Any):
    self.store_path, self.name = store.path, check_name(name)
    self.params, identity = side_arrays.as_json(params), store_identity(store)
    versions = _versions(store.path, name)
    last = versions[-1] if versions else 0
    info = _info(version_path(store.path, name, last)) if versions else None
    if (info is not None and not info.get("complete") and info.get("params") == self.params and
        info.get("store") == identity):
      self.version, self.info = last, info
      return
    self.version = last + 1
    split = split_parts(store.doc_offsets, parts)
    storage.makedirs(self.path)
    for p, part in enumerate(split):
      n = part["tokens"][1] - part["tokens"][0]
      for field in FIELDS:
        _array(part_path(self.path, p), field, (n, k) if field != "target_logprob" else (n,))
      part.update(rows=int(rows_of(*part["docs"])), done_rows=0, complete=False)
      storage.write_json(storage.join(part_path(self.path, p), "progress.json"),
                         {"rows": part["rows"], "done_rows": 0, "complete": False})
    self.info = {"name": name, "version": self.version, "teacher": params.get("teacher"),
                 "teacher_step": params.get("teacher_step"), "k": int(k),
                 "seq_len": int(seq_len), "num_docs": int(store.num_docs),
                 "num_tokens": int(store.num_tokens), "store": identity, "params": self.params,
                 "parts": split, "complete": False}
    self._write_info()

  @property
  def path(self) -> str:
    return version_path(self.store_path, self.name, self.version)

  def unfinished(self) -> list[int]:
    """The parts still to compute (their committed progress, as the parts wrote it)."""
    self.refresh()
    return [p for p, part in enumerate(self.info["parts"]) if not part["complete"]]

  def refresh(self) -> None:
    """info.json's parts from each part's own progress."""
    for p, part in enumerate(self.info["parts"]):
      prog = read_progress(self.path, p)
      part.update(done_rows=int(prog["done_rows"]), complete=bool(prog["complete"]))
    self._write_info()

  def finish(self) -> int:
    self.refresh()
    left = [p for p, part in enumerate(self.info["parts"]) if not part["complete"]]
    if left:
      raise TeacherCacheError(f"teacher cache {self.name!r} v{self.version}: parts {left} are "
                              f"unfinished; rerun {HOW} with the same flags to finish them.")
    self.info["complete"] = True
    self._write_info()
    return self.version

  def _write_info(self) -> None:
    storage.write_json(storage.join(self.path, "info.json"), self.info)


class TeacherCache:
  """Reads a complete teacher cache: entries of any token range of its store."""

  def __init__(self, path: str, info: dict):
    self.path, self.info = path, info
    self.k, self.seq_len = int(info["k"]), int(info["seq_len"])
    self.version, self.num_tokens = int(info["version"]), int(info["num_tokens"])
    self._starts = np.asarray([p["tokens"][0] for p in info["parts"]] + [self.num_tokens])
    self._arrays: dict[int, dict[str, Any]] = {}
    self._whole: dict[int, dict[str, np.ndarray]] = {}

  def _part(self, p: int, lo: int, hi: int) -> list[np.ndarray]:
    """Part p's entries [lo, hi), counted from its first token."""
    n = int(self._starts[p + 1] - self._starts[p])
    if n * (self.k * 8 + 4) <= IN_MEMORY_BYTES:
      if p not in self._whole:
        arrays = {f: _array(part_path(self.path, p), f) for f in FIELDS}
        self._whole[p] = {f: np.asarray(a.read().result()) for f, a in arrays.items()}
      return [self._whole[p][f][lo:hi] for f in FIELDS]
    if p not in self._arrays:
      self._arrays[p] = {f: _array(part_path(self.path, p), f, cache=True) for f in FIELDS}
    futures = [self._arrays[p][f][lo:hi].read() for f in FIELDS]
    return [np.asarray(f.result()) for f in futures]

  def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32 [n, k], logprobs float32 [n, k], target_logprob float32 [n]) of the store's
    tokens [start, stop), n = stop - start."""
    if not 0 <= start <= stop <= self.num_tokens:
      raise TeacherCacheError(f"tokens [{start}, {stop}) are outside the cache's "
                              f"{self.num_tokens} tokens; read within the store.")
    out: list[list[np.ndarray]] = [[], [], []]
    p = int(np.searchsorted(self._starts, start, side="right")) - 1
    at = start
    while at < stop:
      hi = min(stop, int(self._starts[p + 1]))
      for got, part in zip(out, self._part(p, at - int(self._starts[p]),
                                           hi - int(self._starts[p]))):
        got.append(part)
      at, p = hi, p + 1
    if not out[0]:
      return (np.zeros((0, self.k), np.int32), np.zeros((0, self.k), np.float32),
              np.zeros(0, np.float32))
    return tuple(np.concatenate(x) if len(x) > 1 else x[0] for x in out)  # type: ignore


def open_teacher_cache(store, name: str = "teacher", version: int | None = None) -> TeacherCache:
  """The complete teacher cache `name` of `store` (a TokenStore): its newest complete version
  when None. Refuses a missing or unfinished one, and one written for another store."""
  versions = _versions(store.path, check_name(name))
  if not versions:
    raise TeacherCacheError(f"the token store {store.path} holds no teacher cache {name!r}; "
                            f"write it with {HOW.replace('NAME', name)}.")
  infos = {v: _info(version_path(store.path, name, v)) or {} for v in versions}
  complete = [v for v in versions if infos[v].get("complete")]
  if version is None and not complete:
    raise TeacherCacheError(f"teacher cache {name!r} of {store.path} is incomplete (v"
                            f"{versions[-1]}); rerun {HOW.replace('NAME', name)} with the same "
                            "flags to finish it.")
  version = complete[-1] if version is None else int(version)
  if version not in versions:
    raise TeacherCacheError(f"teacher cache {name!r} of {store.path} has versions {versions}, "
                            f"not {version}; pick one of them (or None for the newest).")
  if version not in complete:
    raise TeacherCacheError(f"teacher cache {name!r} v{version} of {store.path} is incomplete; "
                            f"rerun {HOW.replace('NAME', name)} with the same flags to finish it.")
  info = infos[version]
  if info.get("store") != store_identity(store):
    raise TeacherCacheError(f"teacher cache {name!r} v{version} in {store.path} is a cache for "
                            "another store (the store was prepared again since); write it again "
                            f"with {HOW.replace('NAME', name)}.")
  return TeacherCache(version_path(store.path, name, version), info)
