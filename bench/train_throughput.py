"""Training throughput of pretrainx on this machine, optionally against PyTorch/transformers.

For the tiny, quickstart and d512 configs: tokens/s, MFU against the measured matmul peak, step
time and compile time. Where torch and transformers are installed, LlamaForCausalLM of the same
config is trained on the same batches in rounds that alternate with pretrainx's, and the tokens/s
ratio of the median rounds is printed.
Run: .venv/bin/python bench/train_throughput.py [--steps 10] [--rounds 3] [--min_round_seconds 2]
     [--configs tiny,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pretrainx.cli import configure_cpu_devices

# As the CLI does: on a CPU host, one XLA device per core (set before jax is imported).
configure_cpu_devices(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--cpu_devices=")),
                           "auto"))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from pretrainx.config import Experiment, parse_gin
from pretrainx.data.pipeline import TrainBatches
from pretrainx.flops import flops_per_token, machine_peak_flops, measure_peak_flops
from pretrainx.train.runtime import build_runtime
from pretrainx.train.state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Configs beyond the gin files: a name -> (gin file, bindings). 'd512' is issue 22's second model
# (embed 512, 8 layers, seq 512, batch 8), on the quickstart's data and optimizer.
VARIANTS = {"d512": ("quickstart", [
    "ModelConfig.embed_dim = 512", "ModelConfig.num_layers = 8", "ModelConfig.num_heads = 8",
    "ModelConfig.num_kv_heads = 4", "ModelConfig.mlp_dim = 1536", "SEQ_LEN = 512",
    "BATCH_SIZE = 8"])}


def pretrainx_stepper(exp: Experiment, batches: list[dict]):
  """Compiles the train step on batches[0]; -> (compile_s, timed), where timed() trains on
  batches[1:] and returns (seconds a step, last loss)."""
  rt = build_runtime(exp)
  with rt.scope():
    state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, 0,
                                  exp.run.seq_len)
    device_batches = [rt.put_batch(b) for b in batches]
    t0 = time.perf_counter()
    state, m = rt.train_step(state, device_batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0

  def timed():
    nonlocal state
    with rt.scope():
      t0 = time.perf_counter()
      for b in device_batches[1:]:
        state, m = rt.train_step(state, b)
      jax.block_until_ready(m)
    return (time.perf_counter() - t0) / (len(batches) - 1), float(m["loss"])

  return compile_s, timed


def torch_stepper(exp: Experiment, batches: list[dict]):
  """LlamaForCausalLM of the same config, AdamW, clip 1.0, fp32; -> timed() as above, or None
  where torch or transformers is not installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  m = exp.model
  cfg = transformers.LlamaConfig(
      vocab_size=m.padded_vocab_size, hidden_size=m.embed_dim, intermediate_size=m.mlp_dim,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.resolved_head_dim,
      max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
      tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=exp.optimizer.learning_rate,
                          weight_decay=exp.optimizer.weight_decay, betas=(0.9, 0.95))

  def step(b):
    inputs = torch.from_numpy(b["inputs"].astype(np.int64))
    labels = torch.from_numpy(np.where(b["loss_mask"] > 0, b["targets"], -100).astype(np.int64))
    logits = model(input_ids=inputs, position_ids=torch.from_numpy(
        b["positions"].astype(np.int64))).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                             ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  step(batches[0])

  def timed():
    t0 = time.perf_counter()
    for b in batches[1:]:
      loss = step(b)
    return (time.perf_counter() - t0) / (len(batches) - 1), float(loss.detach())

  return timed


def at_least(timed, seconds: float):
  """timed() repeated back to back until `seconds` have passed; -> the same (seconds a step, last
  loss), over all its passes. A round of the tiny model's 10 ms steps is otherwise a few dozen
  milliseconds, shorter than the stalls of a shared VM."""

  def round_():
    t0, per_step, loss = time.perf_counter(), [], None
    while not per_step or time.perf_counter() - t0 < seconds:
      step_s, loss = timed()
      per_step.append(step_s)
    return sum(per_step) / len(per_step), loss

  return round_


def bench(exp: Experiment, batches: list[dict], peak: float, rounds: int,
          min_round_s: float = 0.0) -> tuple[dict, dict | None]:
  """Times both frameworks in alternating rounds, so that a host whose speed drifts (a shared
  VM) slows both alike; each side's step time is its median round, and a round lasts at least
  min_round_s (the batches again, as often as needed)."""
  compile_s, ours = pretrainx_stepper(exp, batches)
  theirs = torch_stepper(exp, batches)
  ours = at_least(ours, min_round_s)
  theirs = at_least(theirs, min_round_s) if theirs is not None else None
  times = {"pretrainx": [], "torch": []}
  for _ in range(rounds):
    times["pretrainx"].append(ours())
    if theirs is not None:
      times["torch"].append(theirs())
  tokens = exp.run.global_batch_size * exp.run.seq_len

  def summary(rows):
    step_s = sorted(r[0] for r in rows)[len(rows) // 2]
    return {"tokens/s": tokens / step_s, "step_s": step_s, "loss": rows[-1][1],
            "rounds": [tokens / r[0] for r in rows]}

  result = summary(times["pretrainx"])
  result.update(compile_s=compile_s,
                mfu=result["tokens/s"] * flops_per_token(exp.model, exp.run.seq_len) / peak)
  return result, (summary(times["torch"]) if times["torch"] else None)


def _torch_threads() -> str:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return "n/a"
  return str(torch.get_num_threads())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps a round (at least)")
  parser.add_argument("--min_round_seconds", type=float, default=2.0,
                      help="a round repeats its steps until it has lasted this long")
  parser.add_argument("--rounds", type=int, default=3,
                      help="rounds, alternating pretrainx and PyTorch; the median round counts")
  parser.add_argument("--configs", default="tiny,quickstart,d512",
                      help=f"gin files under gin_configs/, or {', '.join(VARIANTS)}")
  parser.add_argument("--cpu_devices", default="auto", help="as in `python -m pretrainx`")
  args = parser.parse_args()
  peak = machine_peak_flops(measure_peak_flops())
  rows = []
  for name in args.configs.split(","):
    gin_name, bindings = VARIANTS.get(name, (name, []))
    exp = parse_gin([os.path.join(REPO, f"gin_configs/{gin_name}.gin")],
                    ["RunConfig.progress_bar = False", *bindings])
    data = TrainBatches(exp.data, exp.run.seq_len, exp.run.global_batch_size)
    batches = [data.batch_at(k) for k in range(args.steps + 1)]
    ours, theirs = bench(exp, batches, peak, args.rounds, args.min_round_seconds)
    rows.append((name, exp, ours, theirs))
  print(f"\nmeasured matmul peak: {peak / 1e9:.1f} GFLOP/s on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}, {jax.device_count()} devices, data-parallel); {args.rounds} "
        f"rounds of {args.steps} timed steps (repeated to {args.min_round_seconds:g} s) after one "
        f"compile step, alternating with PyTorch "
        f"({_torch_threads()} threads); the median round\n")
  print("| config | tokens/step | pretrainx tok/s | MFU | step (s) | compile (s) "
        "| PyTorch tok/s | pretrainx / PyTorch |")
  print("|---|---|---|---|---|---|---|---|")
  ratios = {}
  for name, exp, ours, theirs in rows:
    t_tps = f"{theirs['tokens/s']:,.0f}" if theirs else "n/a"
    ratio = f"{ours['tokens/s'] / theirs['tokens/s']:.2f}x" if theirs else "n/a"
    print(f"| {name} | {exp.run.global_batch_size * exp.run.seq_len} | {ours['tokens/s']:,.0f} "
          f"| {100 * ours['mfu']:.1f}% | {ours['step_s']:.3f} | {ours['compile_s']:.1f} "
          f"| {t_tps} | {ratio} |")
    if theirs:
      ratios[name] = [f"{a / b:.2f}" for a, b in zip(ours["rounds"], theirs["rounds"])]
  if ratios:
    print("\npretrainx / PyTorch in each round: " + "; ".join(
        f"{name} {', '.join(r)}" for name, r in ratios.items()))


if __name__ == "__main__":
  main()
