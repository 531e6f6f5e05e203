"""How long a checkpoint blocks training, async vs sync, and save/restore throughput, for the
persistent tier and the local tier (host RAM in /dev/shm, or local disk).

A ~100M-parameter train state (params + two Adam moments, fp32: ~1.2 GB) is saved while a stand-in
training step (a jitted matmul chain) keeps running. Tables:
  1. the persistent Checkpointer, sync vs async: loop blocked per save, as a ratio of a training
     interval, plus save/restore MB/s;
  2. the local tier (LocalTier, local_dir on /dev/shm and on /tmp) vs the persistent tier: loop
     blocked per save, background completion (write + CRC32 CHECKSUMS), and the blocked share of a
     checkpoint interval of k steps; then the measured overhead of N stand-in steps with a save
     every k steps against N steps without saving (the previous save's background work blocks
     the next save when k is short, which a per-call number does not show);
  3. recovery: local candidates() + restore_step vs the persistent restore, and a peer copy over
     TCP (two Orbax P2PNodes in this process, loopback);
  4. work lost per failure at each local interval, in steps and seconds;
  5. what a pod host would write per local save (arithmetic, no measurement).
Run: .venv/bin/python bench/checkpoint.py [--params 100e6] [--dir /tmp/pretrainx_ckpt_bench]
     [--skip_sync] [--skip_disk_local] [--reps 3] [--steps 20] [--intervals 1,2,5,10,50]
A --params 20e6 run takes ~2-3 minutes on 2 CPU cores; the default 100M ~10-15.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pretrainx.config import CheckpointConfig
from pretrainx.checkpoint import Checkpointer
from pretrainx.checkpoint.local import LocalTier, step_problem, write_checksums
from pretrainx.checkpoint.tiers import TieredCheckpointer

REFT_OVERHEAD_GOAL = 0.05  # REFT's goal: in-memory checkpointing at < 5% training overhead


def make_state(num_params: float):
  """params + Adam mu + nu, as 16 [rows, 4096] fp32 matrices each."""
  rows = int(num_params / 16 / 4096)
  key = jax.random.key(0)
  mats = lambda k: {f"w{i}": jax.random.normal(jax.random.fold_in(k, i), (rows, 4096))
                    for i in range(16)}
  state = {"params": mats(key), "mu": mats(jax.random.fold_in(key, 1)),
           "nu": mats(jax.random.fold_in(key, 2))}
  return jax.block_until_ready(state)


class Loop:
  """The stand-in training step and its carried value."""

  def __init__(self):
    a = jnp.ones((1024, 1024)) / 1024
    self.step = jax.jit(lambda x: jax.lax.fori_loop(0, 8, lambda _, y: y @ a, x))
    self.x = jax.block_until_ready(self.step(a))

  def run(self, n: int = 1) -> None:
    for _ in range(n):
      self.x = jax.block_until_ready(self.step(self.x))

  def run_while(self, busy) -> int:
    """Steps run until busy() is False."""
    n = 0
    while busy():
      self.run()
      n += 1
    return n

  def time_steps(self, n: int) -> float:
    t0 = time.perf_counter()
    self.run(n)
    return time.perf_counter() - t0


def abstract_of(state):
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), state)


def fmt_s(s: float) -> str:
  return f"{s:.3f}" if s < 0.1 else f"{s:.2f}"


# -- 1. persistent: sync vs async (the original table) -------------------------------------------


def persistent_sync_async(args, state, loop, nbytes, step_s):
  rows = []
  for mode in (("async",) if args.skip_sync else ("sync", "async")):
    shutil.rmtree(args.dir, ignore_errors=True)
    ckpt = Checkpointer(args.dir, CheckpointConfig(async_save=mode == "async", keep_last=2))
    t0 = time.perf_counter()
    ckpt.save(1, state, {"step": 1})
    blocked = time.perf_counter() - t0
    steps_during = loop.run_while(ckpt.saving)
    ckpt.wait()
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    restored, _, _ = ckpt.restore(abstract_of(state))
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t1
    del restored
    ckpt.close()
    rows.append((mode, blocked, total, steps_during, restore_s))
  shutil.rmtree(args.dir, ignore_errors=True)

  mb = nbytes / 2**20
  interval_s = step_s * args.interval_steps
  print(f"\n### 1. Persistent tier, sync vs async (one checkpoint every {args.interval_steps} "
        "steps)\n")
  print("| save | loop blocked (s) | blocked / checkpoint interval | save done (s) | save MB/s "
        "| steps run during save | restore (s) | restore MB/s |")
  print("|---|---|---|---|---|---|---|---|")
  for mode, blocked, total, steps_during, restore_s in rows:
    print(f"| {mode} | {blocked:.2f} | {100 * blocked / interval_s:.0f}% | {total:.2f} "
          f"| {mb / total:,.0f} | {steps_during} | {restore_s:.2f} | {mb / restore_s:,.0f} |")
  if not args.skip_sync:
    sync_blocked, async_blocked = rows[0][1], rows[1][1]
    print(f"\nasync blocks the loop {100 * async_blocked / sync_blocked:.1f}% as long as sync.")


# -- 2. the tiers, save by save and under a loop ---------------------------------------------------


class Tier:
  """One tier behind the same three calls: save (the loop's blocked part), busy, wait."""

  def __init__(self, name: str, args, mesh, local_dir: str | None):
    self.name, self.local_dir = name, local_dir
    self.run_dir = os.path.join(args.dir, "run")
    if local_dir:
      cfg = CheckpointConfig(local_dir=local_dir, local_every_steps=1, local_keep=2,
                             local_replicas=0)
      self.impl = LocalTier(cfg, self.run_dir, mesh)
    else:
      self.impl = Checkpointer(os.path.join(self.run_dir, "checkpoints"),
                               CheckpointConfig(async_save=True, keep_last=2))

  def save(self, step, state):
    self.impl.save(step, state, {"step": step})

  def busy(self) -> bool:
    return self.impl.saving()

  def wait(self):
    self.impl.wait()

  def close(self):
    self.impl.close()


def tier_specs(args):
  specs = [("local, /dev/shm (RAM)", args.shm_dir)]
  if not args.skip_disk_local:
    specs.append(("local, /tmp (disk)", args.disk_local_dir))
  specs.append(("persistent async, /tmp (disk)", None))
  return specs


def clean(args):
  for d in (args.dir, args.shm_dir, args.disk_local_dir):
    shutil.rmtree(d, ignore_errors=True)


def per_save(args, state, loop, mesh, nbytes, step_s):
  """Each save on its own: blocked, then steps run until the background work is done."""
  mb = nbytes / 2**20
  results = {}
  for name, local_dir in tier_specs(args):
    clean(args)
    tier = Tier(name, args, mesh, local_dir)
    blocked, done, during = [], [], []
    for rep in range(args.reps):
      t0 = time.perf_counter()
      tier.save(rep + 1, state)
      blocked.append(time.perf_counter() - t0)
      during.append(loop.run_while(tier.busy))
      tier.wait()
      done.append(time.perf_counter() - t0)
    tier.close()
    results[name] = (statistics.median(blocked), statistics.median(done),
                     statistics.median(during), min(done), max(done))
  print(f"\n### 2a. Local vs persistent tier, one save at a time (median of {args.reps})\n")
  print("Background completion: the local tier's Orbax write + CRC32 CHECKSUMS (no peer copy in "
        "one process); the persistent tier's Orbax write and finalisation. Stand-in steps keep "
        "running meanwhile.\n")
  print("| tier | loop blocked (s) | background done (s) [min-max] | MB/s | steps run meanwhile "
        "| " + " | ".join(f"blocked / {k}-step interval" for k in args.intervals) + " |")
  print("|---|---|---|---|---|" + "---|" * len(args.intervals))
  for name, (blocked, done, during, lo, hi) in results.items():
    fracs = " | ".join(f"{100 * blocked / (k * step_s):.1f}%" for k in args.intervals)
    print(f"| {name} | {fmt_s(blocked)} | {done:.2f} [{lo:.2f}-{hi:.2f}] | {mb / done:,.0f} "
          f"| {during:.0f} | {fracs} |")
  return results


def overhead(args, state, loop, mesh, step_s):
  """N stand-in steps with a save every k steps (saves before steps 0, k, 2k, ...), timed to the
  end of the last save's background work, against the same N steps without saving, run just
  before and just after (their mean; the host is shared, so both are printed)."""
  clean(args)
  tiers = {name: Tier(name, args, mesh, local_dir) for name, local_dir in tier_specs(args)}
  for tier in tiers.values():
    tier.save(1, state)  # a warm-up save outside the timing (first-save setup)
    tier.wait()
  step, table = 1, {}
  for k in args.intervals:
    n = -(-max(args.steps, k) // k) * k
    c0 = time.process_time()
    before = loop.time_steps(n)
    row = {"n": n, "cpu_base": time.process_time() - c0}
    for name, tier in tiers.items():
      if tier.local_dir is None and k < args.persistent_min_interval:
        continue
      t0, c0 = time.perf_counter(), time.process_time()
      for i in range(n):
        if i % k == 0:
          step += 1
          tier.save(step, state)
        loop.run()
      tier.wait()
      row[name] = time.perf_counter() - t0
      row["cpu " + name] = time.process_time() - c0
    after = loop.time_steps(n)
    row["base"], row["base_range"] = (before + after) / 2, (before, after)
    table[k] = row
  for tier in tiers.values():
    tier.close()
  clean(args)
  names = [name for name, _ in tier_specs(args)]
  print("\n### 2b. Measured overhead: N stand-in steps with a save every k steps vs N steps "
        "without\n")
  print(f"Wall time from the first save to the end of the last save's background work, over the "
        f"mean wall time of the same N steps without saving (run just before and after), minus "
        f"1. One stand-in step = {step_s * 1e3:.0f} ms when measured at the start. REFT's goal: "
        f"< {100 * REFT_OVERHEAD_GOAL:.0f}%. CPU: this process's CPU seconds for the run over "
        "those of the run before without saving, minus 1 (less sensitive to other jobs on the "
        "host than wall time, but not what training waits for).\n")
  print("| save every k steps | N steps (saves) | no save (s) [before, after] | " +
        " | ".join(f"{n}: s, wall overhead, CPU overhead" for n in names) + " |")
  print("|---|---|---|" + "---|" * len(names))
  for k, row in table.items():
    cells = []
    for name in names:
      if name in row:
        cells.append(f"{row[name]:.2f}, {100 * (row[name] / row['base'] - 1):+.0f}%, "
                     f"{100 * (row['cpu ' + name] / row['cpu_base'] - 1):+.0f}%")
      else:
        cells.append("not run")
    lo, hi = row["base_range"]
    print(f"| {k} | {row['n']} ({row['n'] // k}) | {row['base']:.2f} [{lo:.2f}, {hi:.2f}] | "
          + " | ".join(cells) + " |")
  return table


# -- 3. recovery ------------------------------------------------------------------------------


def recovery(args, state, mesh, nbytes):
  mb = nbytes / 2**20
  abstract = abstract_of(state)
  rows = []
  extra = {}
  for name, local_dir in tier_specs(args):
    clean(args)
    tier = Tier(name, args, mesh, local_dir)
    tier.save(1, state)
    tier.wait()
    tier.save(2, state)  # two steps kept, as in a run: candidates() verifies both
    tier.wait()
    for rep in range(args.restore_reps):
      if local_dir:
        t0 = time.perf_counter()
        steps, holders = tier.impl.candidates()
        t1 = time.perf_counter()
        restored = tier.impl.restore_step(steps[0], holders[steps[0]], abstract)
        assert restored is not None and not restored[2], restored
        jax.block_until_ready(restored[0])
        t2 = time.perf_counter()
        rows.append((name, rep, t1 - t0, t2 - t1, t2 - t0))
      else:
        t0 = time.perf_counter()
        restored = tier.impl.restore(abstract)
        jax.block_until_ready(restored[0])
        t2 = time.perf_counter()
        rows.append((name, rep, None, t2 - t0, t2 - t0))
      del restored
    if local_dir:
      step_dir = tier.impl.step_path(2)
      t0 = time.perf_counter()
      write_checksums(step_dir)
      t1 = time.perf_counter()
      assert step_problem(step_dir) is None
      extra[name] = (t1 - t0, time.perf_counter() - t1)
      extra[name + " p2p"] = peer_copy(tier.impl, nbytes)
    tier.close()

  # the two tiers together, as the loop restores: the local step 2 is newer than persistent 1
  clean(args)
  local = Tier("local", args, mesh, args.shm_dir)
  persistent = Tier("persistent", args, mesh, None)
  persistent.save(1, state)
  persistent.wait()
  local.save(2, state)
  local.wait()
  tiered = TieredCheckpointer(persistent.impl, local.impl)
  t0 = time.perf_counter()
  restored = tiered.restore(abstract)
  jax.block_until_ready(restored[0])
  tiered_s = time.perf_counter() - t0
  tiered_from = (tiered.restored_tier, restored[2])
  del restored
  tiered.close()
  clean(args)

  print(f"\n### 3. Recovery: restore the {mb:,.0f} MiB state (best of {args.restore_reps}; "
        "files in the page cache)\n")
  print("| tier | candidates() (s) | restore (s) | total (s) | MB/s (total) |")
  print("|---|---|---|---|---|")
  for name, _ in tier_specs(args):
    mine = [r for r in rows if r[0] == name]
    best = min(mine, key=lambda r: r[4])
    cand = "-" if best[2] is None else f"{best[2]:.2f}"
    print(f"| {name} | {cand} | {best[3]:.2f} | {best[4]:.2f} | {mb / best[4]:,.0f} |")
  print(f"| TieredCheckpointer.restore (local /dev/shm step 2 over persistent step 1) | - | - "
        f"| {tiered_s:.2f} | {mb / tiered_s:,.0f} |")
  print(f"\nTieredCheckpointer restored step {tiered_from[1]} from tier '{tiered_from[0]}'.")
  print("candidates() verifies the CRC32 of every kept local step (local_keep=2 here) before "
        "choosing one; restore_step reads the newest and checks it is finite.\n")
  print("| local dir | write CHECKSUMS of one step (s) | verify one step (s) | peer copy over TCP "
        "(s) | peer copy MB/s | copy + verify (s) |")
  print("|---|---|---|---|---|---|")
  for name, local_dir in tier_specs(args):
    if local_dir:
      write_s, verify_s = extra[name]
      copy_s, copy_verify_s = extra[name + " p2p"]
      print(f"| {name} | {write_s:.2f} | {verify_s:.2f} | {copy_s:.2f} | {mb / copy_s:,.0f} "
            f"| {copy_verify_s:.2f} |")
  return rows, extra, tiered_s


def peer_copy(local: LocalTier, nbytes: int) -> tuple[float, float]:
  """The TCP copy a keeper makes of its ward's step: a second P2PNode in this process fetches
  step 2 from a node serving the tier's own directory (what LocalTier._copy_from_ward does,
  CRC check of the copy included in the second number)."""
  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint.experimental.emergency.p2p import constants as p2p_constants
  from orbax.checkpoint.experimental.emergency.p2p import service as p2p_service
  home = os.path.dirname(local.own_dir)
  target = os.path.join(home, "bench_peer")
  os.makedirs(target, exist_ok=True)
  server = p2p_service.P2PNode(local.own_dir)
  client = p2p_service.P2PNode(target)
  server.start()
  client.start()
  try:
    t0 = time.perf_counter()
    ok = client.fetch_shard_from_peer(server.ip, server.port, 2, local.process)
    t1 = time.perf_counter()
    if not ok:
      raise OSError(f"P2PNode fetch of step 2 from {server.ip}:{server.port} failed")
    fetched = os.path.join(target, p2p_constants.P2P_RESTORE_DIR_NAME, "2")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(fetched) for f in fs)
    problem = step_problem(fetched)
    t2 = time.perf_counter()
    if problem:
      raise OSError(f"the peer copy is unusable: {problem}")
    assert size >= nbytes * 0.9, (size, nbytes)
  finally:
    server.stop()
    client.stop()
    shutil.rmtree(target, ignore_errors=True)
  return t1 - t0, t2 - t0


# -- 4. and 5. arithmetic -------------------------------------------------------------------------


def lost_steps(k: int, t: float, d: float) -> tuple[float, float]:
  """(mean, worst) steps of work lost by a failure at a uniformly random time, with a save every k
  steps of t seconds whose background work takes d seconds. A save is usable only once its
  background work is done. If d <= k t, a failure loses k/2 + d/t steps on average (k + d/t at
  worst). If d > k t, the next save waits for the previous one (the local tier's save calls
  wait() first), so the loop stalls and a failure loses between k and 2k steps: k t of the period
  d gains steps (k to 2k), the rest of it is the stall at 2k."""
  if d <= k * t:
    return k / 2 + d / t, k + d / t
  return (k * t * 1.5 * k + (d - k * t) * 2 * k) / d, 2 * k


def work_lost(args, step_s, saves):
  shm = tier_specs(args)[0][0]
  persistent = tier_specs(args)[-1][0]
  d_local, d_persistent = saves[shm][1], saves[persistent][1]
  print("\n### 4. Work lost per failure\n")
  print(f"A save is usable once its background work is done, d after it starts (measured in 2a: "
        f"local /dev/shm d = {d_local:.2f} s, persistent d = {d_persistent:.2f} s). With a save "
        "every k steps of t seconds, a failure at a random time loses on average k/2 + d/t steps "
        "(worst k + d/t); when d > k t the loop stalls at each save until the previous one is "
        "done, and a failure loses k to 2k steps. Seconds = steps x t, the work to recompute "
        "(the restart and table 3's restore come on top). The stand-in column uses the step time "
        f"measured at the start ({step_s * 1e3:.0f} ms); the pod columns assume the same d "
        "(a pod host's share of a 7B model, table 5, is about this state's size).\n")
  cols = [(f"stand-in {step_s * 1e3:.0f} ms", step_s), ("1 s step", 1.0), ("5 s step", 5.0)]
  print("| checkpoint every | " + " | ".join(f"{c}: steps mean / worst" for c, _ in cols)
        + " | " + " | ".join(f"{c}: seconds mean / worst" for c, _ in cols) + " |")
  print("|---|" + "---|" * (2 * len(cols)))
  rows = [(f"local {k}", k, d_local) for k in args.intervals]
  rows += [(f"persistent {p}", p, d_persistent) for p in (100, 1000)]
  for label, k, d in rows:
    steps_cells, secs_cells = [], []
    for _, t in cols:
      mean, worst = lost_steps(k, t, d)
      stall = "*" if d > k * t else ""
      steps_cells.append(f"{mean:,.1f} / {worst:,.1f}{stall}")
      secs_cells.append(f"{mean * t:,.1f} / {worst * t:,.1f}")
    print(f"| {label} steps | " + " | ".join(steps_cells) + " | " + " | ".join(secs_cells) + " |")
  print("\n\\* d > k t: the loop stalls at every save (its real interval is d, not k steps).")


def pod_table(local_mb_s: float):
  print("\n### 5. What a pod host writes per local save (arithmetic)\n")
  print("bytes per host = params x (4 B fp32 params + 4 B Adam mu + 4 B Adam nu) / hosts; x2 "
        "with the peer's copy (each host also receives its ward's shards); RAM held in /dev/shm "
        "at local_keep=2 = 2 own + 2 replica steps. The last column divides the own bytes by "
        f"this host's measured /dev/shm background rate ({local_mb_s:,.0f} MiB/s, write + "
        "CRC32), an extrapolation only.\n")
  print("| model | hosts | state (GB) | per host per save (GB) | with peer copy (GB) "
        "| /dev/shm held at local_keep=2 (GB) | at this host's rate (s) |")
  print("|---|---|---|---|---|---|---|")
  for params, hosts in ((7e9, 64), (8e9, 256), (70e9, 512)):
    total = params * 12 / 1e9
    per = total / hosts
    print(f"| {params / 1e9:.0f}B | {hosts} | {params / 1e9:.0f}e9 x 12 B = {total:,.0f} "
          f"| {total:,.0f} / {hosts} = {per:.3f} | {2 * per:.3f} | {4 * per:.2f} "
          f"| {per * 1e9 / 2**20 / local_mb_s:.1f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=float, default=100e6)
  parser.add_argument("--dir", default="/tmp/pretrainx_ckpt_bench",
                      help="the run directory (persistent tier), on local disk")
  parser.add_argument("--shm_dir", default="/dev/shm/pretrainx_ckpt_bench",
                      help="local_dir of the local tier in host RAM")
  parser.add_argument("--disk_local_dir", default="/tmp/pretrainx_ckpt_bench_local",
                      help="local_dir of the local tier on local disk")
  parser.add_argument("--interval_steps", type=int, default=20,
                      help="training steps between two checkpoints, for table 1's blocked share")
  parser.add_argument("--intervals", default="1,2,5,10,50",
                      help="local save intervals (steps) for tables 2 and 4")
  parser.add_argument("--steps", type=int, default=4,
                      help="stand-in steps per overhead run in table 2b: at least one interval, "
                      "rounded up to whole intervals (k=1: 4 saves; k=50: 50 steps, one save)")
  parser.add_argument("--reps", type=int, default=3, help="saves per tier in table 2a")
  parser.add_argument("--restore_reps", type=int, default=2, help="restores per tier")
  parser.add_argument("--persistent_min_interval", type=int, default=5,
                      help="table 2b runs the persistent tier only at intervals >= this")
  parser.add_argument("--skip_sync", action="store_true", help="no sync save in table 1")
  parser.add_argument("--skip_disk_local", action="store_true",
                      help="the local tier on /dev/shm only")
  parser.add_argument("--only", default="1,2,3,4,5", help="tables to run")
  args = parser.parse_args()
  args.intervals = [int(k) for k in args.intervals.split(",")]
  only = {int(t) for t in args.only.split(",")}

  started = time.perf_counter()
  state = make_state(args.params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  loop = Loop()
  loop.run(2)
  step_s = loop.time_steps(10) / 10
  mb = nbytes / 2**20
  print(f"\nstate: {args.params / 1e6:.0f}M params x 3 (params, mu, nu) = {mb:,.0f} MiB fp32; "
        f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPU core(s); "
        f"stand-in step {step_s * 1e3:.1f} ms; jax {jax.__version__}, orbax-checkpoint "
        f"{_orbax_version()}; load average {_load()}")
  try:
    if 1 in only:
      persistent_sync_async(args, state, loop, nbytes, step_s)
      _took("table 1", started)
    saves = {}
    if only & {2, 4, 5}:
      saves = per_save(args, state, loop, mesh, nbytes, step_s)
      _took("table 2a", started)
    if 2 in only:
      overhead(args, state, loop, mesh, step_s)
      _took("table 2b", started)
    if 3 in only:
      recovery(args, state, mesh, nbytes)
      _took("table 3", started)
    if 4 in only:
      work_lost(args, step_s, saves)
    if 5 in only:
      shm = tier_specs(args)[0][0]
      pod_table(mb / saves[shm][1])
  finally:
    clean(args)
  print(f"\nbench wall time: {time.perf_counter() - started:.0f} s; load average at the end "
        f"{_load()} (on {os.cpu_count()} cores)")


def _took(what: str, started: float) -> None:
  print(f"[{what} done at {time.perf_counter() - started:.0f} s, load average {_load()}]",
        file=sys.stderr, flush=True)


def _load() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "?"


def _orbax_version() -> str:
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel
  return getattr(orbax.checkpoint, "__version__", "?")


if __name__ == "__main__":
  main()
