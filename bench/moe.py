"""Mixture of experts on a small model: quality at equal active FLOPs, upcycling, routing overhead.

Three measurements on one small byte-level Llama (the tiny preset's shapes, d64, 2 layers, SwiGLU
width 192; 16 x 64 tokens per step, AdamW, cosine schedule; the embedded corpus; the MoE
training runs use impl='ragged'):
1. Equal active FLOPs per token: a dense model against 4 experts with top-1 routing, each expert
   as wide as the dense MLP (so a token runs through the same MLP FLOPs, plus the router), trained
   on the same tokens; params (total / active), FLOPs per token and the validation loss. Top-1
   runs use norm_topk=False (Switch style): with top_k=1 and norm_topk=True the routing weight is
   always 1, and the LM loss then gives the router no gradient.
2. Sparse upcycling: the dense model of (1) after N steps is upcycled to 4 experts top-2
   (norm_topk=True, so every expert starts as a copy of the dense MLP and the function is
   unchanged) and trained K more steps; against the same MoE from scratch for K steps (the same
   tokens in the MoE phase) and for N + K steps (the same tokens in all), and the dense model
   continued for K steps from the same checkpoint. The K-step runs restart the learning-rate
   schedule (warmup, cosine) with a fresh optimizer and read a reshuffled data order (data seed
   1), so they do not replay the dense run's first K batches.
3. Routing overhead: the median train step time (compile excluded) of the dense model, an MoE of
   1 expert top-1 (routing and dispatch only, the same MLP FLOPs), and 4 experts top-1 and top-2
   with impl='einsum' (every expert on every routed row, masked) and impl='ragged'
   (jax.lax.ragged_dot on rows sorted by expert), as ratios to dense. The configurations are
   timed in interleaved rounds on the same batches, so load from other processes spreads over
   all of them; einsum and ragged start from the same init and batches, and their losses after
   the timed steps are printed as a check that both compute the same function.
4. The balance loss: 4 experts top-2 with the Switch balance loss at weight 0 and 0.1 (router
   z-loss off, lr 3e-3), the same init and data for --balance_steps steps; the busiest expert's
   load over the last 10 logged steps (a router left alone collapses onto one expert here).
--parts picks among equal, upcycle, timing and balance (default: all).
Runs go under --out (default /tmp/bench_moe), with a persistent XLA compilation cache there (runs
of one shape compile once). Prints the tables as markdown and writes them to OUT/results.md.
Run: .venv/bin/python bench/moe.py [--steps 300] [--cont_steps 150] [--quick] [--parts balance]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--cpu_devices=")),
                           "auto"))

import jax  # noqa: E402  pylint: disable=wrong-import-position

from pretrainx.config import parse_gin  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.data.pipeline import TrainBatches  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.flops import count_params, flops_per_token  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.metrics import read_metrics  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train import loop  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.runtime import build_runtime  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.state import create_train_state  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("bench.moe")

# 4 experts, each as wide as the dense MLP (expert_mlp_dim None: ModelConfig.mlp_dim). The
# training runs use impl='ragged': it computes the same function as 'einsum' (part 3 checks the
# losses) and is the faster of the two on this CPU.
SWITCH = {"num_experts": 4, "top_k": 1, "norm_topk": False}  # top-1: the router needs p in the output
UPCYCLE = {"num_experts": 4, "top_k": 2, "norm_topk": True}  # exact dense function at step 0
TIMED = {
    "dense": {},
    "1 expert, top-1 (routing only)": {"num_experts": 1, "top_k": 1, "impl": "einsum"},
    "4 experts, top-1, einsum": {**SWITCH, "impl": "einsum"},
    "4 experts, top-1, ragged": {**SWITCH, "impl": "ragged"},
    "4 experts, top-2, einsum": {**UPCYCLE, "impl": "einsum"},
    "4 experts, top-2, ragged": {**UPCYCLE, "impl": "ragged"},
}


def base_experiment(args):
  exp = parse_gin([os.path.join(REPO, "gin_configs/tiny.gin")])
  return exp.replace(
      model={"scan_layers": False},
      run={"global_batch_size": args.batch, "seq_len": args.seq_len, "log_every": 10,
           "eval_every": 0, "eval_batches": 8, "progress_bar": False, "peak_tflops": 1.0},
      optimizer={"learning_rate": args.lr}, schedule={"warmup_steps": args.warmup},
      sample={"tokens": 0})


def train_run(base, out: str, name: str, steps: int, moe: dict | None = None, source: str = "",
              data_seed: int = 0) -> dict:
  """One loop.train run; returns its final validation loss and router load."""
  exp = base.replace(run={"steps": steps, "run_dir": os.path.join(out, name)},
                     data={"seed": data_seed}, init={"source": source})
  if moe:
    exp = exp.replace(model={"moe": {"impl": "ragged", **moe}})
  log.info("run %s: %d steps%s%s", name, steps, f", moe {moe}" if moe else "",
           f", from {source}" if source else "")
  t0 = time.perf_counter()
  result = loop.train(exp, restart=True)
  rows = read_metrics(result.paths.metrics)
  load = [r["train/moe/load_max"] for r in rows if "train/moe/load_max" in r]
  log.info("run %s: validation loss %.4f, %.0f s", name, result.eval_loss,
           time.perf_counter() - t0)
  params = count_params(exp.model)
  return {"name": name, "dir": result.run_dir, "eval": result.eval_loss, "steps": steps,
          "tokens": steps * exp.run.global_batch_size * exp.run.seq_len,
          "total": params["total"], "active": params["embedding"] + params["active_non_embedding"],
          "flops": flops_per_token(exp.model, exp.run.seq_len),
          "load_max": load[-1] if load else None, "load_last10": load[-10:],
          "wall": time.perf_counter() - t0}


def time_steps(base, rounds: int, steps_per_round: int) -> dict[str, dict]:
  """Median step seconds per TIMED config, interleaved in rounds on the same batches (each step
  timed on its own, to the end of its computation)."""
  data = TrainBatches(base.data, base.run.seq_len, base.run.global_batch_size)
  host = [data.batch_at(k) for k in range(1 + rounds * steps_per_round)]
  runs = {}
  for name, moe in TIMED.items():
    exp = base.replace(model={"moe": moe}) if moe else base
    rt = build_runtime(exp)
    with rt.scope():
      state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, 0,
                                    exp.run.seq_len)
      batches = [rt.put_batch(b) for b in host]
      t0 = time.perf_counter()
      state, metrics = rt.train_step(state, batches[0])
      jax.block_until_ready(metrics)
    log.info("timing %s: first step (compile or cache) %.1f s", name, time.perf_counter() - t0)
    runs[name] = {"rt": rt, "state": state, "batches": batches, "times": []}
  for r in range(rounds):
    for name, run in runs.items():
      rt = run["rt"]
      with rt.scope():
        for k in range(steps_per_round):
          t0 = time.perf_counter()
          run["state"], metrics = rt.train_step(run["state"],
                                                run["batches"][1 + r * steps_per_round + k])
          jax.block_until_ready(metrics)
          run["times"].append(time.perf_counter() - t0)
      run["loss"] = float(metrics["loss"])
    log.info("timing round %d/%d done", r + 1, rounds)
  return {name: {"step": statistics.median(run["times"]), "loss": run["loss"]}
          for name, run in runs.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="N: dense steps (and part 1's)")
  parser.add_argument("--cont_steps", type=int, default=150, help="K: steps after upcycling")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--lr", type=float, default=5e-3)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--timing_rounds", type=int, default=3)
  parser.add_argument("--timing_steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--quick", action="store_true", help="a smoke run: 30 + 15 steps")
  parser.add_argument("--balance_steps", type=int, default=60)
  parser.add_argument("--parts", default="equal,upcycle,timing,balance",
                      help="comma-separated: equal, upcycle, timing, balance")
  parser.add_argument("--out", default="/tmp/bench_moe")
  parser.add_argument("--cpu_devices", default="auto")
  args = parser.parse_args()
  if args.quick:
    args.steps, args.cont_steps, args.warmup, args.timing_rounds, args.timing_steps = 30, 15, 5, 2, 3
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s bench.moe %(message)s", "%H:%M:%S"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False

  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # runs of one shape compile once
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  parts = set(args.parts.split(","))
  if parts - {"equal", "upcycle", "timing", "balance"}:
    parser.error(f"--parts: unknown {sorted(parts - {'equal', 'upcycle', 'timing', 'balance'})}")
  start = time.perf_counter()
  base = base_experiment(args)
  n, k = args.steps, args.cont_steps
  per_step = args.batch * args.seq_len
  lines = []

  def load(r):
    return f"{r['load_max']:.2f}" if r["load_max"] is not None else "–"

  if parts & {"equal", "upcycle"}:
    dense = train_run(base, args.out, "dense", n)
  if "equal" in parts:
    switch = train_run(base, args.out, "switch_e4k1", n, SWITCH)
    lines += ["", "| model | params total / active | FLOPs/token | tokens | val loss "
              "| busiest expert load ×E |", "|---|---|---|---|---|---|"]
    for label, r in (("dense", dense), ("4 experts, top-1 (Switch, norm_topk=False)", switch)):
      lines.append(f"| {label} | {r['total']:,} / {r['active']:,} | {r['flops']:,.0f} "
                   f"| {r['tokens']:,} | {r['eval']:.4f} | {load(r)} |")
  if "upcycle" in parts:
    upcycled = train_run(base, args.out, "upcycled_e4k2", k, UPCYCLE, source=dense["dir"],
                         data_seed=1)
    scratch_k = train_run(base, args.out, "scratch_e4k2_K", k, UPCYCLE, data_seed=1)
    scratch_nk = train_run(base, args.out, "scratch_e4k2_NK", n + k, UPCYCLE)
    dense_k = train_run(base, args.out, "dense_continued", k, source=dense["dir"], data_seed=1)
    lines += ["", "| run | steps (tokens) in the MoE phase | total tokens | FLOPs/token (phase) "
              "| val loss | busiest expert load ×E |", "|---|---|---|---|---|---|"]
    rows = ((f"dense, {n} steps (the upcycling source)", dense, 0, n),
            (f"upcycled: dense {n} + MoE {k}", upcycled, k, n + k),
            (f"MoE from scratch, {k} steps", scratch_k, k, k),
            (f"MoE from scratch, {n + k} steps", scratch_nk, n + k, n + k),
            (f"dense {n} + dense continued {k}", dense_k, 0, n + k))
    for label, r, moe_steps, total in rows:
      phase = f"{moe_steps} ({moe_steps * per_step:,})" if moe_steps else "–"
      lines.append(f"| {label} | {phase} | {total * per_step:,} | {r['flops']:,.0f} "
                   f"| {r['eval']:.4f} | {load(r)} |")
  if "timing" in parts:
    timing = time_steps(base.replace(run={"steps": n}), args.timing_rounds, args.timing_steps)
    ref = timing["dense"]["step"]
    lines += ["", f"Median of {args.timing_rounds}x{args.timing_steps} steps, interleaved:", "",
              "| model | step (ms) | × dense | loss after the timed steps |", "|---|---|---|---|"]
    for name, t in timing.items():
      lines.append(f"| {name} | {1e3 * t['step']:.1f} | {t['step'] / ref:.2f}x "
                   f"| {t['loss']:.5f} |")
  if "balance" in parts:
    lines += ["", f"The balance loss, 4 experts top-2, {args.balance_steps} steps, lr 3e-3, "
              "router z-loss off:", "", "| balance loss weight | busiest expert load ×E, mean "
              "of the last 10 logged steps | val loss |", "|---|---|---|"]
    every_step = base.replace(optimizer={"learning_rate": 3e-3}, run={"log_every": 1})
    for weight in (0.0, 0.1):
      r = train_run(every_step, args.out, f"balance_{weight:g}", args.balance_steps,
                    {"num_experts": 4, "top_k": 2, "balance_loss": weight, "router_z_loss": 0.0})
      lines.append(f"| {weight:g} | {statistics.mean(r['load_last10']):.2f} | {r['eval']:.4f} |")
  wall = time.perf_counter() - start
  lines.insert(0, f"{jax.device_count()} {jax.default_backend()} device(s), jax "
               f"{jax.__version__}; {args.batch}x{args.seq_len} tokens/step, lr {args.lr:g} "
               f"cosine, warmup {args.warmup}; N={n}, K={k}; parts {args.parts}; wall "
               f"{wall / 60:.1f} min")
  text = "\n".join(lines)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  log.info("done in %.1f min; tables in %s", wall / 60, os.path.join(args.out, "results.md"))
  print("\n" + text)


if __name__ == "__main__":
  main()
