"""`pretrainx linearize`: a softmax-attention model made linear, trained back in two stages.

1. Convert the source (a pretrainx run, checkpoint or export, or a Hugging Face directory).
2. Stage 1, attention transfer: only the new feature maps train (pretrainx.linearize.transfer).
3. Stage 2: LoRA on the attention projections with the next-token loss, through the ordinary
   train loop (InitConfig from the stage-1 export, TuneConfig.lora): checkpoints, metrics,
   resumption and all.
4. Report the validation loss and perplexity of the original, converted, stage-1 and stage-2
   models per domain. Generate with the recurrent (constant-memory) form and check it against
   the chunked form. Write report.md, report.json and report.png.
Output directory: stage1/ (its metrics and the params export stage 2 starts from), stage2/ (a
pretrainx run directory), report.md, report.json, report.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import numpy as np
from absl import logging

from pretrainx import storage
from pretrainx.checkpoint import check_directory, save_params
from pretrainx.config import (EmaConfig, Experiment, InitConfig, LinearizeConfig, TuneConfig,
                              check_trainable, experiment_to_gin)
from pretrainx.data.pipeline import TrainBatches, eval_batches
from pretrainx.generate import RECURRENT_IMPLS, generate
from pretrainx.cpt.linearize import (convert_params, layers_to_convert, linearized_config, new_param_paths, teacher_config)
from pretrainx.linearize.transfer import run_transfer
from pretrainx.metrics import MetricWriter, save_figure
from pretrainx.train.eval import evaluate_domains
from pretrainx.config.sources import source_model_config
from pretrainx.train.init import check_param_shapes, initial_state
from pretrainx.train.loop import train
from pretrainx.train.runtime import build_runtime, load_trained


@dataclasses.dataclass
class LinearizeReport:
  rows: list[dict[str, Any]]  # per model: name, tokens, fraction, loss, per-domain loss and ppl
  transfer: list[dict[str, float]]  # stage 1 per-layer MSE on held-out batches, by step
  layers: list[int]  # the converted layers
  sample: str  # stage 2 generation (recurrent form where every layer allows it)
  recurrent: bool  # whether that generation used the recurrent form
  recurrent_matches_chunked: bool | None  # greedy tokens identical in both forms (None: n/a)
  paths: dict[str, str]


def _tokens(exp: Experiment, steps: int) -> int:
  return steps * exp.run.global_batch_size * exp.run.seq_len


def _evaluate(rt, params, host_batches) -> dict[str, float]:
  with rt.scope():
    return evaluate_domains(rt.eval_step, params, rt.put_domain_batches(host_batches))


def _source_params(exp: Experiment, source: str, step: int | None):
  """The teacher's runtime and params: the source loaded as it is."""
  rt = build_runtime(exp)
  with rt.scope():
    state, _ = initial_state(rt, InitConfig(source=source, step=step))
  return rt, state.params


def _stage1(lin: LinearizeConfig, exp: Experiment, rt, params, src_cfg, out: str):
  """Attention transfer from the converted params; returns (params, history)."""
  dst_cfg, run = exp.model, exp.run
  batches = TrainBatches(exp.data, run.seq_len, run.global_batch_size, jax.process_index(),
                         jax.process_count())
  held_out = eval_batches(exp.data, run.seq_len, run.global_batch_size, 1, jax.process_index(),
                          jax.process_count())
  storage.makedirs(out)
  storage.remove(storage.join(out, "metrics.jsonl"))  # stage 1 always runs anew
  writer = MetricWriter(out, enabled=jax.process_index() == 0)
  try:
    with rt.scope():
      result = run_transfer(
          params, student=dst_cfg, teacher=teacher_config(dst_cfg, src_cfg),
          layers=layers_to_convert(src_cfg, lin), trainable_paths=new_param_paths(src_cfg, dst_cfg),
          train_batches=lambda s: rt.put_batch(batches.batch_at(s)),
          eval_batches=[b for bs in rt.put_domain_batches(held_out).values() for b in bs],
          steps=lin.transfer_steps, learning_rate=lin.transfer_lr, mode=lin.transfer_mode,
          eval_every=max(run.log_every, 1),
          on_eval=lambda step, row: writer.write(step, {k: v for k, v in row.items()
                                                        if k != "step"}))
  finally:
    writer.close()
  return result.params, result.history


def _stage2(lin: LinearizeConfig, exp: Experiment, stage1_dir: str, out: str, restart: bool):
  """LoRA with the next-token loss from the stage-1 params; returns the merged params."""
  exp2 = exp.replace(run={"run_dir": out, "steps": lin.lora_steps}, sample={"tokens": 0},
                     optimizer={"learning_rate": lin.lora_lr})
  exp2 = dataclasses.replace(exp2, init=InitConfig(source=stage1_dir),
                             tune=TuneConfig(lora=lin.lora))
  train(exp2, restart=restart)
  rt2, state, _ = load_trained(exp2)
  return rt2.inference_params(state)


def _generation(rt, params, lin: LinearizeConfig, seed: int) -> tuple[str, bool, bool | None]:
  vocab = rt.exp.data.vocabulary
  prompt = vocab.encode(lin.sample_prompt)
  n = max(1, min(lin.sample_tokens, rt.exp.model.max_seq_len - len(prompt)))
  key = jax.random.key(seed)
  with rt.scope():
    first = generate(rt.model, params, prompt, n, rng=key, temperature=0.0, top_k=None)
    recurrent = all(i in RECURRENT_IMPLS for i in rt.exp.model.layer_impls)
    matches = None
    if recurrent:
      chunked = generate(rt.model, params, prompt, n, rng=key, temperature=0.0, top_k=None,
                         recurrent=False)
      matches = bool(np.array_equal(first, chunked))
  return lin.sample_prompt + vocab.decode(first), recurrent, matches


def _row(name: str, tokens: int, pretrain_tokens: int | None, result: dict[str, float]) -> dict:
  domains = {k[:-len("/loss")]: v for k, v in result.items() if k.endswith("/loss")}
  return {"model": name, "tokens": tokens,
          "fraction_of_pretraining": tokens / pretrain_tokens if pretrain_tokens else None,
          "loss": result["loss"], "ppl": math.exp(result["loss"]),
          "domain_loss": domains, "domain_ppl": {d: math.exp(v) for d, v in domains.items()}}


def _check_out_dir(out_dir: str, settings: dict[str, str], restart: bool) -> None:
  """An output directory remembers what it linearized; other settings need --restart (stage 2
  would otherwise resume a run that started from another stage 1)."""
  path = storage.join(out_dir, "linearize_settings.json")
  if storage.exists(path) and not restart:
    old = storage.read_json(path)
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
      raise ValueError(f"{out_dir} holds a linearization with other {', '.join(changed)}; pass "
                       "--restart to start it over, or choose another --out_dir.")
  storage.write_json(path, settings)


def linearize(source: str, exp: Experiment, lin: LinearizeConfig, out_dir: str, *,
              restart: bool = False) -> LinearizeReport:
  """The whole pipeline (module docstring); `exp` gives data, run and optimizer settings, and
  for a Hugging Face source the runtime fields of its ModelConfig (dtype, scan_layers, ...)."""
  out_dir = check_directory(out_dir, "write --out_dir")
  storage.makedirs(out_dir)
  src_cfg, src_exp, src_step = source_model_config(source, like=exp.model)
  dst_cfg = linearized_config(src_cfg, lin)  # bad layers / window fail before any loading
  base = dataclasses.replace(exp, model=src_cfg, init=InitConfig(), tune=TuneConfig(),
                             ema=EmaConfig())
  student = dataclasses.replace(base, model=dst_cfg)
  check_trainable(student)
  _check_out_dir(out_dir, {"source": storage.resolve(source), "linearize": repr(lin),
                           "experiment": experiment_to_gin(student)}, restart)
  rt_t, src_params = _source_params(base, source, src_step)
  rt_s = build_runtime(student)
  params0 = convert_params(src_params, src_cfg, dst_cfg, jax.random.key(exp.run.seed))
  check_param_shapes(params0, rt_s.abstract_state.params, source)
  params0 = jax.device_put(params0, rt_s.shardings.params)
  paths = {name: storage.join(out_dir, name) for name in ("stage1", "stage2")}
  meta = lambda steps: {"step": steps, "config_gin": experiment_to_gin(student)}
  params1, history = params0, []
  if lin.transfer_steps:
    params1, history = _stage1(lin, student, rt_s, params0, src_cfg, paths["stage1"])
  save_params(storage.join(paths["stage1"], "export"), params1, meta(lin.transfer_steps))
  params2 = params1
  if lin.lora_steps:
    params2 = _stage2(lin, student, storage.join(paths["stage1"], "export"), paths["stage2"],
                      restart)
  host = eval_batches(exp.data, exp.run.seq_len, exp.run.global_batch_size, lin.eval_batches,
                      jax.process_index(), jax.process_count())
  pretrain = (_tokens(src_exp, src_step) if src_exp is not None and src_step else None)
  t1, t2 = _tokens(exp, lin.transfer_steps), _tokens(exp, lin.lora_steps)
  rows = [_row("original (softmax)", 0, pretrain, _evaluate(rt_t, src_params, host)),
          _row("converted, untrained", 0, pretrain, _evaluate(rt_s, params0, host)),
          _row("stage 1: attention transfer", t1, pretrain, _evaluate(rt_s, params1, host)),
          _row("stage 2: + LoRA", t1 + t2, pretrain, _evaluate(rt_s, params2, host))]
  sample, recurrent, matches = _generation(rt_s, params2, lin, exp.run.seed)
  report = LinearizeReport(rows, history, layers_to_convert(src_cfg, lin), sample, recurrent,
                           matches, paths)
  write_report(report, out_dir, source)
  logging.info("linearize: report in %s", out_dir)
  return report


# ----------------------------------------------------------------------------- report


def report_markdown(report: LinearizeReport, source: str) -> str:
  domains = list(report.rows[0]["domain_ppl"])
  lines = [f"# Linearizing {source}", "",
           f"Converted layers: {report.layers}.", "",
           "| model | tokens trained | of pretraining | val loss | ppl | " +
           " | ".join(f"ppl {d}" for d in domains) + " |",
           "|---|---:|---:|---:|---:|" + "---:|" * len(domains)]
  for r in report.rows:
    frac = ("" if r["fraction_of_pretraining"] is None
            else f"{100 * r['fraction_of_pretraining']:.1f}%")
    lines.append(f"| {r['model']} | {r['tokens']:,} | {frac} | {r['loss']:.4f} | {r['ppl']:.3f} | "
                 + " | ".join(f"{r['domain_ppl'][d]:.3f}" for d in domains) + " |")
  if report.transfer:
    first, last = report.transfer[0], report.transfer[-1]
    lines += ["", "Stage 1 attention-output MSE per layer (held-out batches):", "",
              "| layer | step 0 | step " + f"{last['step']} |", "|---|---:|---:|"]
    for i in report.layers:
      key = f"mse/layer_{i}"
      lines.append(f"| {i} | {first[key]:.3e} | {last[key]:.3e} |")
  form = "recurrent (constant-memory)" if report.recurrent else "chunked (some layers softmax)"
  lines += ["", f"Generation ({form}, greedy):", "", "```", report.sample, "```"]
  if report.recurrent_matches_chunked is not None:
    lines.append(f"Recurrent and chunked forms generate the same tokens: "
                 f"{'yes' if report.recurrent_matches_chunked else 'NO'}.")
  return "\n".join(lines) + "\n"


def write_report(report: LinearizeReport, out_dir: str, source: str) -> None:
  storage.write_text(storage.join(out_dir, "report.md"), report_markdown(report, source))
  storage.write_text(storage.join(out_dir, "report.json"),
                     json.dumps(dataclasses.asdict(report), indent=1))
  plot_report(report, storage.join(out_dir, "report.png"))


def plot_report(report: LinearizeReport, path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  domains = list(report.rows[0]["domain_ppl"])
  width = 0.8 / len(report.rows)
  for j, r in enumerate(report.rows):
    left.bar(np.arange(len(domains)) + j * width, [r["domain_ppl"][d] for d in domains], width,
             label=r["model"])
  left.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
  left.set_ylabel("validation perplexity")
  left.set_yscale("log")
  top = max(r["domain_ppl"][d] for r in report.rows for d in domains)
  left.set_ylim(top=top * 1.5)  # room for the legend above the bars
  left.legend(fontsize=7, loc="upper right")
  for i in report.layers:
    steps = [h["step"] for h in report.transfer]
    right.plot(steps, [h[f"mse/layer_{i}"] for h in report.transfer], label=f"layer {i}")
  right.set_xlabel("stage 1 step")
  right.set_ylabel("attention-output MSE")
  if report.transfer:
    right.set_yscale("log")
    right.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, path, dpi=110)
  plt.close(fig)
  return path
