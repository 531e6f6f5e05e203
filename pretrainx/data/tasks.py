"""Data sources: the embedded corpus and user files (text, JSON lines, Parquet) as tasks.

Specs are plain frozen dataclasses that gin builds; `iter_documents` reads them directly (no
TensorFlow) in a fixed order, which is what `pretrainx data prepare` tokenizes into token stores.
`register_seqio` turns the same specs into SeqIO Tasks and Mixtures for SeqIO-based tools; seqio
is imported only inside those functions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Iterator

from pretrainx import storage
from pretrainx.data import corpus
from pretrainx.config import CorpusTask, FileTask, MixtureSpec
from pretrainx.config.data import FORMATS

_EXTENSIONS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
               ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class SourceDocument:
  """One document as read from a source, before tokenization."""

  text: str
  metadata: str | None = None  # e.g. its URL or source, for metadata conditioning
  score: float | None = None   # e.g. a quality score, for control tokens


# -- reading ------------------------------------------------------------------------------------


def _files(task: FileTask, patterns: tuple[str, ...]) -> list[str]:
  files = sorted({f for p in patterns for f in storage.glob(p)})
  if not files:
    where = ("" if any(storage.is_remote(p) for p in patterns)
             else f" (relative to {os.getcwd()})")
    raise ValueError(f"task {task.name!r}: no files match {list(patterns)}; check the paths"
                     f"{where}.")
  return files


def _format(task: FileTask, path: str) -> str:
  if task.format != "auto":
    return task.format
  ext = os.path.splitext(storage.basename(path))[1].lower()
  if ext not in _EXTENSIONS:
    raise ValueError(f"task {task.name!r}: cannot tell the format of {path}; set "
                     f"FileTask.format to one of {FORMATS}.")
  return _EXTENSIONS[ext]


def _record(task: FileTask, rec: Any, where: str) -> SourceDocument:
  if not isinstance(rec, dict):
    raise ValueError(f"task {task.name!r}: {where} is a JSON {type(rec).__name__}, not an object "
                     f"with a {task.text_field!r} field; write one object per line.")
  if rec.get(task.text_field) is None:
    raise ValueError(f"task {task.name!r}: {where} has no field {task.text_field!r} (fields: "
                     f"{sorted(rec)}); set FileTask.text_field.")
  meta = rec.get(task.metadata_field) if task.metadata_field else None
  score = rec.get(task.score_field) if task.score_field else None
  return SourceDocument(str(rec[task.text_field]), None if meta is None else str(meta),
                        None if score is None else float(score))


def _read_file(task: FileTask, path: str) -> Iterator[SourceDocument]:
  fmt = _format(task, path)
  if fmt == "text":
    yield SourceDocument(storage.read_bytes(path).decode("utf-8", errors="replace"),
                         storage.basename(path))
  elif fmt == "jsonl":
    with storage.open_file(path, "r") as f:
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            rec = json.loads(line)
          except json.JSONDecodeError as err:
            raise ValueError(f"task {task.name!r}: {path}:{line_no} is not JSON ({err}).") from err
          yield _record(task, rec, f"{path}:{line_no}")
  else:
    try:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError as err:
      raise ValueError(f"task {task.name!r}: reading {path} needs pyarrow; "
                       "`pip install pyarrow`.") from err
    with storage.open_file(path, "rb") as f:  # streamed in row batches
      i = 0
      for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
          yield _record(task, rec, f"{path} row {i}")
          i += 1


def _held_out(path: str, index: int, fraction: float) -> bool:
  # The file's name, not its absolute path: moving the data keeps the split.
  digest = hashlib.sha256(f"{storage.basename(path)}:{index}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclasses.dataclass(frozen=True)
class Shard:
  """One file's share of a split: its documents whose hold-out test gives `held`."""

  path: str
  hold: float = 0.0   # the task's validation_fraction, or 0 (no hold-out from this file)
  held: bool = False  # True: the held-out documents (validation); False: the rest


def has_validation(task: FileTask | CorpusTask) -> bool:
  """Whether the task has a validation split (a FileTask needs patterns or a fraction)."""
  return isinstance(task, CorpusTask) or bool(task.validation_patterns or
                                              task.validation_fraction > 0)


def shards(task: FileTask, split: str) -> list[Shard]:
  """The files behind a FileTask's split, in order: a split's documents are its shards' in turn.

  Whole files are the unit (a document's hold-out hash uses its index in its file), so shards
  are tokenized independently and concatenated in this order give `iter_documents(task, split)`.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"unknown split {split!r}; use 'train' or 'validation'.")
  if split == "validation" and task.validation_patterns:
    return [Shard(p) for p in _files(task, task.validation_patterns)]
  if split == "validation" and not task.validation_fraction:
    return []
  hold = task.validation_fraction if not task.validation_patterns else 0.0
  return [Shard(p, hold, split == "validation") for p in _files(task, task.train_patterns)]


def iter_shard(task: FileTask, shard: Shard) -> Iterator[SourceDocument]:
  """A shard's documents, in file order."""
  for i, doc in enumerate(_read_file(task, shard.path)):
    if _held_out(shard.path, i, shard.hold) == shard.held:
      yield doc


def iter_documents(task: FileTask | CorpusTask, split: str) -> Iterator[SourceDocument]:
  """The task's documents of `split` ('train' or 'validation') in a fixed order."""
  if split not in ("train", "validation"):
    raise ValueError(f"unknown split {split!r}; use 'train' or 'validation'.")
  if isinstance(task, CorpusTask):
    for d in corpus.load_documents(split, (task.domain,), task.validation_fraction):
      yield SourceDocument(d.text, d.name)
    return
  for shard in shards(task, split):
    yield from iter_shard(task, shard)


# -- SeqIO --------------------------------------------------------------------------------------

_REGISTERED: dict[str, Any] = {}
_KEYS = {"text": "text", "metadata": "metadata", "score": "score"}


def register_seqio(spec: FileTask | CorpusTask | MixtureSpec) -> str:
  """Registers `spec` as a seqio Task (features 'text', 'metadata', 'score') or Mixture."""
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  name = spec.name
  if name in _REGISTERED:
    if _REGISTERED[name] != spec:
      raise ValueError(f"a different task or mixture is already registered as {name!r}.")
    return name
  if isinstance(spec, MixtureSpec):
    seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in spec.rates.items()])
  else:
    def source(split: str, shuffle_files: bool = False, seed: int | None = None):
      del shuffle_files, seed  # the order is fixed; shuffling happens in the token pipeline
      docs = list(iter_documents(spec, split))
      return tf.data.Dataset.from_tensor_slices({  # explicit dtypes: an empty split has no values
          "text": tf.constant([d.text for d in docs], tf.string),
          "metadata": tf.constant([d.metadata or "" for d in docs], tf.string),
          # float64, so that scores come back exactly as iter_documents gives them
          "score": tf.constant([math.nan if d.score is None else d.score for d in docs],
                               tf.float64)})

    # No tokenization in SeqIO: the token store tokenizes with the run's vocabulary.
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(source, splits=("train", "validation")),
        preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map=_KEYS)],
        output_features={})
  _REGISTERED[name] = spec
  return name


def seqio_documents(task_name: str, split: str) -> Iterator[SourceDocument]:
  """Iterates a registered seqio task's documents."""
  import seqio  # pylint: disable=import-outside-toplevel

  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=None, split=split, shuffle=False)
  for ex in ds.as_numpy_iterator():
    score = float(ex["score"])
    yield SourceDocument(ex["text"].decode("utf-8"), ex["metadata"].decode("utf-8") or None,
                         None if math.isnan(score) else score)
