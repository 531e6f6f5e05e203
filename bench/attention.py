"""Attention scaling: forward+backward time and compiled peak memory against sequence length for
the materialised reference, flash attention and chunked linear attention (elu+1), causal.

On CPU the Pallas interpret mode is far too slow for a curve, so flash is `blockwise_attention_jax`
(the kernel's algorithm in pure JAX) and linear is the chunked pure-JAX path of
`pallas_kernels.linear_attention`; on GPU both are the Pallas kernels, plus cuDNN (bf16).
Memory = temp + argument + output bytes from `compile().memory_analysis()`; time is the best of
`--repeats` runs after one warm-up. The reference is compiled but not run where its memory would
exceed `--max_ref_gib`.
Run: .venv/bin/python bench/attention.py [--max_seq 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import linear_attention as la
from pallas_kernels.flash_attention import blockwise_attention_jax, flash_attention
from pallas_kernels.reference import reference_attention

GIB = 2**30


def linear_chunked_jax(q, k, v, chunk_size=64):
  """Causal elu+1 linear attention through the chunked lax.scan path (no Pallas interpret).

  linear_attention.py has no public non-Pallas entry point, so this calls its private pieces.
  """
  # pylint: disable=protected-access
  phi_q, phi_k = la._feature_qk(q, k, "elu+1", None)
  log_gamma = la._log_decay(None, q.shape[2])
  out = la._chunked_jax(phi_q, phi_k, v.astype(jnp.float32), log_gamma,
                        min(chunk_size, q.shape[1]), 1e-6)
  return out.astype(q.dtype)


def implementations(backend: str) -> dict:
  """name -> (attention fn (q, k, v) -> out, input dtype)."""
  impls = {"reference": (lambda q, k, v: reference_attention(q, k, v, causal=True), jnp.float32)}
  if backend == "gpu":
    impls["flash"] = (lambda q, k, v: flash_attention(q, k, v, causal=True), jnp.float32)
    impls["linear"] = (lambda q, k, v: la.linear_attention(q, k, v, feature="elu+1"), jnp.float32)
    impls["cudnn"] = (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), jnp.bfloat16)
  else:
    impls["flash"] = (lambda q, k, v: blockwise_attention_jax(q, k, v, causal=True), jnp.float32)
    impls["linear"] = (linear_chunked_jax, jnp.float32)
  return impls


def compile_fwd_bwd(fn, shape, dtype):
  """AOT-compiled grad of sum(fn(q, k, v)) w.r.t. q, k, v, and its memory in bytes."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  arg = jax.ShapeDtypeStruct(shape, dtype)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(arg, arg, arg).compile()
  mem = compiled.memory_analysis()
  return compiled, (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                    + mem.output_size_in_bytes)


def time_it(compiled, args, repeats: int) -> float:
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def measure(impls: dict, seqs: list[int], args: argparse.Namespace) -> dict:
  """(name, seq) -> {'time': s or None, 'mem': bytes}."""
  results = {}
  rng = np.random.default_rng(0)
  for seq in seqs:
    shape = (args.batch, seq, args.heads, args.head_dim)
    data = [rng.standard_normal(shape, np.float32) for _ in range(3)]
    for name, (fn, dtype) in impls.items():
      compiled, mem = compile_fwd_bwd(fn, shape, dtype)
      run = not (name == "reference" and mem > args.max_ref_gib * GIB)
      inputs = [jnp.asarray(x, dtype) for x in data]
      results[name, seq] = {"time": time_it(compiled, inputs, args.repeats) if run else None,
                            "mem": mem}
      del compiled, inputs
  return results


def ratio(a, b) -> str:
  return "-" if a is None or b is None else f"{a / b:.2f}"


def print_tables(results: dict, impls: dict, seqs: list[int]) -> None:
  base = seqs[0]
  print(f"\n| seq | impl | fwd+bwd (s) | time / time({base}) | memory (MiB) | mem / mem({base}) |")
  print("|---|---|---|---|---|---|")
  for seq in seqs:
    for name in impls:
      r, r0 = results[name, seq], results[name, base]
      t = "skipped" if r["time"] is None else f"{r['time']:.4f}"
      print(f"| {seq} | {name} | {t} | {ratio(r['time'], r0['time'])} | "
            f"{r['mem'] / 2**20:,.1f} | {ratio(r['mem'], r0['mem'])} |")
  others = [n for n in impls if n != "reference"]
  print("\n| seq | " + " | ".join(f"{n} / reference time | {n} / reference memory"
                                   for n in others) + " |")
  print("|---|" + "---|---|" * len(others))
  for seq in seqs:
    ref = results["reference", seq]
    cells = [f"{ratio(results[n, seq]['time'], ref['time'])} | "
             f"{ratio(results[n, seq]['mem'], ref['mem'])}" for n in others]
    print(f"| {seq} | " + " | ".join(cells) + " |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--max_seq", type=int, default=16384)
  parser.add_argument("--min_seq", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--max_ref_gib", type=float, default=8.0,
                      help="compile but do not run the reference above this memory")
  args = parser.parse_args()
  seqs = [s for s in (512, 1024, 2048, 4096, 8192, 16384) if args.min_seq <= s <= args.max_seq]
  if not seqs:
    parser.error(f"no sequence length in [{args.min_seq}, {args.max_seq}]; lengths are 512..16384.")
  backend = jax.default_backend()
  impls = implementations(backend)
  start = time.perf_counter()
  results = measure(impls, seqs, args)
  print(f"\n{backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}; batch {args.batch}, "
        f"heads {args.heads}, head_dim {args.head_dim}, causal, best of {args.repeats}; "
        f"{time.perf_counter() - start:.0f} s in all")
  print_tables(results, impls, seqs)


if __name__ == "__main__":
  main()
