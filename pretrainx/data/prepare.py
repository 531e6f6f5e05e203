"""`pretrainx data prepare`: tasks' splits tokenized into token stores, shard by shard.

A file task's split is cut into shards, one per input file (`tasks.shards`). Each shard is
tokenized into its own part under STORE/.parts/ (a Ray task per shard with `--ray`, one after
another in this process without: the same code), then the parts are copied into the store's
arrays, a range of chunks per task, and the manifest is written last. The store equals what one
process writing the documents in order makes, token for token. A finished part is never tokenized
again, so a killed prepare continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Mapping

import numpy as np
import tqdm

from pretrainx import cluster as cluster_lib
from pretrainx import storage
from pretrainx.data import corpus, side_arrays
from pretrainx.data import store as token_store
from pretrainx.config import CorpusTask, FileTask, MixtureSpec
from pretrainx.data.tasks import Shard, has_validation, iter_shard, shards

PARTS = ".parts"  # inside the store directory, removed once the store is complete
COPY_CHUNKS = 16  # store chunks one copy task writes (16M elements)
FLUSH_EVERY_DOCS = 1000
# Bad input (a malformed file, a missing bucket) is not retried; I/O errors and lost workers are.
RETRY_ON = (OSError, RuntimeError, TimeoutError)


@dataclasses.dataclass(frozen=True)
class ShardJob:
  """One shard to tokenize into its part directory."""

  part_dir: str
  task: FileTask
  shard: Shard
  vocabulary: Any
  flush_every_docs: int = FLUSH_EVERY_DOCS


def tokenize_shard(job: ShardJob) -> dict[str, int]:
  """Tokenizes a shard into its part (continuing an interrupted one); returns its sizes.

  A part whose `part.json` exists is finished and only read back.
  """
  done = storage.join(job.part_dir, "part.json")
  if storage.exists(done):
    return storage.read_json(done)
  progress_path = storage.join(job.part_dir, "progress.json")
  progress = storage.read_json(progress_path) if storage.exists(progress_path) else None
  storage.makedirs(job.part_dir)
  out = token_store.append_documents(job.part_dir, progress, iter_shard(job.task, job.shard),
                                     job.vocabulary, job.flush_every_docs)
  sizes = {"docs": out.docs, "tokens": out.sizes["tokens"], "meta_bytes": out.sizes["meta_bytes"]}
  storage.write_json(done, sizes)
  return sizes


@dataclasses.dataclass(frozen=True)
class Segment:
  """Where one part's values of an array go in the store: `length` values of the part's array
  from `src_start`, plus `add` (the offsets of the parts before it), at `dst_start`."""

  part_dir: str
  dst_start: int
  length: int
  src_start: int = 0
  add: int = 0


def segments(name: str, parts: list[tuple[str, Mapping[str, int]]]) -> tuple[list[Segment], int]:
  """Each part's segment of store array `name` and the array's total length.

  tokens, scores and meta_bytes concatenate; doc_offsets and meta_offsets start with one 0 and
  then take each part's offsets after its own 0, shifted by what the parts before it hold.
  """
  tokens = meta = docs = 0
  out = []
  for part_dir, sizes in parts:
    if name == "tokens":
      out.append(Segment(part_dir, tokens, sizes["tokens"]))
    elif name == "scores":
      out.append(Segment(part_dir, docs, sizes["docs"]))
    elif name == "meta_bytes":
      out.append(Segment(part_dir, meta, sizes["meta_bytes"]))
    elif name == "doc_offsets":
      out.append(Segment(part_dir, 1 + docs, sizes["docs"], 1, tokens))
    elif name == "meta_offsets":
      out.append(Segment(part_dir, 1 + docs, sizes["docs"], 1, meta))
    else:
      raise ValueError(f"unknown store array {name!r}")
    tokens, meta, docs = tokens + sizes["tokens"], meta + sizes["meta_bytes"], docs + sizes["docs"]
  total = {"tokens": tokens, "scores": docs, "meta_bytes": meta}.get(name, docs + 1)
  return out, total


@dataclasses.dataclass(frozen=True)
class CopyJob:
  """Store array `name`'s values [start, stop) (whole chunks, so no two jobs share one)."""

  path: str
  name: str
  start: int
  stop: int
  segments: tuple[Segment, ...]


def copy_range(job: CopyJob) -> int:
  """Writes the store's values [start, stop) of one array from the parts; returns the count."""
  values = np.zeros(job.stop - job.start, token_store.ARRAYS[job.name])
  for seg in job.segments:
    lo, hi = max(job.start, seg.dst_start), min(job.stop, seg.dst_start + seg.length)
    if lo >= hi:
      continue
    src = token_store.open_array(seg.part_dir, job.name)
    first = seg.src_start + lo - seg.dst_start
    values[lo - job.start:hi - job.start] = (
        token_store.read_range(src, first, first + hi - lo) + seg.add)
  arr = token_store.open_array(job.path, job.name)
  arr[job.start:job.stop].write(values).result()
  return len(values)


def _copy_jobs(path: str, parts: list[tuple[str, Mapping[str, int]]]) -> list[CopyJob]:
  """Creates the store's arrays at their final sizes; one job per COPY_CHUNKS chunks."""
  jobs, step = [], COPY_CHUNKS * token_store.CHUNK
  for name in token_store.ARRAYS:
    segs, total = segments(name, parts)
    token_store.open_array(path, name, create=True).resize(exclusive_max=[total]).result()
    for start in range(0, total, step):
      stop = min(total, start + step)
      jobs.append(CopyJob(path, name, start, stop,
                          tuple(s for s in segs
                                if s.dst_start < stop and s.dst_start + s.length > start)))
  return jobs


def _run(cluster, fn, jobs, what: str, label: str) -> list:
  """Runs jobs (a progress bar on a terminal); the first failure is raised after all finish."""
  results: list = [None] * len(jobs)
  failed: list[tuple[int, BaseException]] = []
  bar = tqdm.tqdm(total=len(jobs), desc=label, unit=what, disable=not sys.stderr.isatty(),
                  leave=False)
  for i, result in cluster_lib.run_tasks(cluster, fn, jobs, retry_on=RETRY_ON):
    if isinstance(result, BaseException):
      failed.append((i, result))
    else:
      results[i] = result
    bar.update(1)
  bar.close()
  if failed:
    i, err = failed[0]
    if isinstance(err, ValueError):  # bad input, already said plainly
      raise err
    raise token_store.StoreError(
        f"{len(failed)} of {len(jobs)} {what}s of {label} failed, first {jobs[i]}: "
        f"{type(err).__name__}: {err}; run the prepare again to continue (finished shards are "
        "kept).")
  return results


def prepare_file_split(path: str, task: FileTask, split: str, vocabulary, *,
                       cluster: cluster_lib.Cluster = cluster_lib.IN_PROCESS,
                       overwrite: bool = False,
                       flush_every_docs: int = FLUSH_EVERY_DOCS) -> dict:
  """Tokenizes a file task's split into the store at `path`, shard by shard; returns its manifest.

  A complete store of the same vocabulary and task is left as it is; an interrupted one is
  continued (its finished shards are kept); another vocabulary or task is refused unless
  `overwrite`. The caller holds the store for the whole prepare (its lock).
  """
  path = storage.resolve(path)
  storage.check_bucket(path, "write the token store")
  label = f"{task.name}/{split}"
  with storage.exclusive(token_store.lock_path(path), f"writing the token store {path}"):
    identity = side_arrays.as_json({
        "vocabulary": token_store.vocabulary_identity(vocabulary),
        "fingerprint": {"source": repr(task)}})
    if overwrite:
      storage.rmtree(path)
    manifest_path = storage.join(path, "manifest.json")
    if storage.exists(manifest_path):
      manifest = storage.read_json(manifest_path)
      if {k: manifest.get(k) for k in identity} == identity and manifest.get("complete"):
        return manifest
      raise token_store.StoreError(
          f"{path} holds a store of {manifest.get('vocabulary')} / {manifest.get('fingerprint')},"
          f" not {identity['vocabulary']} / {identity['fingerprint']}; delete it or prepare with "
          "--overwrite.")
    parts_dir = storage.join(path, PARTS)
    plan_path = storage.join(parts_dir, "plan.json")
    if storage.exists(plan_path):  # an interrupted prepare: its shards, as it listed them
      plan = storage.read_json(plan_path)
      if plan["identity"] != identity:
        raise token_store.StoreError(
            f"{path} holds a half-written store of another vocabulary or source; delete it or "
            "prepare with --overwrite.")
      shard_list = [Shard(**s) for s in plan["shards"]]
    else:
      shard_list = shards(task, split)
      storage.rmtree(path)  # whatever is there does not count: it has no manifest and no plan
      storage.write_json(plan_path, {"identity": identity,
                                     "shards": [dataclasses.asdict(s) for s in shard_list]})
    part_dirs = [storage.join(parts_dir, f"{i:05d}") for i in range(len(shard_list))]
    jobs = [ShardJob(d, task, s, vocabulary, flush_every_docs)
            for d, s in zip(part_dirs, shard_list)]
    sizes = _run(cluster, tokenize_shard, jobs, "shard", label)
    if sum(s["docs"] for s in sizes) == 0:
      raise token_store.StoreError(f"no documents for {task.name} ({split}); check the task's "
                                   "files and its validation settings.")
    parts = list(zip(part_dirs, sizes))
    _run(cluster, copy_range, _copy_jobs(path, parts), "copy", label)
    manifest = {"format_version": token_store.FORMAT_VERSION, "task": task.name, "split": split,
                **identity, "num_docs": sum(s["docs"] for s in sizes),
                "num_tokens": sum(s["tokens"] for s in sizes),
                "checksums": token_store.checksums(path), "complete": True}
    storage.write_json(storage.join(path, "identity.json"), identity)
    storage.write_json(manifest_path, manifest)  # last: only now does the store count as complete
    storage.rmtree(parts_dir)
    return manifest


def prepare(spec_or_specs, root: str, vocabulary,
            splits: tuple[str, ...] = ("train", "validation"), overwrite: bool = False,
            specs: Mapping[str, FileTask | CorpusTask | MixtureSpec] | None = None,
            cluster: cluster_lib.Cluster = cluster_lib.IN_PROCESS) -> list[str]:
  """Tokenizes tasks' splits into stores under root/<task>/<split> (idempotent, resumable).

  `spec_or_specs` is a task, a MixtureSpec (each of its tasks, looked up by name in `specs` or
  as an embedded-corpus domain) or a list of them. A FileTask without a validation split gets
  no validation store. File tasks are tokenized shard by shard on `cluster`; the embedded corpus
  (a few MB) is tokenized here.
  """
  paths = []
  for task in resolve_tasks(spec_or_specs, specs):
    for split in splits:
      if split == "validation" and not has_validation(task):
        continue
      path = storage.join(storage.resolve(root), task.name, split)
      if isinstance(task, CorpusTask):
        if overwrite:
          storage.rmtree(path)
        token_store.ensure_corpus_store(root, task.domain, split, vocabulary,
                                        task.validation_fraction)
      else:
        prepare_file_split(path, task, split, vocabulary, cluster=cluster, overwrite=overwrite)
      paths.append(path)
  return paths


def resolve_tasks(spec_or_specs, specs: Mapping | None = None) -> list[FileTask | CorpusTask]:
  """The distinct tasks behind specs, task names and mixtures, in first-seen order."""
  specs = dict(specs or {})
  out: dict[str, FileTask | CorpusTask] = {}

  def visit(item, mixtures: tuple[str, ...]) -> None:
    if isinstance(item, str):
      if item in specs:
        item = specs[item]
      elif item in corpus.DOMAINS:
        item = CorpusTask(item)
      else:
        where = f" in mixture {mixtures[-1]!r}" if mixtures else ""
        raise ValueError(f"unknown task {item!r}{where}: name a task of {sorted(specs)} or an "
                         "embedded-corpus domain "
                         f"{corpus.DOMAINS} (pass the gin file that defines it).")
    if isinstance(item, MixtureSpec):
      if item.name in mixtures:
        raise ValueError(f"mixture {item.name!r} contains itself (via {list(mixtures)}).")
      for name in item.rates:
        visit(name, mixtures + (item.name,))
    elif isinstance(item, (FileTask, CorpusTask)):
      if out.setdefault(item.name, item) != item:
        raise ValueError(f"two different tasks are named {item.name!r}: {out[item.name]} and "
                         f"{item}; rename one.")
    else:
      raise ValueError(f"cannot prepare {item!r}: expected a FileTask, CorpusTask, MixtureSpec "
                       "or a task name.")

  items = spec_or_specs if isinstance(spec_or_specs, (list, tuple)) else [spec_or_specs]
  for item in items:
    visit(item, ())
  return list(out.values())


def prepare_main(names: list[str], root: str, vocabulary,
                 specs: Mapping[str, FileTask | CorpusTask | MixtureSpec] | None = None,
                 splits: tuple[str, ...] = ("train", "validation"), overwrite: bool = False,
                 cluster: cluster_lib.Cluster = cluster_lib.IN_PROCESS) -> list[str]:
  """`pretrainx data prepare NAME...`: prepares the named tasks/mixtures; returns log lines."""
  lines = []
  for path in prepare(list(names), root, vocabulary, splits, overwrite, specs, cluster):
    opened = token_store.open_store(path, vocabulary)
    lines.append(f"{storage.basename(storage.parent(path))}/{storage.basename(path)}: "
                 f"{opened.num_docs:,} documents, "
                 f"{opened.num_tokens:,} tokens in {path}")
  return lines
