"""Batches for training and evaluation: token stores -> packed rows -> step-scheduled mixture.

Each domain (an embedded-corpus domain or a prepared task) is a token store read at random; its
documents are shuffled per epoch and packed into rows (pretrainx.data.packing); a MixtureSchedule
says which domain fills each row of each global batch, so the batch at step k is a pure function
of (seed, schedule, k) and resuming needs only k. A stage's Selection chooses and orders a
domain's documents by score, its rows counted from the stage's start. Grain reads batches ahead
on worker threads. Validation is kept per domain. Batches are dicts of int32 [batch, seq] arrays
plus `domain` [batch] (and float32 `loss_weight` [batch, seq] when a Selection weights by score).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import grain
import numpy as np
from absl import logging

from pretrainx import storage
from pretrainx.data import store as token_store
from pretrainx.data import tasks as tasks_lib
from pretrainx.config.data import DOMAINS
from pretrainx.data.mixture import MixtureSchedule
from pretrainx.data.packing import TEACHER_KEYS, DomainRows, stage_view
from pretrainx.data.teacher_cache import open_teacher_cache
from pretrainx.config import DataConfig, DistillConfig, RunConfig
from pretrainx.config.phases import run_phases, shape_changes

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def open_domain_store(cfg: DataConfig, domain: str, split: str):
  """The token store of one domain's split; embedded-corpus stores are made on first use."""
  tasks = {t.name: t for t in cfg.tasks}
  if domain in tasks:
    # The fingerprint catches a store prepared from an older version of the task's spec.
    return token_store.open_store(storage.join(cfg.store_root, domain, split), cfg.vocabulary,
                                  fingerprint={"source": repr(tasks[domain])})
  if domain in DOMAINS:
    return token_store.ensure_corpus_store(cfg.store_root, domain, split, cfg.vocabulary,
                                           cfg.validation_fraction)
  raise ValueError(f"unknown domain {domain!r}: not an embedded-corpus domain {DOMAINS} and not "
                   f"the name of a task in DataConfig.tasks {sorted(tasks)}.")


def open_task_stores(cfg: DataConfig, splits: tuple[str, ...] = ("train", "validation")) -> None:
  """Opens (reads the manifests of) the prepared stores of every task domain a run reads, so a
  store that is missing, half-written or of another vocabulary is reported before anything
  starts. Embedded-corpus domains are made on first use and need nothing here."""
  tasks = {t.name: t for t in cfg.tasks}
  for domain in cfg.domains:
    if domain not in tasks and domain not in DOMAINS:
      open_domain_store(cfg, domain, "train")  # the unknown-domain error
    if domain not in tasks:
      continue
    for split in splits:
      if split == "train" or tasks_lib.has_validation(tasks[domain]):
        open_domain_store(cfg, domain, split)


def host_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of each global batch that this host loads."""
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} does not split over {process_count} hosts.")
  per_host = global_batch_size // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


def _stack(rows: list[dict[str, np.ndarray]], keys: Sequence[str]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in keys}


class TrainBatches:
  """This host's part of the global batch of every step, from the stage-scheduled mixture.

  `seq_len` and `global_batch_size` are the first stage's unless it sets its own; a stage that
  changes seq_len (config.phases) starts a new packing of every domain at that length, whose rows
  count from the stage's start, in shuffles of their own.

  With a `distill` whose `cache` names a teacher cache, every row also carries the cached
  teacher's top-k (packing.TEACHER_KEYS), read beside its tokens: the batch of step k stays a
  pure function of (seed, stages, k)."""

  def __init__(self, cfg: DataConfig, seq_len: int, global_batch_size: int,
               process_index: int = 0, process_count: int = 1,
               distill: DistillConfig | None = None):
    self.cfg = cfg
    self.domains = tuple(cfg.domains)
    if cfg.cross_document_attention and cfg.uses_prefix_lm:
      raise ValueError("DataConfig.cross_document_attention=True works with the causal "
                       "objective only; drop it or the 'ul2' stages.")
    self.phases = run_phases(RunConfig(seq_len=seq_len, global_batch_size=global_batch_size),
                             cfg.schedule_stages)
    self.seq_len, self.global_batch_size = self.phases[0].seq_len, self.phases[0].global_batch_size
    self.process = (process_index, process_count)
    for phase in self.phases:
      host_slice(phase.global_batch_size, process_index, process_count)  # divisible everywhere
    self.stores = [open_domain_store(cfg, d, "train") for d in self.domains]
    self.teacher_caches = _teacher_caches(cfg, self.domains, self.stores, distill, self.phases)
    self.teacher_k = distill.top_k if self.teacher_caches else 0
    self.packings = shape_changes(self.phases)  # the phases that start a packing
    self._rows: dict[int, list[DomainRows]] = {}
    self.rows = self.packing_rows(0)
    natural = {d: float(s.num_tokens) for d, s in zip(self.domains, self.stores)}
    self.schedule = MixtureSchedule(cfg.schedule_stages, self.domains, self.global_batch_size,
                                    cfg.seed, natural,
                                    stage_batch_sizes=[p.global_batch_size for p in self.phases])
    self.keys = (BATCH_KEYS + (("prefix_mask",) if cfg.uses_prefix_lm else ()) +
                 (("loss_weight",) if cfg.uses_loss_weights else ()) +
                 (TEACHER_KEYS if self.teacher_caches else ()))
    self._check_selections()

  def packing_of(self, stage_index: int) -> int:
    """The phase (stage) index whose packing the stage's rows come from."""
    return max(p for p in self.packings if p <= stage_index)

  def packing_rows(self, packing: int) -> list[DomainRows]:
    """Each domain's rows at the seq_len of phase `packing` (built on first use)."""
    if packing not in self._rows:
      cfg, phase = self.cfg, self.phases[packing]
      key = () if packing == 0 else (7919, phase.start_step)
      self._rows[packing] = [
          DomainRows(s, seq_len=phase.seq_len, seed=cfg.seed, domain_index=i, mode=cfg.packing,
                     vocab=cfg.vocabulary, objective_cfg=cfg.objective,
                     packing_order=cfg.packing_order,
                     cross_document_attention=cfg.cross_document_attention, name=d,
                     packing_key=key, teacher_cache=cache, teacher_k=self.teacher_k)
          for i, (d, s, cache) in enumerate(zip(self.domains, self.stores,
                                                self.teacher_caches or [None] * len(self.stores)))]
    return self._rows[packing]

  def stage_rows(self, stage_index: int) -> list[DomainRows]:
    return self.packing_rows(self.packing_of(stage_index))

  def _check_selections(self) -> None:
    """Every stage's selections read their scores and keep documents in epoch 0: a missing score
    or an empty filter fails here, before training, not at the stage's first step."""
    for si, stage in enumerate(self.schedule.stages):
      if not stage.selections:
        continue
      for rows in self.stage_rows(si):
        view = stage_view(stage, si, rows.name)
        if view.selection is not None:
          rows.rows_in_epoch(0, view)

  def _row_starts(self, stage_index: int) -> np.ndarray:
    """Rows each domain had given where its rows under this stage start counting -> int64
    [domains]: the stage's start when the stage selects the domain's rows, else the start of
    the stage's packing (the last seq_len change). A domain's row index minus this is its row.

    Not cached: online reweighting may replace the weight history (MixtureSchedule caches its
    own counts and drops them when the history changes); computed once per batch, not per row."""
    stage = self.schedule.stages[stage_index]
    packing_start = self.phases[self.packing_of(stage_index)].start_step
    origins = [stage.start_step if stage.selection_for(d) is not None else packing_start
               for d in self.domains]
    return np.asarray([int(self.schedule.offsets(o)[i]) if o else 0
                       for i, o in enumerate(origins)], np.int64)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This host's rows of the global batch of `step`, with each row's `domain` index."""
    si = self.schedule.stage_index(step)
    stage, rows = self.schedule.stages[si], self.stage_rows(si)
    domain, index = self.schedule.assignment(step)
    local = host_slice(self.phases[si].global_batch_size, *self.process)
    domain, index = domain[local], index[local]
    index = index - self._row_starts(si)[domain]
    batch = _stack([rows[d].row(i, stage, si) for d, i in zip(domain.tolist(), index.tolist())],
                   self.keys)
    batch["domain"] = domain.astype(np.int32)
    return batch

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from `start_step` on, prepared ahead by grain's reader threads."""
    steps = grain.MapDataset.range(start_step, 2**62).map(self.batch_at)
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(self.cfg.prefetch, 1))
    return iter(steps.to_iter_dataset(options))

  def epochs(self, step: int) -> dict[str, float]:
    """How many passes over each domain the batches before `step` made (fractional), counted
    from where the rows of the stage of `step - 1` start (a selection's stage, a repacking)."""
    out = {}
    si = self.schedule.stage_index(max(step - 1, 0))
    stage = self.schedule.stages[si]
    used = self.schedule.offsets(step) - self._row_starts(si)
    for name, rows, n in zip(self.domains, self.stage_rows(si), used.tolist()):
      view = stage_view(stage, si, name)
      epoch, r = rows.locate(max(n, 0), view)
      out[name] = epoch + r / max(rows.rows_in_epoch(epoch, view), 1)
    return out


def _teacher_caches(cfg: DataConfig, domains: Sequence[str], stores: list, distill, phases
                    ) -> list | None:
  """Each train store's teacher cache (DistillConfig.cache), or None without one. A cache holds
  the teacher's predictions on the store's own documents, so rows must be them unchanged: causal
  pieces packed without prefixes, each piece its own context."""
  if distill is None or not (distill.enabled and distill.cache):
    return None
  changed = [s.start_step for s in cfg.schedule_stages
             if s.objective != "causal" or s.metadata_prefix or s.control_tokens]
  if cfg.packing != "pack" or cfg.cross_document_attention or changed:
    what = (f"DataConfig.packing={cfg.packing!r}" if cfg.packing != "pack" else
            "cross_document_attention" if cfg.cross_document_attention else
            f"the stage at step {changed[0]} (a UL2 objective or a conditioning prefix)")
    raise ValueError(f"a teacher cache (DistillConfig.cache={distill.cache!r}) holds the "
                     f"teacher's predictions on each document alone, which {what} changes; use "
                     "packing='pack' with causal stages, or an online teacher (cache='').")
  caches = [open_teacher_cache(s, distill.cache, distill.cache_version) for s in stores]
  for domain, cache in zip(domains, caches):
    written_by = cache.info.get("teacher")
    if distill.teacher and written_by and written_by != storage.resolve(distill.teacher):
      raise ValueError(f"the teacher cache {distill.cache!r} of domain {domain!r} was written "
                       f"by the teacher {written_by}, not DistillConfig.teacher="
                       f"{distill.teacher!r}; set the teacher to it (or '') or write the cache "
                       "for this teacher.")
    if distill.top_k > cache.k:
      raise ValueError(f"DistillConfig.top_k={distill.top_k} but the teacher cache of domain "
                       f"{domain!r} holds the top {cache.k}; use top_k <= {cache.k} (0: all of "
                       "them) or write a cache with a larger --k.")
    other = sorted({p.seq_len for p in phases} - {cache.seq_len})
    if other:
      logging.warning("the teacher cache of domain %r was written with %d-token contexts; at "
                      "seq_len %s the student's pieces of long documents start elsewhere, so "
                      "the teacher saw other contexts than an online one would", domain,
                      cache.seq_len, other)
  return caches


def eval_batches(cfg: DataConfig, seq_len: int, batch_size: int, num_batches: int | None,
                 process_index: int = 0, process_count: int = 1
                 ) -> dict[str, list[dict[str, np.ndarray]]]:
  """Each domain's validation split as this host's parts of up to `num_batches` batches (None:
  all of it), packed in stored order with the causal objective.

  A subset takes rows evenly spaced over the split so that every document is represented; a last
  partial batch is filled with pad rows whose loss_mask is 0. Tasks without a validation split
  are left out with a warning.
  """
  out = {}
  tasks = {t.name: t for t in cfg.tasks}
  for i, domain in enumerate(cfg.domains):
    if domain in tasks and not tasks_lib.has_validation(tasks[domain]):
      logging.warning("task %r has no validation split (set validation_patterns or "
                      "validation_fraction); it is not evaluated.", domain)
      continue
    rows = DomainRows(open_domain_store(cfg, domain, "validation"), seq_len=seq_len,
                      domain_index=i, mode=cfg.packing, shuffle=False, vocab=cfg.vocabulary,
                      objective_cfg=cfg.objective)
    out[domain] = _domain_eval_batches(rows, seq_len, batch_size, num_batches,
                                       host_slice(batch_size, process_index, process_count), i)
  if not out:
    raise ValueError("no domain has validation data; give a task validation_patterns or a "
                     "validation_fraction.")
  return out


def _domain_eval_batches(rows: DomainRows, seq_len: int, batch_size: int,
                         num_batches: int | None, local: slice, domain_index: int):
  total = rows.rows_in_epoch(0)
  available = math.ceil(total / batch_size)
  num_batches = available if num_batches is None else min(num_batches, available)
  wanted = min(num_batches * batch_size, total)
  order = (np.linspace(0, total - 1, wanted).round().astype(int) if wanted < total
           else np.arange(total))
  pad_row = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}
  batches = []
  for b in range(num_batches):
    idx = range(b * batch_size + local.start, b * batch_size + local.stop)
    batch = _stack([rows.row(int(order[i])) if i < len(order) else pad_row for i in idx],
                   BATCH_KEYS)
    batch["domain"] = np.full(len(idx), domain_index, np.int32)
    batches.append(batch)
  return batches


def unigram_entropy(batches: Sequence[dict[str, np.ndarray]], vocab_size: int) -> float:
  """Entropy (nats/token) of the target tokens' own unigram distribution: the loss of a model
  that knows the exact token frequencies of this text but nothing of context."""
  counts = np.zeros(vocab_size, np.float64)
  for b in batches:
    np.add.at(counts, b["targets"][b["loss_mask"] > 0], 1.0)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
