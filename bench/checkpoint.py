"""How long a checkpoint blocks training, async vs sync, and save/restore throughput.

A ~100M-parameter train state (params + two Adam moments, fp32: ~1.2 GB) is saved with the
Checkpointer while a stand-in training step (a jitted matmul chain) keeps running; the table gives
the time the loop is blocked by each save, as a ratio of one training interval, plus MB/s.
Run: .venv/bin/python bench/checkpoint.py [--params 100e6] [--dir /tmp/pretrainx_ckpt_bench]
"""

from __future__ import annotations

import argparse
import shutil
import time

import jax
import jax.numpy as jnp

from pretrainx.config import CheckpointConfig
from pretrainx.checkpoint import Checkpointer


def make_state(num_params: float):
  """params + Adam mu + nu, as 16 [rows, 4096] fp32 matrices each."""
  rows = int(num_params / 16 / 4096)
  key = jax.random.key(0)
  mats = lambda k: {f"w{i}": jax.random.normal(jax.random.fold_in(k, i), (rows, 4096))
                    for i in range(16)}
  state = {"params": mats(key), "mu": mats(jax.random.fold_in(key, 1)),
           "nu": mats(jax.random.fold_in(key, 2))}
  return jax.block_until_ready(state)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=float, default=100e6)
  parser.add_argument("--dir", default="/tmp/pretrainx_ckpt_bench")
  parser.add_argument("--interval_steps", type=int, default=20,
                      help="training steps between two checkpoints, for the blocked fraction")
  args = parser.parse_args()
  state = make_state(args.params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  a = jnp.ones((1024, 1024)) / 1024

  @jax.jit
  def train_step(x):
    return jax.lax.fori_loop(0, 8, lambda _, y: y @ a, x)

  x = jax.block_until_ready(train_step(a))
  t0 = time.perf_counter()
  for _ in range(5):
    x = jax.block_until_ready(train_step(x))
  step_s = (time.perf_counter() - t0) / 5
  interval_s = step_s * args.interval_steps

  rows = []
  for mode in ("sync", "async"):
    shutil.rmtree(args.dir, ignore_errors=True)
    ckpt = Checkpointer(args.dir, CheckpointConfig(async_save=mode == "async", keep_last=2))
    t0 = time.perf_counter()
    ckpt.save(1, state, {"step": 1})
    blocked = time.perf_counter() - t0
    steps_during = 0
    while ckpt._mngr.is_saving_in_progress():  # pylint: disable=protected-access
      x = jax.block_until_ready(train_step(x))
      steps_during += 1
    ckpt.wait()
    total = time.perf_counter() - t0
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding),
                            state)
    t1 = time.perf_counter()
    restored, _, _ = ckpt.restore(abstract)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t1
    ckpt.close()
    rows.append((mode, blocked, total, steps_during, restore_s))
  shutil.rmtree(args.dir, ignore_errors=True)

  mb = nbytes / 2**20
  print(f"\nstate: {args.params / 1e6:.0f}M params x 3 (params, mu, nu) = {mb:,.0f} MiB fp32; "
        f"{jax.device_count()} {jax.default_backend()} device(s); one checkpoint every "
        f"{args.interval_steps} steps of {step_s * 1e3:.1f} ms\n")
  print("| save | loop blocked (s) | blocked / checkpoint interval | save done (s) | save MB/s "
        "| steps run during save | restore (s) | restore MB/s |")
  print("|---|---|---|---|---|---|---|---|")
  for mode, blocked, total, steps_during, restore_s in rows:
    print(f"| {mode} | {blocked:.2f} | {100 * blocked / interval_s:.0f}% | {total:.2f} "
          f"| {mb / total:,.0f} | {steps_during} | {restore_s:.2f} | {mb / restore_s:,.0f} |")
  sync_blocked, async_blocked = rows[0][1], rows[1][1]
  print(f"\nasync blocks the loop {100 * async_blocked / sync_blocked:.1f}% as long as sync.")


if __name__ == "__main__":
  main()
