"""Token stores: a task's split tokenized once into TensorStore arrays, with a manifest.

A store directory holds `tokens` (int32, every document followed by eos), `doc_offsets` (int64
[docs + 1]), `scores` (float32, NaN when absent), `meta_bytes`/`meta_offsets` (UTF-8 metadata) and
`manifest.json` (vocabulary, counts, checksums, and `complete: true` written last). Writing commits
progress every few thousand documents, so an interrupted prepare continues where it stopped and
never leaves a store that looks complete but is not. Stores may live on disk, gs:// or s3://
(TensorStore kvstores); one writer at a time holds the store's lock (a lease object in a bucket).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np
import tensorstore as ts

from pretrainx import storage
from pretrainx.data import corpus, score_sets, side_arrays
from pretrainx.data.tasks import SourceDocument

FORMAT_VERSION = 1
ARRAYS = {"tokens": "<i4", "doc_offsets": "<i8", "scores": "<f4", "meta_bytes": "|u1",
          "meta_offsets": "<i8"}
IN_MEMORY_BYTES = 256 << 20
CHUNK = 1 << 20  # elements per stored chunk
CACHE_BYTES = 64 << 20  # TensorStore chunk cache per opened array (a store too big for memory)
CORPUS_WAIT_SECONDS = 900.0  # how long a process waits for another to build a corpus store


class StoreError(ValueError):
  """A token store that is missing, half-written, corrupt or made for another vocabulary."""


def vocabulary_identity(vocab) -> dict[str, Any]:
  return {"name": vocab.name, "vocab_size": int(vocab.vocab_size)}


def open_array(path: str, name: str, create: bool = False):
  spec: dict[str, Any] = {"driver": "zarr", "kvstore": storage.kvstore(storage.join(path, name))}
  if create:  # (not delete_existing: a ranged delete that some bucket emulators widen)
    storage.rmtree(storage.join(path, name))
    spec["metadata"] = {"shape": [0], "chunks": [CHUNK], "dtype": ARRAYS[name]}
    return ts.open(spec, create=True).result()
  # Stores are immutable once complete: chunks read are kept for the next reads.
  spec["context"] = {"cache_pool": {"total_bytes_limit": CACHE_BYTES}}
  spec["recheck_cached_data"] = "open"
  return ts.open(spec, open=True).result()


def read_range(arr, start: int = 0, stop: int | None = None) -> np.ndarray:
  stop = arr.shape[0] if stop is None else stop
  return np.asarray(arr[start:stop].read().result())


class Appender:
  """Appends to the store's arrays; `commit` records how far they are valid."""

  def __init__(self, path: str, progress: dict | None):
    self.path = path
    if progress is None:
      self.arrays = {n: open_array(path, n, create=True) for n in ARRAYS}
      self.sizes = {n: 0 for n in ARRAYS}
      self.docs = 0
      self._append({"doc_offsets": np.zeros(1, np.int64), "meta_offsets": np.zeros(1, np.int64)})
    else:  # resume: cut every array back to its last committed size
      self.sizes, self.docs = dict(progress["sizes"]), int(progress["docs"])
      self.arrays = {n: open_array(path, n).resize(exclusive_max=[self.sizes[n]]).result()
                     for n in ARRAYS}

  def _append(self, parts: dict[str, np.ndarray]) -> None:
    for name, values in parts.items():
      start, arr = self.sizes[name], self.arrays[name]
      arr = arr.resize(exclusive_max=[start + len(values)]).result()
      arr[start:start + len(values)].write(values.astype(ARRAYS[name])).result()
      self.arrays[name], self.sizes[name] = arr, start + len(values)

  def add(self, docs: list[SourceDocument], vocab) -> None:
    tokens = [np.append(np.asarray(vocab.encode(d.text), np.int32), np.int32(vocab.eos_id))
              for d in docs]
    meta = [(d.metadata or "").encode("utf-8") for d in docs]
    self._append({
        "tokens": np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        "doc_offsets": self.sizes["tokens"] + np.cumsum([len(t) for t in tokens]),
        "scores": np.asarray([np.nan if d.score is None else d.score for d in docs], np.float32),
        "meta_bytes": np.frombuffer(b"".join(meta), np.uint8),
        "meta_offsets": self.sizes["meta_bytes"] + np.cumsum([len(m) for m in meta]),
    })
    self.docs += len(docs)

  def commit(self) -> None:
    storage.write_json(storage.join(self.path, "progress.json"),
                       {"docs": self.docs, "sizes": self.sizes})


def append_documents(path: str, progress: dict | None, documents: Iterable[SourceDocument],
                     vocabulary, flush_every_docs: int = 1000) -> Appender:
  """Tokenizes documents onto the arrays at `path`, committing every flush_every_docs; with the
  `progress` of an interrupted run, the documents it committed are skipped (same order)."""
  out = Appender(path, progress)
  if progress is None:
    out.commit()
  buffer: list[SourceDocument] = []
  for i, doc in enumerate(documents):
    if i < out.docs:
      continue  # committed by an earlier, interrupted run
    buffer.append(doc)
    if len(buffer) >= flush_every_docs:
      out.add(buffer, vocabulary)
      out.commit()
      buffer = []
  out.add(buffer, vocabulary)
  out.commit()
  return out


def checksums(path: str) -> dict[str, str]:
  """sha256 of each array's bytes, read a chunk at a time (a store bigger than memory)."""
  out = {}
  try:
    for name in ARRAYS:
      arr, digest = open_array(path, name), hashlib.sha256()
      for start in range(0, arr.shape[0], CHUNK):
        digest.update(read_range(arr, start, min(start + CHUNK, arr.shape[0])).tobytes())
      out[name] = digest.hexdigest()
  except (ValueError, OSError) as err:  # tensorstore: a missing or undecodable file
    raise StoreError(f"store {path} is corrupt ({err}); delete it and prepare it again.") from err
  return out


def lock_path(path: str) -> str:
  """The lock a store's writer holds: beside the store, named after its split."""
  return storage.join(storage.parent(path), f".{storage.basename(path)}.lock")


def write_store(path: str, documents: Iterable[SourceDocument], vocabulary, *,
                name: str = "", split: str = "", fingerprint: dict | None = None,
                flush_every_docs: int = 1000, overwrite: bool = False) -> dict:
  """Tokenizes `documents` into a store at `path`; returns its manifest.

  A complete store of the same vocabulary and fingerprint is left as it is; an interrupted one
  is continued (the documents must come in the same order); another vocabulary or fingerprint is
  refused unless `overwrite`. A second writer of the same store is refused while the first holds
  its lock.
  """
  path = storage.resolve(path)
  storage.check_bucket(path, "write the token store")
  with storage.exclusive(lock_path(path), f"writing the token store {path}"):
    return _write_store_locked(path, documents, vocabulary, name, split, fingerprint,
                               flush_every_docs, overwrite)


def _write_store_locked(path: str, documents: Iterable[SourceDocument], vocabulary, name: str,
                        split: str, fingerprint: dict | None, flush_every_docs: int,
                        overwrite: bool) -> dict:
  """write_store's work, by the holder of the store's lock."""
  identity = side_arrays.as_json({"vocabulary": vocabulary_identity(vocabulary),
                                  "fingerprint": fingerprint or {}})
  manifest_path = storage.join(path, "manifest.json")
  progress_path = storage.join(path, "progress.json")
  if overwrite:
    storage.rmtree(path)
  if storage.exists(manifest_path):
    manifest = storage.read_json(manifest_path)
    if {k: manifest.get(k) for k in identity} == identity and manifest.get("complete"):
      return manifest
    raise StoreError(f"{path} holds a store of {manifest.get('vocabulary')} / "
                     f"{manifest.get('fingerprint')}, not {identity['vocabulary']} / "
                     f"{identity['fingerprint']}; delete it or prepare with --overwrite.")
  storage.makedirs(path)
  started = storage.join(path, "identity.json")
  progress = None
  if storage.exists(progress_path) and storage.exists(started):
    if storage.read_json(started) != identity:
      raise StoreError(f"{path} holds a half-written store of another vocabulary or source; "
                       "delete it or prepare with --overwrite.")
    progress = storage.read_json(progress_path)
  storage.write_json(started, identity)
  out = append_documents(path, progress, documents, vocabulary, flush_every_docs)
  if out.docs == 0:
    raise StoreError(f"no documents for {name or path} ({split}); check the task's files and "
                     "its validation settings.")
  manifest = {"format_version": FORMAT_VERSION, "task": name, "split": split, **identity,
              "num_docs": out.docs, "num_tokens": out.sizes["tokens"],
              "checksums": checksums(path), "complete": True}
  storage.write_json(manifest_path, manifest)  # last: only now does the store count as complete
  return manifest


class TokenStore:
  """Random access to a complete store's documents."""

  def __init__(self, path: str, manifest: dict):
    self.path, self.manifest = path, manifest
    self._score_cache: dict[tuple, np.ndarray] = {}
    self.num_docs, self.num_tokens = int(manifest["num_docs"]), int(manifest["num_tokens"])
    try:
      arrays = {n: open_array(path, n) for n in ARRAYS}
      sizes = {n: a.shape[0] for n, a in arrays.items()}
      expected = {"tokens": self.num_tokens, "doc_offsets": self.num_docs + 1,
                  "scores": self.num_docs, "meta_offsets": self.num_docs + 1}
      if any(sizes[n] != v for n, v in expected.items()):
        raise StoreError(f"store {path} is corrupt: array sizes {sizes} do not match its "
                         f"manifest {expected}; delete it and prepare it again.")
      self.doc_offsets = read_range(arrays["doc_offsets"])
      self.scores = read_range(arrays["scores"])
      self._meta_offsets = read_range(arrays["meta_offsets"])
      self._meta_bytes = read_range(arrays["meta_bytes"])
      self._tokens_array = arrays["tokens"]
      self._tokens = read_range(arrays["tokens"]) if self.num_tokens * 4 <= IN_MEMORY_BYTES else None
    except StoreError:
      raise
    except (ValueError, OSError) as err:  # tensorstore: a missing or undecodable file
      raise StoreError(f"store {path} is corrupt ({err}); delete it and prepare it "
                       "again.") from err
    for name, offsets, total, min_length in (
        ("document", self.doc_offsets, self.num_tokens, 1),  # at least the eos
        ("metadata", self._meta_offsets, len(self._meta_bytes), 0)):
      if offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < min_length).any():
        raise StoreError(f"store {path} is corrupt: {name} offsets are inconsistent with "
                         f"{total} stored; delete it and prepare it again.")

  @property
  def doc_lengths(self) -> np.ndarray:
    return np.diff(self.doc_offsets)

  def tokens(self, start: int, stop: int) -> np.ndarray:
    if self._tokens is not None:
      return self._tokens[start:stop]
    return read_range(self._tokens_array, start, stop)

  def document(self, i: int) -> np.ndarray:
    return self.tokens(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))

  def metadata(self, i: int) -> str | None:
    raw = self._meta_bytes[self._meta_offsets[i]:self._meta_offsets[i + 1]].tobytes()
    return raw.decode("utf-8") or None

  def metadata_all(self) -> list[str | None]:
    return [self.metadata(i) for i in range(self.num_docs)]

  def score(self, name: str = score_sets.SOURCE, version: int | None = None) -> np.ndarray:
    """float32 [num_docs]: the prepared `scores` ('source'), the documents' token counts
    ('length', from the offsets: no token is read) or a score set written later by
    `pretrainx score` (the newest version when None); NaN where a document has none."""
    if name == score_sets.SOURCE:
      return self.scores
    if name == score_sets.LENGTH:
      return self.doc_lengths.astype(np.float32)
    key = (name, version)
    if key not in self._score_cache:
      self._score_cache[key] = score_sets.read_scores(self.path, name, version,
                                                      self.num_docs)[0]
    return self._score_cache[key]

  def score_names(self) -> dict[str, list[int]]:
    """{name: [complete versions]} of the score sets this store holds, 'source' included."""
    return {score_sets.SOURCE: [0], score_sets.LENGTH: [0], **score_sets.list_scores(self.path)}


def open_store(path: str, vocabulary=None, fingerprint: dict | None = None,
               verify: bool = False) -> TokenStore:
  """Opens a complete store, checking its vocabulary (and fingerprint, checksums if asked)."""
  path = storage.resolve(path)
  name = storage.basename(storage.parent(path)) or path
  manifest_path = storage.join(path, "manifest.json")
  storage.check_bucket(path, "read the token store")
  if not storage.exists(manifest_path) and not storage.isdir(path):
    raise StoreError(f"no token store at {path}; run `python -m pretrainx data prepare {name}` "
                     "(with the gin file that defines the task).")
  if not storage.exists(manifest_path):
    raise StoreError(f"token store {path} is half-written (its prepare was interrupted); rerun "
                     f"`python -m pretrainx data prepare {name}` to finish it.")
  try:
    manifest = storage.read_json(manifest_path)
  except json.JSONDecodeError as err:
    raise StoreError(f"the manifest of {path} is unreadable ({err}); delete the store and "
                     "prepare it again.") from err
  if not manifest.get("complete"):
    raise StoreError(f"token store {path} is half-written; rerun `python -m pretrainx data "
                     f"prepare {name}` to finish it.")
  if vocabulary is not None and manifest["vocabulary"] != vocabulary_identity(vocabulary):
    raise StoreError(f"token store {path} was made with vocabulary {manifest['vocabulary']} but "
                     f"the run uses {vocabulary_identity(vocabulary)}; prepare it again with "
                     "--overwrite (or point DataConfig.store_dir elsewhere).")
  if fingerprint is not None and manifest.get("fingerprint") != side_arrays.as_json(fingerprint):
    raise StoreError(f"token store {path} was made from {manifest.get('fingerprint')}, not "
                     f"{fingerprint}; prepare it again with --overwrite.")
  store = TokenStore(path, manifest)
  if verify and checksums(path) != manifest["checksums"]:
    raise StoreError(f"token store {path} is corrupt (checksum mismatch); delete it and "
                     "prepare it again.")
  return store


def ensure_corpus_store(root: str, domain: str, split: str, vocabulary,
                        validation_fraction: float = 0.05) -> TokenStore:
  """The embedded corpus domain's store, made on first use (safe when processes race).

  One builder at a time holds the store's lock (an flock on disk, a lease object in a bucket) and
  builds in place; the others wait for it, then open what it made. Readers see a complete store
  or none (the manifest is written last), and a store that matches is never rebuilt.
  """
  path = storage.join(storage.resolve(root), domain, split)
  fingerprint = {"corpus": domain, "validation_fraction": validation_fraction}
  try:
    return open_store(path, vocabulary, fingerprint)
  except StoreError:
    pass
  with storage.exclusive(lock_path(path), f"building the corpus store {path}",
                         wait_seconds=CORPUS_WAIT_SECONDS):
    try:
      return open_store(path, vocabulary, fingerprint)  # made by another process meanwhile
    except StoreError:
      pass
    _build_corpus_store(path, domain, split, vocabulary, validation_fraction, fingerprint)
  return open_store(path, vocabulary, fingerprint)


def _build_corpus_store(path: str, domain: str, split: str, vocabulary,
                        validation_fraction: float, fingerprint: dict) -> None:
  """Under the lock: an interrupted build of this store is continued; a store of another
  vocabulary or split, or a complete one that does not open (broken), is replaced."""
  identity = side_arrays.as_json({"vocabulary": vocabulary_identity(vocabulary),
                                  "fingerprint": fingerprint})
  started = storage.join(path, "identity.json")
  interrupted = (not storage.exists(storage.join(path, "manifest.json")) and
                 storage.exists(started) and storage.read_json(started) == identity)
  if not interrupted:
    storage.rmtree(path)
  docs = [SourceDocument(d.text, d.name)
          for d in corpus.load_documents(split, (domain,), validation_fraction)]
  _write_store_locked(path, docs, vocabulary, domain, split, fingerprint, 1000, False)


def inspect_text(store: TokenStore | str, num_docs: int = 3, vocabulary=None) -> str:
  """Counts and a few decoded documents, for `pretrainx data inspect`."""
  if not isinstance(store, TokenStore):
    store = open_store(store, vocabulary)
  m = store.manifest
  lengths = store.doc_lengths
  has_meta = sum(1 for x in store.metadata_all() if x)
  lines = [f"{store.path}: {store.num_docs:,} documents, {store.num_tokens:,} tokens "
           f"(mean {lengths.mean():,.0f}, max {lengths.max():,}), vocabulary {m['vocabulary']}",
           f"  with metadata: {has_meta:,}, with scores: {int(np.isfinite(store.scores).sum()):,}"]
  for i in range(min(num_docs, store.num_docs)):
    text = vocabulary.decode(store.document(i)) if vocabulary is not None else str(
        store.document(i)[:50])
    meta = store.metadata(i)
    lines.append(f"  [{i}]{' ' + meta if meta else ''}: {text[:200]!r}")
  return "\n".join(lines)
