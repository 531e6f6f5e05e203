"""Command line: `python -m pretrainx {train,eval,generate,export,score,data,distill,convert,
merge,vocab,schedule,sweep,linearize,fit,plan,peak,goodput} ...`.

Every subcommand takes gin files and `--gin_param` overrides (eval and generate default to the
config.gin a run wrote). Bad input ends with one clear message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from absl import logging

from pretrainx import storage


def _add_gin_flags(p: argparse.ArgumentParser, run_dir_help: str) -> None:
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin config file; repeat to layer files (later ones win)")
  p.add_argument("--gin_param", action="append", default=[],
                 help="one gin binding, e.g. --gin_param='RunConfig.steps=50'; applied last")
  p.add_argument("--run_dir", default=None, help=run_dir_help)


def _add_ray_flags(p: argparse.ArgumentParser, what: str) -> None:
  p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                 help=f"{what}: on the cluster at ADDRESS (HOST:PORT, ray://HOST:PORT, 'auto' "
                      "for $RAY_ADDRESS or the one this machine runs), or with no ADDRESS on a "
                      "local cluster started here; without --ray, the same work runs in this "
                      "process")
  p.add_argument("--ray_cpus", type=int, default=None,
                 help="CPUs of the local cluster --ray starts (default: every core)")


def _cluster(args):
  """The Ray cluster --ray names, or in-process."""
  from pretrainx import cluster  # pylint: disable=import-outside-toplevel

  if args.ray is None:
    return cluster.IN_PROCESS
  return cluster.connect(args.ray, num_cpus=args.ray_cpus)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="pretrainx", description=__doc__.splitlines()[0])
  parser.add_argument(
      "--cpu_devices", default="auto",
      help="XLA devices to split a CPU host into (data-parallel over them runs the elementwise "
           "work of each device on its own core: ~20%% faster on 2 cores). 'auto': the largest "
           "power of two <= the core count, at most 8; 1: one device. Only affects the CPU "
           "backend; ignored when XLA_FLAGS already sets a host device count.")
  dist = parser.add_argument_group("multi-process (one process per host, or several on one)")
  dist.add_argument("--coordinator_address", default=None,
                    help="host:port of process 0; with --num_processes > 1 this process joins a "
                         "jax.distributed job (launch/local_multiprocess.sh starts one locally). "
                         "On a multi-host TPU VM slice no flag is needed: every host joins by "
                         "itself (PRETRAINX_NO_DISTRIBUTED=1 opts out)")
  dist.add_argument("--num_processes", type=int, default=1)
  dist.add_argument("--process_id", type=int, default=0)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("train", help="train (or resume) a model from gin configs")
  _add_gin_flags(p, "run directory (overrides RunConfig.run_dir)")
  p.add_argument("--restart", action="store_true",
                 help="discard the run directory's checkpoints and metrics instead of resuming")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="MFU denominator for the whole job, e.g. 989 for one H100 (bf16 dense); "
                      "default: measure this machine")

  p = sub.add_parser("eval", help="validation loss of a checkpoint")
  _add_gin_flags(p, "run directory whose config.gin and checkpoints to use")
  p.add_argument("--checkpoint_dir", default=None, help="default: RUN_DIR/checkpoints")
  p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  p.add_argument("--eval_batches", type=int, default=None, help="default: the whole split")
  p.add_argument("--harness_tasks", default=None,
                 help="lm-evaluation-harness tasks, comma-separated (instead of the validation "
                      "loss); metrics go to RUN_DIR/metrics.jsonl and TensorBoard as "
                      "harness/TASK/METRIC, the report to RUN_DIR/harness/step_N.json")
  p.add_argument("--harness_include", default=None,
                 help="a directory of task YAML files in lm-eval's format (local data files)")
  p.add_argument("--harness_limit", type=int, default=None, help="documents per task")
  p.add_argument("--harness_fewshot", type=int, default=None, help="few-shot examples per task")
  p.add_argument("--harness_max_length", type=int, default=None,
                 help="tokens of context per scored row and generation (default: "
                      "HarnessConfig.max_length, else RunConfig.seq_len); lm-eval's hf backend "
                      "uses max_position_embeddings (ModelConfig.max_seq_len): pass that to get "
                      "its numbers")
  p.add_argument("--harness_report", default=None,
                 help="where the JSON report goes (default: RUN_DIR/harness/step_N.json)")
  p.add_argument("--needle", default=None, metavar="KINDS",
                 help="long-context retrieval instead of the validation loss: 'passkey', "
                      "'needle' or both, comma-separated, hidden in the run's own validation "
                      "text (LongContextEvalConfig; gin bindings apply, these flags win); "
                      "writes RUN_DIR/long_context/KIND_grid.json and .png")
  p.add_argument("--needle_lengths", default=None,
                 help="prompt lengths in the model's tokens, e.g. 256,512,1024")
  p.add_argument("--needle_depths", default=None,
                 help="needle depths as fractions of the haystack, e.g. 0,0.5,1")
  p.add_argument("--needle_samples", type=int, default=None, help="prompts per length x depth")
  p.add_argument("--needle_domain", default=None,
                 help="the domain whose validation split is the haystack (default: the first)")
  p.add_argument("--needle_dir", default=None,
                 help="where the grids go (default: RUN_DIR/long_context)")

  p = sub.add_parser(
      "score", help="a score per document into its token store (TASK --by=...), or per-token "
      "log-probs as JSON lines (--input/--domain --out, Min-K%%)")
  p.add_argument("task", nargs="?", default=None,
                 help="with --by: a DataConfig domain (a task or 'prose'/'code') whose token "
                      "store gets a score per document, as a named, versioned score set")
  p.add_argument("--by", choices=("perplexity", "reference_ratio", "file"), default=None,
                 help="perplexity: exp(mean NLL per token) under the run's checkpoint; "
                      "reference_ratio: mean NLL under --reference_run_dir's model / mean NLL "
                      "under the run's (high: the run's model finds the document much easier "
                      "than the reference); file: values from --scores_file")
  p.add_argument("--name", default=None, help="with --by: the score set's name (default: --by)")
  _add_gin_flags(p, "run directory whose config.gin and checkpoints to use")
  p.add_argument("--checkpoint_dir", default=None, help="default: RUN_DIR/checkpoints")
  p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  p.add_argument("--reference_run_dir", default=None,
                 help="with --by=reference_ratio: the reference model's run directory")
  p.add_argument("--reference_step", type=int, default=None,
                 help="with --by=reference_ratio: its checkpoint (default: the latest)")
  p.add_argument("--scores_file", default=None,
                 help="with --by=file: JSON lines (local or in a bucket), one per document: a "
                      "number (line k scores document k) or an object with --index_field and "
                      "--score_field")
  p.add_argument("--index_field", default="doc", help="with --scores_file: the document index")
  p.add_argument("--score_field", default="score", help="with --scores_file: the score")
  source = p.add_mutually_exclusive_group()
  source.add_argument("--input", help="a JSON-lines file of documents (local or in a bucket)")
  source.add_argument("--domain", help="a DataConfig domain: score its token store's documents")
  p.add_argument("--split", default=None,
                 help="train or validation (default: train with TASK, validation with --domain)")
  p.add_argument("--text_field", default="text", help="with --input: the documents' field")
  p.add_argument("--id_field", default=None, help="with --input: an id field (default: line)")
  p.add_argument("--limit", type=int, default=None, help="score at most this many documents")
  p.add_argument("--min_k", type=float, default=0.2, help="the K of the Min-K%% score")
  p.add_argument("--out", default=None, help="with --input/--domain: the JSON-lines file to write")

  p = sub.add_parser("generate", help="sample text from a checkpoint")
  _add_gin_flags(p, "run directory whose config.gin and checkpoints to use")
  p.add_argument("--checkpoint_dir", default=None, help="default: RUN_DIR/checkpoints")
  p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  p.add_argument("--prompt", default="def ")
  p.add_argument("--max_new_tokens", type=int, default=200)
  p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
  p.add_argument("--top_k", type=int, default=40, help="0 disables top-k filtering")
  p.add_argument("--seed", type=int, default=0)

  p = sub.add_parser("export", help="write a checkpoint's params only (no optimizer state)")
  _add_gin_flags(p, "run directory whose config.gin and checkpoints to use")
  p.add_argument("--checkpoint_dir", default=None, help="default: RUN_DIR/checkpoints")
  p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  p.add_argument("--out", required=True, help="directory to write (Orbax, params + meta)")

  p = sub.add_parser("data", help="prepare or inspect token stores (data prepare|inspect NAME...)")
  p.add_argument("action", choices=("prepare", "inspect"))
  p.add_argument("names", nargs="*",
                 help="domains/tasks (embedded-corpus domains or DataConfig.tasks names); "
                      "default: every domain of DataConfig.domains")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin config defining DataConfig (its tasks, vocabulary, store_dir)")
  p.add_argument("--gin_param", action="append", default=[], help="one gin binding")
  p.add_argument("--split", action="append", default=None,
                 help="split(s) to prepare or inspect (default: train and validation)")
  p.add_argument("--overwrite", action="store_true", help="rebuild stores that already exist")
  p.add_argument("--num_docs", type=int, default=3, help="documents shown by inspect")
  _add_ray_flags(p, "tokenize each input file as a Ray task")

  p = sub.add_parser("distill", help="knowledge distillation's offline work (distill cache: a "
                     "teacher's top-k log-probs over a token store)")
  p.add_argument("action", choices=("cache",))
  p.add_argument("--teacher", default=None,
                 help="the teacher's source (overrides DistillConfig.teacher): a pretrainx run, "
                      "checkpoints directory or params export, or a Hugging Face model directory")
  p.add_argument("--teacher_step", type=int, default=None,
                 help="the teacher's checkpoint step (default: DistillConfig.teacher_step, or "
                      "its newest)")
  p.add_argument("--task", required=True,
                 help="the DataConfig domain (a task or 'prose'/'code') whose store is cached")
  p.add_argument("--split", default="train")
  p.add_argument("--name", default="teacher", help="the cache's name in the store")
  p.add_argument("--k", type=int, default=32, help="teacher tokens kept per position")
  p.add_argument("--seq_len", type=int, default=None,
                 help="the pieces' length the teacher sees (default: RunConfig.seq_len)")
  p.add_argument("--batch_rows", type=int, default=None,
                 help="rows per teacher forward (default: RunConfig.global_batch_size)")
  p.add_argument("--parts", type=int, default=1,
                 help="ranges of documents computed apart (one Ray task each with --ray)")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin config of the experiment (its model, data, DistillConfig); repeat to "
                      "layer files")
  p.add_argument("--gin_param", action="append", default=[], help="one gin binding")
  _add_ray_flags(p, "compute each part as a Ray task that loads the teacher itself")

  p = sub.add_parser("convert", help="Hugging Face <-> pretrainx checkpoints (Llama, Mistral, "
                     "Qwen2, Mixtral, Qwen2-MoE)")
  p.add_argument("src", help="an HF model directory, or a pretrainx params export")
  p.add_argument("out", help="directory to write")
  p.add_argument("--direction", choices=("hf-to-pretrainx", "pretrainx-to-hf"), default=None,
                 help="default: from what SRC holds")
  p.add_argument("--architecture", default=None,
                 help="HF architecture to write (LlamaForCausalLM, MistralForCausalLM, "
                      "Qwen2ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM); default: "
                      "the one imported from")
  p.add_argument("--dtype", default=None, help="dtype of the written weights (default: as stored)")

  p = sub.add_parser("merge", help="merge models (linear, task arithmetic, TIES, DARE, SLERP) or "
                     "average a run's last checkpoints (LAWA) into an export or HF directory")
  p.add_argument("sources", nargs="+",
                 help="the models: pretrainx runs (their newest checkpoint), checkpoints "
                      "directories, params exports or Hugging Face directories of one "
                      "architecture; with --average_last, ONE run")
  p.add_argument("--method", default="linear",
                 choices=("linear", "task_arithmetic", "ties", "dare", "dare_ties", "slerp"))
  p.add_argument("--base", default=None,
                 help="the base model whose task vectors (model - base) task_arithmetic, ties and "
                      "dare merge")
  p.add_argument("--weights", default=None,
                 help="comma-separated, one per source (signed; default all 1)")
  p.add_argument("--density", type=float, default=1.0,
                 help="ties: the fraction of each task vector kept; dare: the survival probability")
  p.add_argument("--t", type=float, default=0.5, help="slerp: 0 is the first model, 1 the second")
  p.add_argument("--seed", type=int, default=0, help="dare's drop masks")
  p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                 help="divide by the weights' sum (default: linear and ties do, as mergekit)")
  p.add_argument("--params_file", default=None,
                 help="JSON list of [regex, {weights|density|t|normalize: value}] per-parameter "
                      "overrides; the first regex found in a param's name (e.g. "
                      "'layers/attention/q_proj') wins")
  p.add_argument("--average_last", type=int, default=None,
                 help="LAWA: average the run's last K finalised checkpoints")
  p.add_argument("--every", type=int, default=None,
                 help="with --average_last: checkpoints every N steps back from the newest")
  p.add_argument("--group_mib", type=int, default=1024,
                 help="params merged at a time, per model (MiB of each model read at once)")
  p.add_argument("--out", required=True, help="directory to write (a params export)")
  p.add_argument("--hf", action="store_true", help="write a Hugging Face directory instead")

  p = sub.add_parser("vocab", help="extend a Hugging Face BPE tokenizer for a new language "
                     "(vocab extend: new merges appended, old ids kept, fertility before/after)")
  p.add_argument("action", choices=("extend",))
  p.add_argument("--tokenizer", required=True,
                 help="the source's tokenizer.json, or the directory holding it")
  p.add_argument("--data", required=True,
                 help="glob of the new language's text (.txt, .jsonl with 'text', .parquet)")
  p.add_argument("--add", type=int, required=True, help="how many new tokens to learn")
  p.add_argument("--out", required=True, help="directory to write the extended tokenizer into")
  p.add_argument("--heldout", default=None,
                 help="glob of held-out text for the fertility (default: every 10th document "
                      "of --data, or the last tenth of one document's lines, not learned from)")

  p = sub.add_parser("schedule", help="preview a run's learning-rate schedule as a PNG and table")
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin_param", action="append", default=[])
  p.add_argument("--out", default="lr_schedule.png", help="PNG to write")

  p = sub.add_parser("sweep", help="run (or continue) a sweep of runs from a SweepConfig gin file")
  p.add_argument("sweep_file", help="gin file binding SweepConfig (see gin_configs/sweeps/)")
  p.add_argument("--dry_run", "--dry-run", action="store_true",
                 help="list the grid points and what each would run; run nothing")
  p.add_argument("--only", action="append", default=None,
                 help="run only this grid point (run name or config hash); repeatable")
  _add_ray_flags(p, "run every unfinished grid point as a Ray task (SweepConfig.cpus_per_run "
                    "CPUs, or one whole SweepConfig.tpu slice), retried up to "
                    "SweepConfig.max_retries times")
  p.add_argument("--workdir", default=None,
                 help="with --ray: the directory each run starts in on its worker, where the "
                      "sweep's relative gin paths resolve (default: this directory)")

  p = sub.add_parser("linearize", help="linearize a softmax-attention model (LoLCATs): convert, "
                     "attention transfer, LoRA, report")
  p.add_argument("--from", dest="source", required=True,
                 help="the model to linearize: a pretrainx run, checkpoints directory or params "
                      "export, or a Hugging Face model directory")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin files binding LinearizeConfig and the data/run/optimizer settings "
                      "(see gin_configs/linearize/)")
  p.add_argument("--gin_param", action="append", default=[], help="one gin binding")
  p.add_argument("--out_dir", default="runs/linearize", help="where the stages and report go")
  p.add_argument("--restart", action="store_true", help="start stage 2 over instead of resuming")

  p = sub.add_parser("fit", help="fit scaling laws to a sweep's results table")
  p.add_argument("results", help="a sweep's results table: the directory of JSON row files "
                                 "(SweepConfig.results, local or in a bucket), or a CSV/Parquet "
                                 "file of N, D, loss (also an older SQLite file)")
  p.add_argument("--out_dir", default=None, help="where plots and fit.json go (default: beside it)")
  p.add_argument("--target_compute", type=float, default=None, help="FLOPs to extrapolate to")
  p.add_argument("--bootstrap", type=int, default=100,
                 help="resamples behind the 95%% intervals (each refits the law; default 100)")

  sub.add_parser("plan", help="AOT-compile the train step for N devices; memory per device "
                 "(flags: --gin_file, --gin_param, --devices, --mesh, --hbm_gib, --json)",
                 add_help=False)

  p = sub.add_parser("peak", help="measure this machine's jitted matmul FLOP/s (MFU denominator)")
  p.add_argument("--size", type=int, default=None,
                 help="matrix size (default: 512 on CPU, 4096 on accelerators)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")

  p = sub.add_parser("goodput", help="a run's goodput: productive step time / total wall time "
                     "over every attempt, with the badput broken down (RUN_DIR/goodput.jsonl)")
  p.add_argument("--run_dir", required=True, help="the run directory (local or in a bucket)")
  p.add_argument("--json", action="store_true", help="print the summary as JSON")
  return parser


def _experiment(args, for_training: bool):
  from pretrainx import config  # pylint: disable=import-outside-toplevel

  params = list(args.gin_param)
  if args.run_dir is not None and (for_training or args.gin_file):
    params.append(f"RunConfig.run_dir = {args.run_dir!r}")
  if for_training or args.gin_file:
    return config.parse_gin(args.gin_file, params)
  if args.run_dir is None:
    raise ValueError("pass --run_dir of a trained run (or --gin_file describing the model).")
  return config.load_run_experiment(args.run_dir, tuple(params))


def _out(text: str) -> None:
  """User-facing results on stdout, from process 0 only."""
  if "jax" in sys.modules and sys.modules["jax"].process_index() != 0:
    return
  sys.stdout.write(text.rstrip("\n") + "\n")
  sys.stdout.flush()


def cmd_train(args) -> None:
  from pretrainx.train import loop  # pylint: disable=import-outside-toplevel

  exp = _experiment(args, for_training=True)
  if args.peak_tflops is not None:
    exp = exp.replace(run={"peak_tflops": args.peak_tflops})
  result = loop.train(exp, restart=args.restart)
  _out(loop.result_summary(result))  # a preempted run also exits 0: its checkpoint is complete


def cmd_eval(args) -> None:
  from pretrainx.train import runtime  # pylint: disable=import-outside-toplevel

  exp = _experiment(args, for_training=False)
  if args.needle and args.harness_tasks:
    raise ValueError("--needle and --harness_tasks are separate evaluations; pass one of them.")
  needle = _long_context_setup(args, exp) if args.needle else None  # bad input before loading
  rt, state, step = runtime.load_trained(exp, args.checkpoint_dir, args.step)
  if args.harness_tasks:
    _eval_harness(args, rt, state, step)
    return
  if needle is not None:
    _eval_long_context(args, rt, state, step, *needle)
    return
  r = runtime.evaluate_checkpoint(rt, state, args.eval_batches)
  which = ("the whole validation split" if args.eval_batches is None else
           f"{args.eval_batches} batches per domain")
  domains = {k[:-len("/loss")]: v for k, v in r.items() if k.endswith("/loss")}
  positions = {k.split("/")[-1]: v for k, v in r.items() if k.startswith("loss_by_position/")}
  _out(f"step {step}: validation loss {r['loss']:.4f} nats/token over {r['tokens']:.0f} tokens "
       f"of {which} (unigram-entropy baseline {r['unigram_entropy']:.4f})\n"
       "per-domain validation loss: " + ", ".join(f"{d} {v:.4f}" for d, v in domains.items()) +
       "\nloss by position in the document: " +
       ", ".join(f"{p} {v:.4f}" for p, v in positions.items()))


def _long_context_setup(args, exp):
  """(LongContextEvalConfig from gin and the --needle flags, the haystack text), checked
  against the model and the validation split before any checkpoint is read."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from pretrainx import config  # pylint: disable=import-outside-toplevel
  from pretrainx.harness import long_context  # pylint: disable=import-outside-toplevel

  files = args.gin_file or [config.RunPaths.under(args.run_dir).config]
  cfg = config.parse_gin_with(files, args.gin_param, (config.LongContextEvalConfig,)
                              )[1]["LongContextEvalConfig"]
  flags = {"kinds": args.needle, "lengths": args.needle_lengths, "depths": args.needle_depths,
           "samples": args.needle_samples, "domain": args.needle_domain}
  cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
  long_context.check_lengths(cfg, exp.model.max_seq_len)
  return cfg, long_context.validation_text(exp.data, cfg.domain, cfg.lengths[-1])


def _eval_long_context(args, rt, state, step: int, cfg, text: str) -> None:
  from pretrainx.harness import long_context  # pylint: disable=import-outside-toplevel
  from pretrainx.metrics import MetricWriter  # pylint: disable=import-outside-toplevel

  run_dir = rt.exp.run.run_dir
  out_dir = args.needle_dir or storage.join(run_dir, "long_context")
  grids = long_context.evaluate_grid(rt, rt.inference_params(state), cfg, text=text,
                                     out_dir=out_dir, step=step)
  writer = MetricWriter(run_dir, enabled=_is_main())
  try:
    writer.write(step, long_context.metrics(grids))
  finally:
    writer.close()
  _out(f"step {step}: long-context retrieval accuracy (exact match, {cfg.samples} prompts per "
       "cell)\n" + "\n\n".join(long_context.table(g) for g in grids.values()) +
       f"\ngrids: {storage.join(out_dir, '<kind>_grid.json')} (and .png)")


def _eval_harness(args, rt, state, step: int) -> None:
  import dataclasses  # pylint: disable=import-outside-toplevel

  from pretrainx.harness import runner  # pylint: disable=import-outside-toplevel
  from pretrainx.metrics import MetricWriter  # pylint: disable=import-outside-toplevel

  cfg = dataclasses.replace(rt.exp.harness, tasks=(args.harness_tasks,))
  for field, value in (("include_path", args.harness_include), ("limit", args.harness_limit),
                       ("num_fewshot", args.harness_fewshot),
                       ("max_length", args.harness_max_length)):
    if value is not None:
      cfg = dataclasses.replace(cfg, **{field: value})
  run_dir = rt.exp.run.run_dir
  writer = MetricWriter(run_dir, enabled=_is_main())
  try:
    with rt.scope():
      values, results = runner.run_and_record(rt, rt.inference_params(state), cfg, step,
                                              None if args.harness_report else run_dir, writer)
  finally:
    writer.close()
  if args.harness_report and _is_main():
    runner.write_report(args.harness_report, results, step)
  where = args.harness_report or storage.join(run_dir, "harness", f"step_{step:08d}.json")
  _out(f"step {step}:\n{runner.table(results)}\n" +
       "\n".join(f"{k} = {v:.4f}" for k, v in sorted(values.items())) + f"\nreport: {where}")


def _is_main() -> bool:
  import jax  # pylint: disable=import-outside-toplevel

  return jax.process_index() == 0


def _check_score_flags(args) -> None:
  """The store mode (TASK --by=...) and the JSON-lines mode (--input/--domain --out) apart."""
  if args.task is None and args.by is None:
    if not (args.input or args.domain) or not args.out:
      raise ValueError("pass --input or --domain with --out (per-token log-probs as JSON "
                       "lines), or TASK --by=perplexity|reference_ratio|file (a score per "
                       "document into the token store).")
    return
  if args.task is None or args.by is None:
    raise ValueError("a score into a token store needs both TASK and --by, e.g. `pretrainx "
                     "score web --by=perplexity --run_dir=RUN`.")
  mixed = [f for f in ("input", "domain", "out", "limit") if getattr(args, f) is not None]
  if mixed:
    raise ValueError(f"TASK --by=... writes into the token store; --{', --'.join(mixed)} belong "
                     "to the JSON-lines mode (--input/--domain --out): use one or the other.")
  for flag, by in (("reference_run_dir", "reference_ratio"),
                   ("reference_step", "reference_ratio"), ("scores_file", "file")):
    if getattr(args, flag) is not None and args.by != by:
      raise ValueError(f"--{flag} goes with --by={by}, not --by={args.by}.")
  if args.by == "reference_ratio" and not args.reference_run_dir:
    raise ValueError("--by=reference_ratio needs --reference_run_dir, the run of the reference "
                     "model (score = its mean NLL / the run's).")
  if args.by == "file" and not args.scores_file:
    raise ValueError("--by=file needs --scores_file, JSON lines with one score per document.")


def cmd_score(args) -> None:
  _check_score_flags(args)
  if args.by is not None:
    _score_store(args)
    return
  import itertools  # pylint: disable=import-outside-toplevel

  from pretrainx.data import pipeline  # pylint: disable=import-outside-toplevel
  from pretrainx.harness import score_docs  # pylint: disable=import-outside-toplevel

  exp = _experiment(args, for_training=False)
  vocab = exp.data.vocabulary
  if args.input:
    docs = ((i, vocab.encode(text)) for i, text in
            score_docs.jsonl_documents(args.input, args.text_field, args.id_field))
  else:
    opened = pipeline.open_domain_store(exp.data, args.domain, args.split or "validation")
    docs = ((str(i), opened.document(i)[:-1]) for i in range(opened.num_docs))  # without eos
  if args.limit is not None:
    docs = itertools.islice(docs, args.limit)
  (scorer,), (step,) = _scorers([(exp, args.checkpoint_dir, args.step)], exp.run.seq_len)
  count = score_docs.score_documents(scorer, docs, args.out, int(vocab.eos_id), args.min_k)
  _out(f"step {step}: scored {count:,} documents into {args.out}")


def _scorers(models, seq_len: int):
  """TokenScorers (sharded over each run's mesh) and restored steps of (exp, checkpoint_dir,
  step) triples, all scoring rows of seq_len."""
  from pretrainx.harness.scoring import TokenScorer  # pylint: disable=import-outside-toplevel
  from pretrainx.sharding import batch_sharding  # pylint: disable=import-outside-toplevel
  from pretrainx.train import runtime  # pylint: disable=import-outside-toplevel

  scorers, steps = [], []
  for exp, checkpoint_dir, step in models:
    rt, state, step = runtime.load_trained(exp, checkpoint_dir, step)
    scorers.append(TokenScorer(rt.model, rt.inference_params(state), seq_len,
                               exp.run.global_batch_size, batch_sharding(rt.mesh), rt.scope))
    steps.append(step)
  return scorers, steps


def _score_store(args) -> None:
  from pretrainx import config  # pylint: disable=import-outside-toplevel
  from pretrainx.data import pipeline  # pylint: disable=import-outside-toplevel
  from pretrainx.data import score_sets  # pylint: disable=import-outside-toplevel
  from pretrainx.harness import store_scores  # pylint: disable=import-outside-toplevel

  name = score_sets.check_name(args.name or args.by)
  if args.by == "file" and args.run_dir is None and not args.gin_file:
    exp = config.parse_gin([], args.gin_param)  # embedded-corpus domains need no gin file
  else:
    exp = _experiment(args, for_training=False)
  opened = pipeline.open_domain_store(exp.data, args.task, args.split or "train")
  if args.by == "file":
    given, params = store_scores.file_scores(args.scores_file, opened.num_docs,
                                             args.index_field, args.score_field)
    chunk = lambda start, stop: given[start:stop]
  else:
    chunk, params = _model_scores(args, exp, opened)
  version, values = store_scores.write_score_set(opened, name, args.by, params, chunk)
  if values is not None:
    _out(store_scores.summary(opened.path, name, version, values))


def _model_scores(args, exp, opened):
  """The score of --by=perplexity|reference_ratio per chunk of documents, and its params."""
  from pretrainx import config  # pylint: disable=import-outside-toplevel
  from pretrainx.data import store  # pylint: disable=import-outside-toplevel
  from pretrainx.harness import store_scores  # pylint: disable=import-outside-toplevel

  models = [(exp, args.checkpoint_dir, args.step)]
  if args.by == "reference_ratio":
    ref_dir = args.reference_run_dir
    ref = config.load_run_experiment(ref_dir)
    if (store.vocabulary_identity(ref.data.vocabulary) !=
        store.vocabulary_identity(exp.data.vocabulary)):
      raise ValueError(f"the reference run {ref_dir} has another vocabulary than the run; "
                       "both models must read the same token ids.")
    models.append((ref, None, args.reference_step))
  seq_len = min(e.run.seq_len for e, _, _ in models)  # both models score the same windows
  scorers, steps = _scorers(models, seq_len)
  params = {"run_dir": storage.resolve(exp.run.run_dir), "step": steps[0], "seq_len": seq_len}
  if args.checkpoint_dir:
    params["checkpoint_dir"] = storage.resolve(args.checkpoint_dir)
  eos = int(exp.data.vocabulary.eos_id)
  if args.by == "perplexity":
    return store_scores.perplexity(opened, scorers[0], eos), params
  params.update(reference_run_dir=storage.resolve(args.reference_run_dir),
                reference_step=steps[1])
  return store_scores.reference_ratio(opened, scorers[0], scorers[1], eos), params


def cmd_generate(args) -> None:
  from pretrainx.train import runtime  # pylint: disable=import-outside-toplevel

  exp = _experiment(args, for_training=False)
  rt, state, _ = runtime.load_trained(exp, args.checkpoint_dir, args.step)
  _out(runtime.sample_text(rt, rt.inference_params(state), args.prompt, args.max_new_tokens,
                           seed=args.seed, temperature=args.temperature,
                           top_k=args.top_k or None))


def cmd_export(args) -> None:
  from pretrainx import checkpoint  # pylint: disable=import-outside-toplevel
  from pretrainx.config import experiment_to_gin  # pylint: disable=import-outside-toplevel
  from pretrainx.train import runtime  # pylint: disable=import-outside-toplevel

  exp = _experiment(args, for_training=False)
  rt, state, step = runtime.load_trained(exp, args.checkpoint_dir, args.step)
  # rt.exp: the model of the checkpoint's stage (a stage may have changed the rope settings)
  path = checkpoint.save_params(args.out, rt.inference_params(state),
                                {"step": step, "config_gin": experiment_to_gin(rt.exp)})
  _out(f"exported the params of step {step} to {path}")


def cmd_data(args) -> None:
  from pretrainx import config  # pylint: disable=import-outside-toplevel
  from pretrainx.data import pipeline, prepare, store  # pylint: disable=import-outside-toplevel
  from pretrainx.config.data import DOMAINS  # pylint: disable=import-outside-toplevel

  data = config.parse_gin(args.gin_file, args.gin_param).data
  tasks = {t.name: t for t in data.tasks}
  names = args.names or list(data.domains)
  unknown = [n for n in names if n not in tasks and n not in DOMAINS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}: name embedded-corpus domains {DOMAINS} or "
                     f"tasks of DataConfig.tasks {sorted(tasks)} (pass the --gin_file that "
                     "defines them).")
  splits = args.split or ["train", "validation"]
  where = _cluster(args) if args.action == "prepare" else None
  for name in names:
    if args.action == "prepare" and name in tasks:
      prepare.prepare(tasks[name], data.store_root, data.vocabulary, splits=tuple(splits),
                      overwrite=args.overwrite, cluster=where)
    for split in splits:
      opened = pipeline.open_domain_store(data, name, split)
      if args.action == "prepare":
        _out(f"{name}/{split}: {opened.num_docs:,} documents, {opened.num_tokens:,} tokens "
             f"in {opened.path}")
      else:
        _out(f"== {name}/{split}\n" + store.inspect_text(opened, args.num_docs, data.vocabulary))


def cmd_distill(args) -> None:
  import time  # pylint: disable=import-outside-toplevel

  from pretrainx import config  # pylint: disable=import-outside-toplevel
  from pretrainx.train import distill_cache  # pylint: disable=import-outside-toplevel

  started = time.time()
  params = list(args.gin_param)
  if args.teacher is not None:
    params.append(f"DistillConfig.teacher = {args.teacher!r}")
  if args.teacher_step is not None:
    params.append(f"DistillConfig.teacher_step = {args.teacher_step}")
  exp = config.parse_gin(args.gin_file, params)
  path, version = distill_cache.cache_teacher(
      exp, args.task, args.split, name=args.name, k=args.k, seq_len=args.seq_len,
      batch_rows=args.batch_rows, parts=args.parts, cluster=_cluster(args))
  info = storage.read_json(storage.join(path, "info.json"))
  size = distill_cache.disk_bytes(path)
  _out(f"teacher cache {path} (v{version}): {info['num_tokens']:,} tokens, k={info['k']}, "
       f"seq_len={info['seq_len']}, {size / 2**20:,.1f} MiB on disk, "
       f"{time.time() - started:,.1f} s")


def cmd_convert(args) -> None:
  from pretrainx import hf  # pylint: disable=import-outside-toplevel

  direction = args.direction or ("hf-to-pretrainx" if storage.exists(
      storage.join(args.src, "config.json")) else "pretrainx-to-hf")
  out = hf.convert_main(args.src, args.out, direction, architecture=args.architecture,
                        dtype=args.dtype)
  _out(f"{direction}: wrote {out}")


def cmd_merge(args) -> None:
  import json  # pylint: disable=import-outside-toplevel

  from pretrainx.cpt.merge import MergeSettings  # pylint: disable=import-outside-toplevel
  from pretrainx.train import merge_sources  # pylint: disable=import-outside-toplevel

  try:
    weights = tuple(float(w) for w in args.weights.split(",")) if args.weights else ()
  except ValueError:
    raise ValueError(f"--weights={args.weights!r}: pass comma-separated numbers, e.g. 1,-0.5.") \
        from None
  rules = ()
  if args.params_file:
    try:
      rules = tuple((r[0], r[1]) for r in json.loads(storage.read_text(args.params_file)))
    except (ValueError, TypeError, IndexError, KeyError):
      raise ValueError(f"--params_file {args.params_file}: write a JSON list of "
                       "[regex, {weights|density|t|normalize: value}] pairs.") from None
  settings = MergeSettings(args.method, weights, args.density, args.t, args.normalize,
                           args.seed, rules)
  _out(merge_sources.run_merge(args.sources, args.out, settings, base=args.base,
                               average_last=args.average_last, every=args.every, as_hf=args.hf,
                               group_bytes=args.group_mib << 20))


def cmd_vocab(args) -> None:
  from pretrainx import vocab_extend  # pylint: disable=import-outside-toplevel

  report = vocab_extend.extend_tokenizer(args.tokenizer, args.data, args.add, args.out,
                                         heldout=args.heldout)
  _out(report.summary())


def cmd_schedule(args) -> None:
  from pretrainx import config, schedule_plot  # pylint: disable=import-outside-toplevel

  exp = config.parse_gin(args.gin_file, args.gin_param)
  path = schedule_plot.plot_schedule(exp.schedule, exp.optimizer.learning_rate, exp.run.steps,
                                     args.out)
  _out(schedule_plot.schedule_table(exp.schedule, exp.optimizer.learning_rate, exp.run.steps) + f"\nplot: {path}")


def cmd_sweep(args) -> None:
  from pretrainx.scaling import sweep  # pylint: disable=import-outside-toplevel

  cfg = sweep.parse_sweep(args.sweep_file)
  if args.ray is not None:
    _sweep_on_ray(args, cfg)
    return
  if args.dry_run:
    runs = sweep.select(sweep.expand(cfg), args.only)
    _out("\n".join(sweep.describe(cfg, runs)))
    return
  report = sweep.run_sweep(cfg, only=args.only)
  _out("\n".join(report.lines) + f"\nresults: {cfg.results}")
  if report.failed:
    raise SystemExit(1)


def _sweep_on_ray(args, cfg) -> None:
  from pretrainx.scaling import ray_sweep, sweep  # pylint: disable=import-outside-toplevel

  if args.dry_run:
    runs = sweep.select(sweep.expand(cfg), args.only)
    _out("\n".join(ray_sweep.describe(cfg, args.sweep_file, runs, args.workdir)))
    return
  where = _cluster(args)
  try:
    report = ray_sweep.run_sweep_on(where, cfg, args.sweep_file, args.only, args.workdir)
  except KeyboardInterrupt:
    raise KeyboardInterrupt("the runs that were training stopped at a checkpoint") from None
  _out("\n".join(report.lines) + f"\nresults: {cfg.results}")
  if report.failed:
    raise SystemExit(1)


def cmd_linearize(args) -> None:
  from pretrainx import config  # pylint: disable=import-outside-toplevel
  from pretrainx.linearize import pipeline  # pylint: disable=import-outside-toplevel

  exp, extra = config.parse_gin_with(args.gin_file, args.gin_param, (config.LinearizeConfig,))
  report = pipeline.linearize(args.source, exp, extra["LinearizeConfig"], args.out_dir,
                              restart=args.restart)
  _out(pipeline.report_markdown(report, args.source) +
       f"report: {storage.join(storage.resolve(args.out_dir), 'report.md')} (and .json, .png)")


def cmd_fit(args) -> None:
  from pretrainx.scaling import fit  # pylint: disable=import-outside-toplevel

  out_dir = args.out_dir or storage.join(storage.parent(args.results), "fit")
  if args.bootstrap < 2:
    raise ValueError(f"--bootstrap={args.bootstrap}: intervals need at least 2 resamples.")
  _out(fit.fit_main(args.results, out_dir, target_compute=args.target_compute,
                    n_boot=args.bootstrap))


def cmd_plan(args) -> None:
  from pretrainx import plan  # pylint: disable=import-outside-toplevel

  code = plan.plan_main(list(args.plan_args))
  if code:
    raise SystemExit(code)


def cmd_peak(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from pretrainx.flops import measure_peak_flops  # pylint: disable=import-outside-toplevel

  flops = measure_peak_flops(args.size, getattr(jnp, args.dtype))
  size = args.size or (512 if jax.default_backend() == "cpu" else 4096)
  _out(f"{jax.devices()[0].device_kind} ({jax.default_backend()}): {flops / 1e9:.1f} GFLOP/s "
       f"per device, all {jax.local_device_count()} busy ({size}x{size} {args.dtype} matmuls); "
       "pass "
       f"--peak_tflops={flops * jax.device_count() / 1e12:.4g} to train for the whole job.")


def cmd_goodput(args) -> None:
  import json  # pylint: disable=import-outside-toplevel

  from pretrainx.train import goodput  # pylint: disable=import-outside-toplevel

  summary = goodput.summarize(args.run_dir)
  _out(json.dumps(summary, indent=1) if args.json else goodput.format_summary(summary))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "export": cmd_export, "data": cmd_data, "score": cmd_score, "distill": cmd_distill,
            "convert": cmd_convert, "merge": cmd_merge, "vocab": cmd_vocab,
            "schedule": cmd_schedule, "sweep": cmd_sweep, "linearize": cmd_linearize,
            "fit": cmd_fit, "plan": cmd_plan, "peak": cmd_peak, "goodput": cmd_goodput}


def configure_cpu_devices(setting: str) -> None:
  """Sets XLA's host device count before jax is imported (it cannot change afterwards)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags or "jax" in sys.modules:
    return
  if setting == "auto":
    cores = min(os.cpu_count() or 1, 8)
    count = 1 << (cores.bit_length() - 1)
  else:
    count = int(setting)
    if count < 1:
      raise ValueError(f"--cpu_devices={setting} must be 'auto' or a positive integer.")
  if count > 1:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


# Commands that run one JAX program over every host of a slice join it by themselves there. A
# sweep joins only where it trains a grid point (not as the Ray driver or a dry run); data
# preparation, plans and fits run on one host.
JOINS_SLICE = ("train", "eval", "generate", "export", "linearize", "sweep", "score", "merge")


def initialize_distributed(args) -> None:
  """Joins the jax.distributed job the flags describe, or the multi-host TPU slice this host is
  part of (no flags needed there); a no-op for one process."""
  from pretrainx import multihost  # pylint: disable=import-outside-toplevel

  detect = args.command in JOINS_SLICE and not (
      args.command == "sweep" and (args.ray is not None or args.dry_run))
  logging.info("distributed: %s", multihost.initialize(
      args.coordinator_address, args.num_processes, args.process_id, detect=detect))


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if args.command == "plan":  # pretrainx.plan parses its own flags
    args.plan_args = extra
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  configure_cpu_devices(args.cpu_devices)
  verbose = os.environ.get("PRETRAINX_VERBOSE", "")  # 1: info; 2: debug (remote tracebacks too)
  logging.set_verbosity(logging.DEBUG if verbose == "2" else logging.INFO if verbose
                        else logging.WARNING)
  logging.use_absl_handler()
  try:
    initialize_distributed(args)
    COMMANDS[args.command](args)
  except (ValueError, FileNotFoundError, FloatingPointError) as err:  # bad input, said plainly
    # (pretrainx.storage.StorageError, a missing/denied bucket or no matches, is a ValueError)
    sys.stderr.write(f"pretrainx {args.command}: error: {err}\n")
    return 2
  except KeyboardInterrupt as err:  # Ctrl-C: Ray tasks are cancelled, finished work is kept
    sys.stderr.write(f"pretrainx {args.command}: cancelled{'; ' + str(err) if str(err) else ''}."
                     " Run the same command again to resume.\n")
    return 130
  return 0
