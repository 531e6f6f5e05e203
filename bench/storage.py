"""A run directory and token stores in a bucket (fake-gcs-server on 127.0.0.1) against local disk.

Measures, for each place: the time an async checkpoint save blocks the training loop, save and
restore MB/s of a train-state-sized pytree, token-store read tokens/s (a whole store after a fresh
open, random documents, and the quickstart pipeline's batches), and the pipeline's tokens/s over what the quickstart train
step consumes. Prints a markdown table of ratios (bucket / local).
Run: .venv/bin/python bench/storage.py [--params 20e6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)
from servers import free_port, gcs_env, start_gcs  # noqa: E402  pylint: disable=wrong-import-position

PORT = free_port()
os.environ.update(gcs_env(PORT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=wrong-import-position

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from checkpoint import make_state  # noqa: E402  pylint: disable=wrong-import-position

QUICKSTART_STEP_TOKENS_PER_S = 5076  # bench/RESULTS.md, data pipeline section (same machine)


def checkpoint_numbers(directory: str, state) -> dict[str, float]:
  from pretrainx.config import CheckpointConfig
  from pretrainx.checkpoint import Checkpointer

  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  ckpt = Checkpointer(directory, CheckpointConfig(async_save=True, keep_last=2))
  t0 = time.perf_counter()
  ckpt.save(1, state, {"step": 1})
  blocked = time.perf_counter() - t0
  ckpt.wait()
  saved = time.perf_counter() - t0
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  t0 = time.perf_counter()
  restored, _, _ = ckpt.restore(abstract)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - t0
  ckpt.close()
  mb = nbytes / 1e6
  return {"blocked_ms": 1e3 * blocked, "save_mb_s": mb / saved, "restore_mb_s": mb / restore_s}


def store_numbers(root: str) -> dict[str, float]:
  """Random-document reads of the embedded 'code' store (chunked, not held in memory) and the
  quickstart pipeline's batches with stores under `root`."""
  from pretrainx.config import parse_gin
  from pretrainx.data import store as token_store
  from pretrainx.data.pipeline import TrainBatches

  exp = parse_gin([os.path.join(os.path.dirname(HERE), "gin_configs/quickstart.gin")],
                  [f"DataConfig.store_dir = '{root}'"])
  t0 = time.perf_counter()
  for domain in exp.data.domains:
    token_store.ensure_corpus_store(root, domain, "train", exp.data.vocabulary)
  build_s = time.perf_counter() - t0
  memory = token_store.IN_MEMORY_BYTES
  token_store.IN_MEMORY_BYTES = 0  # read chunks from where the store lives
  try:
    path = token_store.storage.join(root, "code", "train")
    t0 = time.perf_counter()  # a fresh open: every chunk comes from where the store lives
    store = token_store.open_store(path)
    step = token_store.CHUNK
    tokens = sum(len(store.tokens(i, min(i + step, store.num_tokens)))
                 for i in range(0, store.num_tokens, step))
    cold_tps = tokens / (time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    tokens = sum(len(store.document(int(i))) for i in rng.integers(0, store.num_docs, 3000))
    random_tps = tokens / (time.perf_counter() - t0)
  finally:
    token_store.IN_MEMORY_BYTES = memory
  batches = TrainBatches(exp.data, exp.run.seq_len, exp.run.global_batch_size)
  it = batches.iterate(0)
  next(it)
  n = 200
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  pipeline_tps = n * exp.run.seq_len * exp.run.global_batch_size / (time.perf_counter() - t0)
  return {"build_s": build_s, "cold_tokens_s": cold_tps, "random_doc_tokens_s": random_tps,
          "pipeline_tokens_s": pipeline_tps}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=float, default=20e6)
  args = parser.parse_args()
  server = start_gcs(PORT, ("bench",))
  local = tempfile.mkdtemp(prefix="pretrainx-storage-bench-")
  try:
    state = make_state(args.params)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    rows = {}
    for name, base in (("local disk", local), ("gs:// (fake-gcs-server)", "gs://bench/run")):
      numbers = checkpoint_numbers(f"{base}/checkpoints", state)
      numbers.update(store_numbers(f"{base}/stores"))
      rows[name] = numbers
  finally:
    server.terminate()
    shutil.rmtree(local, ignore_errors=True)
  disk, bucket = rows["local disk"], rows["gs:// (fake-gcs-server)"]
  labels = [("blocked_ms", "loop blocked by an async save (ms)"),
            ("save_mb_s", "save MB/s (to finalised)"), ("restore_mb_s", "restore MB/s"),
            ("build_s", "corpus stores built (s)"),
            ("cold_tokens_s", "token store, whole read after a fresh open (tokens/s)"),
            ("random_doc_tokens_s", "token store, random documents, cached chunks (tokens/s)"),
            ("pipeline_tokens_s", "quickstart pipeline (tokens/s)")]
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}; "
        f"train state {nbytes / 1e6:.0f} MB ({args.params / 1e6:.0f}M params + Adam moments)\n")
  print("| measure | local disk | gs:// bucket | bucket / local |")
  print("|---|---|---|---|")
  for key, label in labels:
    print(f"| {label} | {disk[key]:,.1f} | {bucket[key]:,.1f} | {bucket[key] / disk[key]:.2f}× |")
  print(f"\nThe quickstart train step consumes {QUICKSTART_STEP_TOKENS_PER_S:,} tokens/s: the "
        f"pipeline on bucket stores delivers {bucket['pipeline_tokens_s'] / QUICKSTART_STEP_TOKENS_PER_S:,.0f}× "
        "that (target ≥ 10×).")


if __name__ == "__main__":
  main()
