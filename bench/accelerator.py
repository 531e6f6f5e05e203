"""The GPU check, in one run on a single-GPU host (bench/accelerator.sh starts it).

1. Kernels against their references on the device: flash, linear and hybrid attention, outputs
   and gradients, bf16 (max abs error against the fp32 reference, and a pass/fail tolerance).
2. Flash attention speed against `jax.nn.dot_product_attention(implementation='cudnn')`,
   forward + backward, causal (target: at least 0.8x cuDNN's speed).
3. Train-step tokens/s and MFU (against --peak_tflops, 989 for an H100/H200 bf16 dense) of the
   125M and 1B presets in bf16 with flash attention.

`--dry` runs the same code at tiny shapes on CPU (kernels in interpret mode, XLA's attention
instead of cuDNN), so the test suite keeps the script working. Prints a markdown report; with
$OUT set (the device tool's output folder) it is also written to $OUT/accelerator.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _time(fn, *args, iters: int) -> float:
  """Median seconds of one call of a jitted fn (after a warm-up compile)."""
  import jax

  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - t0)
  return sorted(samples)[len(samples) // 2]


def _inputs(shape, kv_heads, seed=0):
  import jax
  import jax.numpy as jnp

  b, s, h, d = shape
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, s, kv_heads, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, s, kv_heads, d), jnp.float32)
  cot = jax.random.normal(ks[3], (b, s, h, d), jnp.float32)
  return q, k, v, cot


def _value_and_grads(fn, q, k, v, cot):
  """(out, dq, dk, dv) of fn at bf16 inputs, as fp32."""
  import jax
  import jax.numpy as jnp

  bf = lambda x: x.astype(jnp.bfloat16)
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v), bf(q), bf(k), bf(v))
  return [x.astype(jnp.float32) for x in (out, *vjp(bf(cot)))]


def check_kernels(dry: bool) -> list[tuple[str, str, float, float, bool]]:
  """[(kernel, tensor, max abs error vs the fp32 reference, tolerance, ok)]."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels import flash_attention as fa
  from pallas_kernels import hybrid_attention as ha
  from pallas_kernels import linear_attention as la
  from pallas_kernels.reference import reference_attention

  shape = (1, 128, 4, 64) if dry else (2, 2048, 8, 128)
  q, k, v, cot = _inputs(shape, kv_heads=2)
  interpret = True if dry else None
  cases = {
      "flash": (lambda q, k, v: fa.flash_attention(q, k, v, causal=True, interpret=interpret),
                lambda q, k, v: reference_attention(q, k, v, causal=True)),
      "flash (window 256)" if not dry else "flash (window 32)": (
          lambda q, k, v: fa.flash_attention(q, k, v, causal=True, interpret=interpret,
                                             sliding_window=32 if dry else 256),
          lambda q, k, v: reference_attention(q, k, v, causal=True,
                                              sliding_window=32 if dry else 256)),
      "linear": (lambda q, k, v: la.linear_attention(q, k, v, interpret=interpret),
                 lambda q, k, v: la.reference_linear_attention_quadratic(q, k, v)),
      "hybrid": (lambda q, k, v: ha.hybrid_attention(q, k, v, window=32, feature="elu+1"),
                 lambda q, k, v: ha.reference_hybrid_attention(q, k, v, window=32,
                                                               feature="elu+1")),
  }
  rows = []
  for name, (kernel, reference) in cases.items():
    got = _value_and_grads(jax.jit(kernel), q, k, v, cot)
    ref_out, ref_vjp = jax.vjp(reference, q, k, v)
    want = [ref_out, *ref_vjp(cot)]
    for tensor, a, b in zip(("out", "dq", "dk", "dv"), got, want):
      err = float(jnp.max(jnp.abs(a - b)))
      tol = 0.05 * max(float(jnp.max(jnp.abs(b))), 1.0)  # bf16 inputs: ~3 significant digits
      rows.append((name, tensor, err, tol, err <= tol))
  return rows


def flash_speed(dry: bool, iters: int) -> list[tuple[str, float, float]]:
  """[(case, pretrainx flash ms, baseline ms)] for forward + backward."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels import flash_attention as fa

  cases = [(1, 256, 4, 64)] if dry else [(4, 4096, 16, 128), (1, 16384, 16, 128)]
  impl = "xla" if dry else "cudnn"
  rows = []
  for b, s, h, d in cases:
    q, k, v, cot = (x.astype(jnp.bfloat16) for x in _inputs((b, s, h, d), kv_heads=h))

    def loss(attn):
      return jax.jit(jax.grad(lambda q, k, v: jnp.vdot(attn(q, k, v), cot).real, (0, 1, 2)))

    ours = loss(lambda q, k, v: fa.flash_attention(q, k, v, causal=True,
                                                   interpret=True if dry else None))
    base = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation=impl))
    rows.append((f"b={b} s={s} h={h} d={d} bf16 causal, vs {impl}",
                 1e3 * _time(ours, q, k, v, iters=iters), 1e3 * _time(base, q, k, v, iters=iters)))
  return rows


def train_throughput(dry: bool, steps: int, peak_tflops: float) -> list[tuple[str, float, float]]:
  """[(preset, tokens/s, MFU)] of the jitted train step on synthetic batches."""
  import jax
  import numpy as np

  from pretrainx.config import parse_gin
  from pretrainx.flops import flops_per_token, mfu
  from pretrainx.train.runtime import build_runtime
  from pretrainx.train.state import create_train_state

  presets = ([("tiny", "gin_configs/tiny.gin", 8, 64)] if dry else
             [("llama_125m", "gin_configs/models/llama_125m.gin", 32, 2048),
              ("llama_1b", "gin_configs/models/llama_1b.gin", 8, 2048)])
  rows = []
  for name, gin_file, batch, seq in presets:
    params = [f"RunConfig.global_batch_size = {batch}", f"RunConfig.seq_len = {seq}",
              "RunConfig.steps = 1000", "MeshConfig.data = -1",
              f"ModelConfig.attention_impl = '{'reference' if dry else 'flash'}'"]
    if not dry:
      params += ["PrecisionConfig.policy = 'bf16_mixed'", "OptimizerConfig.learning_rate = 3e-4"]
    exp = parse_gin([os.path.join(REPO, "gin_configs/runs/pretrain.gin"),
                     os.path.join(REPO, gin_file)] if not dry else [os.path.join(REPO, gin_file)],
                    params + (["STEPS = 1000", f"BATCH_SIZE = {batch}", f"SEQ_LEN = {seq}",
                               "LEARNING_RATE = 3e-4"] if not dry else []))
    rt = build_runtime(exp)
    state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, 0, seq)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, exp.data.vocabulary.vocab_size, (batch, seq + 1)).astype(np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "loss_mask": np.ones((batch, seq), np.int32), "domain": np.zeros(batch, np.int32)}
    device_batch = rt.put_batch(host)
    with rt.scope():
      state, metrics = rt.train_step(state, device_batch)  # compile
      jax.block_until_ready(metrics)
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = rt.train_step(state, device_batch)
      jax.block_until_ready(metrics)
    tps = steps * batch * seq / (time.perf_counter() - t0)
    rows.append((name, tps, mfu(tps, flops_per_token(rt.exp.model, seq),
                                peak_tflops * 1e12 * jax.device_count())))
  return rows


def report(dry: bool, peak_tflops: float) -> tuple[str, bool]:
  import jax

  lines = [f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
           f"{jax.__version__}, {'dry run (tiny shapes, CPU)' if dry else 'full run'}", "",
           "| kernel | tensor | max abs error (bf16 vs fp32 reference) | tolerance | ok |",
           "|---|---|---|---|---|"]
  kernels = check_kernels(dry)
  lines += [f"| {n} | {t} | {e:.3e} | {tol:.3e} | {'yes' if ok else 'NO'} |"
            for n, t, e, tol, ok in kernels]
  lines += ["", "| flash, forward + backward | pretrainx ms | baseline ms | speed vs baseline |",
            "|---|---|---|---|"]
  lines += [f"| {c} | {a:.3f} | {b:.3f} | {b / a:.2f}x |"
            for c, a, b in flash_speed(dry, iters=2 if dry else 20)]
  lines += ["", f"| train step | tokens/s | MFU (peak {peak_tflops:g} TFLOP/s per device) |",
            "|---|---|---|"]
  lines += [f"| {n} | {t:,.0f} | {100 * m:.1f}% |"
            for n, t, m in train_throughput(dry, steps=2 if dry else 20, peak_tflops=peak_tflops)]
  return "\n".join(lines) + "\n", all(ok for *_, ok in kernels)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU (the test suite)")
  parser.add_argument("--peak_tflops", type=float, default=989.0,
                      help="MFU denominator per device (bf16 dense; 989 for H100/H200)")
  args = parser.parse_args()
  if args.dry:
    os.environ["JAX_PLATFORMS"] = "cpu"
  text, ok = report(args.dry, args.peak_tflops)
  sys.stdout.write(text)
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "accelerator.md"), "w", encoding="utf-8") as f:
      f.write(text)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
