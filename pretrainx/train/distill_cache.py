"""`pretrainx distill cache`: a teacher's top-k next-token log-probs over a token store, written
once as a teacher cache (pretrainx/data/teacher_cache.py) so that distillation need not run the
teacher at every step.

Each part of the cache (a range of documents) is computed by one call of `cache_part`: its
documents are cut into pieces as `pack_layout` cuts them at the cache's seq_len, in stored order,
packed into rows, and run through the teacher a batch of rows at a time under one jit; each
piece's [length, k] entries go to its store token range, and the part's progress is committed
after every batch, so a killed run resumes. In this process the parts run one after another;
on a Ray cluster each part is a task that builds the runtime and loads the teacher itself (the
Experiment travels as gin text).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from pretrainx import cluster as cluster_lib
from pretrainx import storage
from pretrainx.config import Experiment, experiment_to_gin, parse_gin_text
from pretrainx.config.sources import source_model_config
from pretrainx.data import pipeline
from pretrainx.data import teacher_cache as tc
from pretrainx.data.packing import EpochLayout, pack_layout
from pretrainx.train.runtime import build_runtime
from pretrainx.train.teacher import check_teacher_vocab, load_teacher

Forward = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class PartJob:
  """One part of a cache version to compute (what a Ray task receives)."""

  gin: str  # the Experiment (seq_len and batch size those of the cache), as gin text
  domain: str
  split: str
  path: str  # the version's directory
  part: int
  k: int


def part_layout(store, docs: tuple[int, int], seq_len: int) -> EpochLayout:
  """The pieces of documents [lo, hi) in stored order, packed into rows of seq_len."""
  lengths = np.asarray(store.doc_lengths, np.int64)
  return pack_layout(lengths, np.arange(docs[0], docs[1], dtype=np.int64), seq_len)


def _rows(store, lay: EpochLayout, r0: int, r1: int, batch_rows: int, seq_len: int
          ) -> dict[str, np.ndarray]:
  """Rows [r0, r1) of the layout as a batch of int32 [batch_rows, seq_len] (empty rows after)."""
  keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
  out = {k: np.zeros((batch_rows, seq_len), np.int32) for k in keys}
  for i, r in enumerate(range(r0, r1)):
    fill = 0
    for seg, p in enumerate(range(lay.first[r], lay.first[r + 1]), start=1):
      base = int(store.doc_offsets[lay.doc[p]] + lay.start[p])
      m = int(lay.length[p])
      piece = np.asarray(store.tokens(base, base + m + 1), np.int32)
      span = slice(fill, fill + m)
      out["inputs"][i, span], out["targets"][i, span] = piece[:-1], piece[1:]
      out["segment_ids"][i, span], out["positions"][i, span] = seg, np.arange(m)
      out["loss_mask"][i, span] = 1
      fill += m
  return out


def _covered(store, lay: EpochLayout, pieces: int, part_end: int) -> int:
  """The store token where the entries of the first `pieces` pieces end: after the last piece,
  and after its document's last token when that piece ends the document (the part's end once
  every piece is in)."""
  if pieces >= len(lay.doc):
    return part_end
  p = pieces - 1
  doc = int(lay.doc[p])
  end = int(store.doc_offsets[doc] + lay.start[p] + lay.length[p])
  return end + 1 if end + 1 == int(store.doc_offsets[doc + 1]) else end


class _Teacher:
  """The runtime, teacher and jitted top-k forward of one Experiment (built once per process)."""

  def __init__(self, exp: Experiment):
    self.rt = build_runtime(exp)
    self.teacher, self.params = load_teacher(self.rt, exp.distill)

  @functools.lru_cache(maxsize=4)
  def forward(self, k: int) -> Forward:
    """batch of int32 [b, s] -> (ids int32 [b, s, k], log-probs f32 [b, s, k], target f32 [b, s])
    as numpy arrays."""

    @jax.jit
    def top_k(params: Any, batch: dict[str, jax.Array]):
      logp = jax.nn.log_softmax(self.teacher.apply(params, batch), axis=-1)  # [b, s, V] fp32
      values, ids = jax.lax.top_k(logp, k)  # [b, s, k], most likely first
      target = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]  # [b, s]
      return ids, values, target

    def run(batch: dict[str, np.ndarray]):
      with self.rt.scope():
        out = top_k(self.params, self.rt.put_batch(batch))
      return tuple(np.asarray(jax.device_get(x)) for x in out)

    return run


@functools.lru_cache(maxsize=1)
def _teacher(gin: str) -> _Teacher:
  return _Teacher(parse_gin_text(gin))


def cache_part(job: PartJob, progress_bar: bool = False) -> int:
  """Computes one part of a cache version from its committed progress; returns the rows run."""
  exp = parse_gin_text(job.gin)
  store = pipeline.open_domain_store(exp.data, job.domain, job.split)
  info = storage.read_json(storage.join(job.path, "info.json"))
  part = info["parts"][job.part]
  seq_len, batch_rows = exp.run.seq_len, exp.run.global_batch_size
  writer = tc.PartWriter(job.path, job.part)
  lay = part_layout(store, tuple(part["docs"]), seq_len)
  lo, hi = part["tokens"]
  if lay.num_rows == 0:  # only documents of one token: nothing is an input
    writer.write(0, *tc.filler(hi - lo, job.k), done_rows=0)
    writer.finish()
    return 0
  forward = _teacher(job.gin).forward(job.k)
  start = writer.done_rows
  bar = tqdm.tqdm(total=lay.num_rows, initial=start, desc=f"part {job.part}", unit="row",
                  disable=not (progress_bar and sys.stderr.isatty()), leave=False)
  for r0 in range(start, lay.num_rows, batch_rows):
    r1 = min(lay.num_rows, r0 + batch_rows)
    ids, logprobs, target = forward(_rows(store, lay, r0, r1, batch_rows, seq_len))
    _write_batch(writer, store, lay, (r0, r1), (ids, logprobs, target), (lo, hi), job.k)
    bar.update(r1 - r0)
    logging.info("teacher cache %s part %d: %d of %d rows", job.path, job.part, r1,
                 lay.num_rows)
  bar.close()
  writer.finish()
  return lay.num_rows - start


def _write_batch(writer: tc.PartWriter, store, lay: EpochLayout, rows: tuple[int, int],
                 out: tuple[np.ndarray, ...], part_tokens: tuple[int, int], k: int) -> None:
  """Scatters the batch's [rows, seq_len, ...] results to the store tokens its pieces cover
  (the last tokens of documents between them get the filler) and commits the rows."""
  r0, r1 = rows
  p0, p1 = int(lay.first[r0]), int(lay.first[r1])
  lo = part_tokens[0] if p0 == 0 else _covered(store, lay, p0, part_tokens[1])
  hi = _covered(store, lay, p1, part_tokens[1])
  ids, logprobs, target = tc.filler(hi - lo, k)
  for i, r in enumerate(range(r0, r1)):
    col = 0
    for p in range(int(lay.first[r]), int(lay.first[r + 1])):
      m = int(lay.length[p])
      at = int(store.doc_offsets[lay.doc[p]] + lay.start[p]) - lo
      ids[at:at + m], logprobs[at:at + m] = out[0][i, col:col + m], out[1][i, col:col + m]
      target[at:at + m] = out[2][i, col:col + m]
      col += m
  writer.write(lo - part_tokens[0], ids, logprobs, target, done_rows=r1)


def cache_teacher(exp: Experiment, domain: str, split: str = "train", *, name: str = "teacher",
                  k: int = 32, seq_len: int | None = None, batch_rows: int | None = None,
                  parts: int = 1, cluster: cluster_lib.Cluster = cluster_lib.IN_PROCESS
                  ) -> tuple[str, int]:
  """Writes (or finishes) teacher cache `name` of the domain's split: exp.distill.teacher's top
  k tokens at every input of the store. Returns (the version's path, the version)."""
  tc.check_name(name)
  seq_len, batch_rows = int(seq_len or exp.run.seq_len), int(batch_rows or
                                                             exp.run.global_batch_size)
  for flag, value in (("k", k), ("seq_len", seq_len), ("batch_rows", batch_rows),
                      ("parts", parts)):
    if value < 1:
      raise ValueError(f"--{flag}={value}; use a positive number.")
  if not exp.distill.enabled:
    raise ValueError("no teacher: pass --teacher (or set DistillConfig.teacher) to its source.")
  k = min(int(k), exp.model.vocab_size)
  if not storage.exists(exp.distill.teacher):
    raise ValueError(f"the teacher {exp.distill.teacher} does not exist; pass --teacher a "
                     "pretrainx run, checkpoints directory, params export or Hugging Face model "
                     "directory.")
  exp = exp.replace(run={"seq_len": seq_len, "global_batch_size": batch_rows})
  cfg, _, step = source_model_config(exp.distill.teacher, like=exp.model,
                                     step=exp.distill.teacher_step)
  check_teacher_vocab(exp.model, cfg, exp.distill.teacher)
  store = pipeline.open_domain_store(exp.data, domain, split)
  params = {"teacher": storage.resolve(exp.distill.teacher), "teacher_step": step,
            "teacher_dtype": exp.distill.teacher_dtype, "k": k, "seq_len": seq_len,
            "parts": int(parts), "domain": domain, "split": split}
  writer = tc.CacheWriter(store, name, params, k=k, seq_len=seq_len, parts=parts,
                          rows_of=lambda lo, hi: part_layout(store, (lo, hi), seq_len).num_rows)
  todo = writer.unfinished()
  if len(todo) < len(writer.info["parts"]):
    logging.warning("teacher cache %r v%d of %s: continuing %d unfinished parts of %d", name,
                    writer.version, store.path, len(todo), len(writer.info["parts"]))
  gin = experiment_to_gin(exp)
  jobs = [PartJob(gin, domain, split, writer.path, p, k) for p in todo]
  _run_parts(cluster, jobs, writer)
  writer.finish()
  return writer.path, writer.version


def _run_parts(cluster: cluster_lib.Cluster, jobs: list[PartJob], writer: tc.CacheWriter
               ) -> None:
  """Runs the parts (tasks on a cluster); the first failure is raised once all have ended."""
  fn = cache_part if cluster.is_ray else functools.partial(cache_part, progress_bar=True)
  bar = tqdm.tqdm(total=len(jobs), desc="teacher cache", unit="part", leave=False,
                  disable=not (cluster.is_ray and sys.stderr.isatty()))
  failed: list[BaseException] = []
  started = time.time()
  for i, result in cluster_lib.run_tasks(cluster, fn, jobs, max_retries=2):
    if isinstance(result, BaseException):
      failed.append(result)
      if not cluster.is_ray:  # in this process: stop at the first failure
        break
    else:
      logging.info("teacher cache part %d: %d rows in %.1f s", jobs[i].part, result,
                   time.time() - started)
    writer.refresh()
    bar.update(1)
  bar.close()
  if failed:
    raise failed[0]


def disk_bytes(path: str) -> int:
  """Bytes of every file under path (local or in a bucket), one listing per directory."""
  total = 0
  for entry in storage.epath(path).iterdir():
    total += disk_bytes(str(entry)) if entry.is_dir() else entry.stat().length
  return total
