"""Merging two continued models, averaging checkpoints, and extending the vocabulary (issue 42).

1. Trains the quickstart model (byte vocabulary, ~3.4M parameters) on the embedded corpus's
   prose + code, then continues it twice from its final checkpoint for the same steps: once on
   `prose` only, once on `code` only (checkpoints every --ckpt_every steps).
2. Merges the two continued models with `pretrainx merge` (train/merge_sources.run_merge): a
   linear 0.5/0.5 soup, task arithmetic (base + both task vectors, weights 1,1 and 0.5,0.5),
   TIES (density 0.5), DARE (density 0.5, seed 0), DARE-TIES and SLERP (t = 0.5), and measures
   every model's prose and code validation loss.
3. LAWA: averages the prose model's last K checkpoints (`merge --average_last=K`) and compares
   it with that run's final checkpoint.
4. Vocabulary extension: trains a byte-level BPE tokenizer on the corpus's training split and the
   quickstart model with it (prose + code), makes a "new language" (the prose domain with every
   English word replaced by a made-up word, one per English word, from a fixed seed), extends the
   tokenizer on it (`pretrainx vocab extend`, fertility before/after on held-out text), and
   continues the BPE model on the new language for the same steps with the old tokenizer and
   with the extended one under each init of the new rows ('mean', 'focus', 'random'). Held-out
   loss in nats per token and nats per byte (the tokenizers' tokens differ).

Honest whatever it shows: the models are small and the budgets short. Writes the "Model surgery
and merging" section of bench/RESULTS.md.
Run: .venv/bin/python bench/merge.py [--base_steps 160] [--continue_steps 120] [--reuse]
"""

from __future__ import annotations

# pylint: disable=wrong-import-position  (jax is imported after configure_cpu_devices)

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices("auto")  # as the CLI does, before jax is imported

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from pretrainx.checkpoint import Checkpointer  # noqa: E402
from pretrainx.config import FileTask, parse_gin  # noqa: E402
from pretrainx.cpt.merge import MergeSettings  # noqa: E402
from pretrainx.data import corpus, prepare  # noqa: E402
from pretrainx.data.pipeline import eval_batches  # noqa: E402
from pretrainx.flops import count_params  # noqa: E402
from pretrainx.train import merge_sources  # noqa: E402
from pretrainx.train.eval import evaluate_domains  # noqa: E402
from pretrainx.train.init import initial_state  # noqa: E402
from pretrainx.train.loop import train  # noqa: E402
from pretrainx.train.runtime import build_runtime  # noqa: E402
from pretrainx.vocab import HFTokenizerVocabulary  # noqa: E402
from pretrainx.vocab_extend import extend_tokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maxtext_memory import write_section  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "RESULTS.md")
HEADING = "## Model surgery and merging (issue 42)"
log = logging.getLogger("merge")

SEQ = 128
DOMAINS = ("prose", "code")
NEW = "newlang"  # the made-up language's domain
INIT_METHODS = ("mean", "focus", "random")
# name -> (method, weights, density, base needed); SLERP's t is 0.5.
MERGES = {
    "linear 0.5/0.5": ("linear", (0.5, 0.5), 1.0, False),
    "task arithmetic 1, 1": ("task_arithmetic", (1.0, 1.0), 1.0, True),
    "task arithmetic 0.5, 0.5": ("task_arithmetic", (0.5, 0.5), 1.0, True),
    "TIES, density 0.5": ("ties", (1.0, 1.0), 0.5, True),
    "DARE, density 0.5, weights 1, 1": ("dare", (1.0, 1.0), 0.5, True),
    "DARE-TIES, density 0.5": ("dare_ties", (1.0, 1.0), 0.5, True),
    "SLERP t = 0.5": ("slerp", (), 1.0, False),
}


# ----------------------------------------------------------------------------- runs


def experiment(args, name: str, steps: int, batch: int, **sections):
  """The quickstart model and this bench's run settings; `sections` are Experiment sections (the
  run, data and schedule dicts update the settings here)."""
  exp = parse_gin([os.path.join(REPO, "gin_configs/quickstart.gin")])
  run = {"run_dir": os.path.join(args.out, name), "steps": steps, "global_batch_size": batch,
         "seq_len": SEQ, "log_every": 20, "eval_every": 0, "eval_batches": 2,
         "progress_bar": False, **sections.pop("run", {})}
  data = {"domains": DOMAINS, **sections.pop("data", {})}
  schedule = {"warmup_steps": max(min(steps // 8, 20), 1), **sections.pop("schedule", {})}
  return exp.replace(run=run, data=data, sample={"tokens": 0}, schedule=schedule, **sections)


def continued(args, name: str, source: str, steps: int, batch: int, **sections):
  """A run continued from `source`'s final checkpoint: counter reset, a short warmup to
  --continue_lr, cosine to 10%, checkpoints every --ckpt_every steps (enough kept for LAWA)."""
  return experiment(
      args, name, steps, batch, init={"source": source, **sections.pop("init", {})},
      optimizer={"learning_rate": args.continue_lr},
      schedule={"warmup_steps": max(min(steps // 10, 10), 1)},
      checkpoint={"every_steps": args.ckpt_every, "keep_last": args.lawa_k + 2}, **sections)


def run_one(exp, reuse: bool) -> dict:
  """Trains exp (or reads back a finished run) -> wall time, tokens/s, steps."""
  saved = os.path.join(exp.run.run_dir, "bench.json")
  if reuse and os.path.exists(saved):
    with open(saved, encoding="utf-8") as f:
      return json.load(f)
  start = time.perf_counter()
  result = train(exp, restart=True)
  out = {"seconds": time.perf_counter() - start, "tokens_per_second": result.tokens_per_second,
         "compile_seconds": result.compile_seconds, "steps": result.steps,
         "train_loss": result.train_loss}
  with open(saved, "w", encoding="utf-8") as f:
    json.dump(out, f)
  return out


def slug(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cached(path: str, reuse: bool, make) -> dict:
  """make()'s result, kept as JSON at `path` and read back from there with --reuse."""
  if reuse and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  out = make()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  return out


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
  """Validation losses of any model of one architecture and vocabulary (run checkpoints, merged
  exports) on one set of validation batches, with one compiled eval step."""

  def __init__(self, exp, batch: int, num_batches: int | None, byte_lengths=None):
    self.rt = build_runtime(exp)
    host = eval_batches(exp.data, SEQ, batch, num_batches)
    self.batches = self.rt.put_domain_batches(host)
    self.abstract = merge_sources.abstract_params(exp.model, self.rt.mesh, exp.mesh.rules)
    self.bytes = None
    if byte_lengths is not None:  # UTF-8 bytes of the predicted tokens, per domain
      self.bytes = {d: float(sum((byte_lengths[b["targets"]] * (b["loss_mask"] > 0)).sum()
                                 for b in batches)) for d, batches in host.items()}
      self.tokens = {d: float(sum((b["loss_mask"] > 0).sum() for b in batches))
                     for d, batches in host.items()}

  def params(self, path: str, step: int | None = None):
    """The params of a run (its newest checkpoint, or checkpoint `step`) or an export."""
    if step is None:
      src = merge_sources.open_source(path)
    else:
      src = merge_sources.checkpoint_source(os.path.join(path, "checkpoints"), step)
    with self.rt.scope():
      return traverse_util.unflatten_dict(src.read(list(self.abstract), self.abstract))

  def losses(self, path: str, step: int | None = None, params=None) -> dict:
    """{domain: nats/token} (and with byte lengths {domain/bytes: nats/byte}) of a model: the
    run or export at `path`, or `params` (then `path` only names them)."""
    start = time.perf_counter()
    params = self.params(path, step) if params is None else params
    with self.rt.scope():
      r = evaluate_domains(self.rt.eval_step, params, self.batches)
    out = {d: r[f"{d}/loss"] for d in self.batches}
    if self.bytes is not None:
      for d in self.batches:  # the CE summed over the predicted tokens, over their bytes
        out[f"{d}/bytes"] = r[f"{d}/loss"] * self.tokens[d] / max(self.bytes[d], 1.0)
        out[f"{d}/tokens"], out[f"{d}/utf8_bytes"] = self.tokens[d], self.bytes[d]
      if abs(sum(self.tokens.values()) - r["tokens"]) > 0.5:
        log.warning("the eval step counted %d tokens, the byte count %d", r["tokens"],
                    sum(self.tokens.values()))
    out["eval_seconds"] = time.perf_counter() - start
    log.info("%s%s: %s", path, "" if step is None else f" step {step}", out)
    return out


def finalised_steps(run_dir: str) -> list[int]:
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), create=False)
  try:
    return list(ckpt.finalised_steps())
  finally:
    ckpt.close()


def merged(out: str, sources: list[str], settings: MergeSettings, reuse: bool, **kw) -> dict:
  """Writes the merge (`pretrainx merge`) into `out` unless --reuse finds it; -> its seconds."""
  saved = out + ".json"
  if reuse and os.path.exists(saved) and os.path.isdir(out):
    with open(saved, encoding="utf-8") as f:
      return json.load(f)
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  line = merge_sources.run_merge(sources, out, settings, **kw)
  info = {"seconds": time.perf_counter() - start, "line": line}
  log.info("%s (%.1f s)", line, info["seconds"])
  with open(saved, "w", encoding="utf-8") as f:
    json.dump(info, f)
  return info


def merge_bench(args) -> dict:
  """Base, prose and code models, their merges and LAWA: what the section's tables show."""
  base = experiment(args, "base", args.base_steps, args.batch)
  times = {"base": run_one(base, args.reuse)}
  runs = {"base": base.run.run_dir}
  for domain in DOMAINS:
    exp = continued(args, f"{domain}_model", base.run.run_dir, args.continue_steps, args.batch,
                    data={"domains": (domain,)})
    times[domain] = run_one(exp, args.reuse)
    runs[domain] = exp.run.run_dir
  evaluator = []  # built on first use: --reuse may need none

  def losses(name: str, path: str) -> dict:
    def make():
      if not evaluator:
        evaluator.append(Evaluator(base, args.batch, args.eval_batches))
      return evaluator[0].losses(path)
    return cached(os.path.join(args.out, "evals", f"{slug(name)}.json"), args.reuse, make)

  models = {"base": losses("base", runs["base"]),
            "prose model": losses("prose model", runs["prose"]),
            "code model": losses("code model", runs["code"])}
  merge_seconds = {}
  experts = [runs["prose"], runs["code"]]
  for name, (method, weights, density, needs_base) in MERGES.items():
    out = os.path.join(args.out, "merges", slug(name))
    info = merged(out, experts, MergeSettings(method, weights, density, seed=0), args.reuse,
                  base=runs["base"] if needs_base else None)
    merge_seconds[name] = info["seconds"]
    models[name] = losses(f"merge {name}", out)
  steps = finalised_steps(runs["prose"])
  k = min(args.lawa_k, len(steps))
  lawa_out = os.path.join(args.out, "merges", f"lawa_prose_last{k}")
  lawa = merged(lawa_out, [runs["prose"]], MergeSettings("linear"), args.reuse, average_last=k)
  last = f"LAWA: mean of steps {steps[-k:]}"
  lawa_models = {f"prose model, final checkpoint (step {steps[-1]})": models["prose model"],
                 last: losses(f"lawa last {k}", lawa_out)}
  return {"times": times, "models": models, "merge_seconds": merge_seconds, "lawa": lawa_models,
          "lawa_seconds": lawa["seconds"], "params": count_params(base.model)["total"],
          "work_seconds": (work_seconds(times, [*models.values(), lawa_models[last]])
                           + sum(merge_seconds.values()) + lawa["seconds"])}


def work_seconds(times: dict, evals: list[dict]) -> float:
  """Training plus evaluation time as saved with the runs and evals (--reuse reads it back)."""
  return sum(t["seconds"] for t in times.values()) + sum(e["eval_seconds"] for e in evals)


# ----------------------------------------------------------------------------- a new language

_ONSETS = ("k", "t", "v", "z", "r", "m", "n", "sh", "kh", "dr", "zh", "q", "l", "j", "b", "g")
_NUCLEI = ("a", "e", "i", "o", "u", "aa", "ei", "ou", "y", "ä", "ö")
_CODAS = ("", "", "", "n", "r", "k", "s", "th")


def made_up_word(word: str, seed: int) -> str:
  """The made-up word for an English word (lower case): 1-4 syllables from a hash of (seed,
  word), longer for longer words; the same word always gives the same made-up word."""
  digest = hashlib.sha256(f"{seed}:{word}".encode("utf-8")).digest()
  rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
  syllables = 1 + min(len(word) // 3, 3)
  return "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_NUCLEI)) + str(rng.choice(_CODAS))
                 for _ in range(syllables))


def translate(text: str, seed: int, lexicon: dict[str, str]) -> str:
  """`text` with every run of ASCII letters replaced by its made-up word (capitalised as the
  English word was); digits, punctuation and whitespace stay."""

  def one(match):
    word = match.group(0)
    lower = word.lower()
    if lower not in lexicon:
      lexicon[lower] = made_up_word(lower, seed)
    new = lexicon[lower]
    return new.upper() if word.isupper() and len(word) > 1 else (
        new.capitalize() if word[0].isupper() else new)

  return re.sub(r"[A-Za-z]+", one, text)


def new_language_files(out: str, seed: int) -> tuple[FileTask, dict]:
  """The new language's train and validation JSON lines (the prose domain's splits translated)
  and its FileTask."""
  paths, lexicon, sizes = {}, {}, {}
  for split in ("train", "validation"):
    path = os.path.join(out, f"{NEW}_{split}.jsonl")
    docs = [translate(d.text, seed, lexicon) for d in corpus.load_documents(split, ("prose",))]
    with open(path, "w", encoding="utf-8") as f:
      for text in docs:
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    paths[split] = path
    sizes[split] = {"documents": len(docs), "bytes": sum(len(t.encode("utf-8")) for t in docs)}
  sizes["words"] = len(lexicon)
  task = FileTask(name=NEW, train_patterns=(paths["train"],),
                  validation_patterns=(paths["validation"],))
  return task, sizes


def train_bpe(path: str, vocab_size: int) -> None:
  """A byte-level BPE of `vocab_size` ids (</s> and <pad> included) learned on the embedded
  corpus's training split (prose + code), written as path/tokenizer.json."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = [d.text for d in corpus.load_documents("train", DOMAINS)]
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["</s>", "<pad>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))


def byte_lengths(vocab: HFTokenizerVocabulary, padded: int) -> np.ndarray:
  """UTF-8 bytes of each id of a byte-level BPE (a token's string is one alphabet character per
  byte); 0 for special tokens and padding ids."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import pre_tokenizers

  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  out = np.zeros(padded, np.int64)
  for token, i in vocab.tokenizer.get_vocab(with_added_tokens=True).items():
    if all(c in alphabet for c in token):
      out[i] = len(token)
  return out


def vocab_bench(args) -> dict:
  """The BPE model, the extended tokenizer's fertility and the continuations on the new language."""
  root = os.path.join(args.out, "vocab")
  os.makedirs(root, exist_ok=True)
  tok_old, tok_new = os.path.join(root, "tokenizer_base"), os.path.join(root, "tokenizer_ext")
  if not (args.reuse and os.path.exists(os.path.join(tok_old, "tokenizer.json"))):
    train_bpe(tok_old, args.bpe_vocab)
  task, sizes = new_language_files(root, args.seed)
  old_vocab = HFTokenizerVocabulary(tok_old)

  def extend():
    from tokenizers import decoders  # pylint: disable=import-outside-toplevel

    report = extend_tokenizer(tok_old, task.train_patterns[0], args.vocab_add, tok_new,
                              heldout=task.validation_patterns[0])
    log.info("%s", report.summary())
    fert = lambda f: {"tokens": f.tokens, "words": f.words, "bytes": f.bytes,
                      "per_word": f.per_word, "per_byte": f.per_byte}
    shown = lambda token: decoders.ByteLevel().decode([token]).replace(" ", "\u2423")
    return {"old_size": report.old_size, "new_size": report.new_size,
            "added": len(report.added), "examples": [shown(t) for t in report.added[-8:]],
            "before": fert(report.before), "after": fert(report.after)}
  extension = cached(os.path.join(root, "extension.json"), args.reuse, extend)
  new_vocab = HFTokenizerVocabulary(tok_new)
  # Token stores: one directory per tokenizer, never the shared byte-vocabulary stores.
  stores = {"old": os.path.join(root, "stores_base"), "new": os.path.join(root, "stores_ext")}
  for key, vocab in (("old", old_vocab), ("new", new_vocab)):  # a fresh tokenizer: new stores
    prepare.prepare(task, stores[key], vocab, overwrite=not args.reuse)
  old_size, new_size = old_vocab.vocab_size, new_vocab.vocab_size
  base = experiment(args, "bpe_base", args.bpe_base_steps, args.bpe_batch,
                    data={"vocabulary": old_vocab, "store_dir": stores["old"]},
                    model={"vocab_size": old_size})
  times = {"BPE base": run_one(base, args.reuse)}
  on_new = {"domains": (NEW,), "tasks": (task,)}
  runs = {"old tokenizer (no extension)": continued(
      args, "newlang_old", base.run.run_dir, args.vocab_steps, args.bpe_batch,
      data={**on_new, "vocabulary": old_vocab, "store_dir": stores["old"]},
      model={"vocab_size": old_size})}
  for method in INIT_METHODS:
    runs[f"extended, '{method}' init"] = continued(
        args, f"newlang_{method}", base.run.run_dir, args.vocab_steps, args.bpe_batch,
        data={**on_new, "vocabulary": new_vocab, "store_dir": stores["new"]},
        model={"vocab_size": new_size},
        init={"extend_vocab_from": tok_old, "new_embeddings": method,
              "new_rows_only_steps": args.new_rows_only_steps})
  for name, exp in runs.items():
    times[name] = run_one(exp, args.reuse)
  evaluators = {}  # tokenizer -> Evaluator, built on first use (--reuse may need none)

  def evaluator(exp) -> Evaluator:
    key = "new" if exp.model.vocab_size == new_size else "old"
    if key not in evaluators:
      vocab = new_vocab if key == "new" else old_vocab
      evaluators[key] = Evaluator(exp, args.bpe_batch, None,
                                  byte_lengths(vocab, exp.model.padded_vocab_size))
    return evaluators[key]

  def losses(name: str, exp, at_init: bool = False) -> dict:
    def make():
      ev = evaluator(exp)
      if not at_init:
        return ev.losses(exp.run.run_dir)
      with ev.rt.scope():  # the state the run starts from: the source with its rows added
        state, _ = initial_state(ev.rt, exp.init)
      return ev.losses(f"{name} (step 0)", params=ev.rt.inference_params(state))
    return cached(os.path.join(root, "evals", f"{slug(name)}.json"), args.reuse, make)

  base_losses = losses("bpe base", runs["old tokenizer (no extension)"].replace(
      run={"run_dir": base.run.run_dir}))
  results, at_init = {}, {}
  for name, exp in runs.items():
    results[name] = losses(name, exp)
    at_init[name] = (base_losses if exp.model.vocab_size == old_size else
                     losses(f"{name} at init", exp, at_init=True))
  evals = [base_losses, *results.values(), *at_init.values()]
  return {"times": times, "results": results, "at_init": at_init, "extension": extension,
          "sizes": sizes, "params": count_params(base.model)["total"],
          "work_seconds": work_seconds(times, evals)}


# ----------------------------------------------------------------------------- the section


def _tokens(steps: int, batch: int) -> str:
  return f"{steps * batch * SEQ / 1e6:.2f}M"


def section(m: dict, v: dict | None, args, seconds: float) -> str:
  t = m["times"]
  lines = [
      HEADING, "",
      f"`.venv/bin/python bench/merge.py{args.flags}` on this 2-core CPU host (no accelerator): "
      f"{(m['work_seconds'] + (v['work_seconds'] if v else 0)) / 60:.1f} min of training, "
      f"merging and evaluation (compiles included), {seconds / 60:.1f} min this invocation"
      + (" (--reuse: finished work read back)." if args.reuse else "."),
      "", "### Merging two continued models", "",
      f"The quickstart model ({m['params'] / 1e6:.1f}M parameters, byte vocabulary, "
      f"{args.batch} x {SEQ} tokens per step) trained {args.base_steps} steps "
      f"({_tokens(args.base_steps, args.batch)} tokens, {t['base']['seconds'] / 60:.1f} min) on "
      f"prose + code, then continued from its final checkpoint for {args.continue_steps} steps "
      f"({_tokens(args.continue_steps, args.batch)} tokens; warmup to {args.continue_lr:g}, "
      "cosine to 10%) on prose only and on code only. Merges by `pretrainx merge` of the two "
      "final checkpoints (the base for the task-vector methods; DARE seed 0; task arithmetic "
      "at 0.5, 0.5 is the linear soup algebraically, base + (A - base)/2 + (B - base)/2 = "
      "(A + B)/2, so its row checks the two paths). Validation loss "
      f"in nats/token (a token is a byte) over {args.eval_batches} evenly spaced batches of "
      f"{args.batch} rows per domain.", "",
      "| model | prose | code | mean | merge s |", "|---|---:|---:|---:|---:|"]
  for name, r in m["models"].items():
    secs = m["merge_seconds"].get(name)
    lines.append(f"| {name} | {r['prose']:.4f} | {r['code']:.4f} | "
                 f"{(r['prose'] + r['code']) / 2:.4f} | "
                 f"{'' if secs is None else f'{secs:.1f}'} |")
  lines += ["", f"LAWA on the prose run (checkpoints every {args.ckpt_every} steps, "
            f"{m['lawa_seconds']:.1f} s to average):", "",
            "| model | prose | code |", "|---|---:|---:|"]
  for name, r in m["lawa"].items():
    lines.append(f"| {name} | {r['prose']:.4f} | {r['code']:.4f} |")
  if v is not None:
    lines += vocab_lines(v, args)
  lines += ["", " ".join([merge_reading(m, args)] + ([vocab_reading(v)] if v else [])), ""]
  return "\n".join(lines)


def vocab_lines(v: dict, args) -> list[str]:
  e, vt = v["extension"], v["times"]
  b, a = e["before"], e["after"]
  lines = [
      "", "### Extending the vocabulary for a new language", "",
      f"A byte-level BPE of {e['old_size']:,} ids learned on the corpus's training split, and "
      f"the quickstart model with it ({v['params'] / 1e6:.1f}M parameters, {args.bpe_batch} x "
      f"{SEQ} tokens per step) trained {args.bpe_base_steps} steps on prose + code "
      f"({vt['BPE base']['seconds'] / 60:.1f} min). The new language: the prose domain with each "
      f"of its {v['sizes']['words']:,} distinct English words replaced by a made-up word (1-4 "
      "syllables of a fixed inventory with a few non-ASCII vowels, from a hash of the word; "
      f"punctuation and word order kept): {v['sizes']['train']['bytes'] / 1e3:.0f} KB to train "
      f"on, {v['sizes']['validation']['bytes'] / 1e3:.0f} KB held out (the prose validation "
      f"split's translation). `vocab extend --add {args.vocab_add}` learned on the training "
      f"text added {e['added']} tokens ({e['old_size']:,} -> {e['new_size']:,} ids; the last "
      "ones: " + ", ".join(f"`{x}`" for x in e["examples"]) + "). Fertility on the held-out "
      "text:", "",
      "| tokenizer | tokens | tokens/word | tokens/byte |", "|---|---:|---:|---:|",
      f"| before | {b['tokens']:,} | {b['per_word']:.3f} | {b['per_byte']:.4f} |",
      f"| after | {a['tokens']:,} | {a['per_word']:.3f} | {a['per_byte']:.4f} |", "",
      f"Each continuation: {args.vocab_steps} steps from the BPE model's final checkpoint on the "
      f"new language only ({_tokens(args.vocab_steps, args.bpe_batch)} tokens, so more text with "
      "the extended tokenizer), same seed, LR and schedule"
      + (f", the first {args.new_rows_only_steps} steps training only the new rows"
         if args.new_rows_only_steps else "") +
      ". Loss over the whole held-out split; nats/byte = the loss summed over the predicted "
      "tokens divided by their UTF-8 bytes (comparable across tokenizers). At step 0: the "
      "state each continuation starts from (for the old tokenizer, the BPE model itself).", "",
      "| model | at step 0: nats/token | nats/byte | after: nats/token | nats/byte | "
      "train min |", "|---|---:|---:|---:|---:|---:|"]
  for name, r in v["results"].items():
    secs = vt[name]["seconds"]
    r0 = v["at_init"][name]
    lines.append(f"| {name} | {r0[NEW]:.4f} | {r0[f'{NEW}/bytes']:.4f} | {r[NEW]:.4f} | "
                 f"{r[f'{NEW}/bytes']:.4f} | {secs / 60:.1f} |")
  return lines


def merge_reading(m: dict, args) -> str:
  """Sentences read off the merge and LAWA numbers (no claim they do not make)."""
  models = m["models"]
  mean = lambda r: (r["prose"] + r["code"]) / 2
  merges = {n: r for n, r in models.items() if n in MERGES}
  best = min(merges, key=lambda n: mean(merges[n]))
  experts = {n: models[n] for n in ("prose model", "code model")}
  best_expert = min(experts, key=lambda n: mean(experts[n]))
  own = {"prose": models["prose model"]["prose"], "code": models["code model"]["code"]}
  beats = [n for n, r in merges.items() if mean(r) < mean(experts[best_expert])]
  final, lawa = list(m["lawa"].values())
  delta = lawa["prose"] - final["prose"]
  return (f"Reading: the best merge by the mean of the two domains is **{best}** "
          f"({mean(merges[best]):.4f}, against {mean(experts[best_expert]):.4f} for the better "
          f"single model, the {best_expert}, and {mean(models['base']):.4f} for the base); "
          f"{len(beats)} of the {len(merges)} merges beat the better single model on that mean. "
          f"No merge is free: the best one is {merges[best]['prose'] - own['prose']:+.4f} from "
          f"the prose model on prose and {merges[best]['code'] - own['code']:+.4f} from the code "
          f"model on code. LAWA over the prose run's last {args.lawa_k} checkpoints "
          + (f"lowers its prose loss by {-delta:.4f}" if delta < 0 else
             f"raises its prose loss by {delta:.4f}") + " against the final checkpoint"
          + (" (the cosine schedule has already annealed the final checkpoint; the earlier ones "
             "it averages in were taken at higher learning rates)." if delta >= 0 else ".")
          )


def vocab_reading(v: dict) -> str:
  """Sentences read off the vocabulary-extension numbers."""
  res, init = v["results"], v["at_init"]
  ext = [n for n in res if n.startswith("extended")]
  best = min(ext, key=lambda n: res[n][f"{NEW}/bytes"])
  best0 = min(ext, key=lambda n: init[n][f"{NEW}/bytes"])
  old = res["old tokenizer (no extension)"][f"{NEW}/bytes"]
  spread = max(res[n][f"{NEW}/bytes"] for n in ext) - res[best][f"{NEW}/bytes"]
  e = v["extension"]
  return (f"Vocabulary extension: fertility on the new language falls from "
          f"{e['before']['per_word']:.2f} to {e['after']['per_word']:.2f} tokens per word "
          f"({e['before']['per_byte']:.3f} -> {e['after']['per_byte']:.3f} per byte). At step 0 "
          f"the best init by nats/byte is {best0} ({init[best0][f'{NEW}/bytes']:.4f}); after "
          f"the equal continuations it is {best} ({res[best][f'{NEW}/bytes']:.4f}, the three "
          f"within {spread:.4f} of each other), against {old:.4f} with the old tokenizer "
          f"({'better' if res[best][f'{NEW}/bytes'] < old else 'worse'} per byte with the "
          "extension; per token the numbers are not comparable across tokenizers).")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_merge"))
  p.add_argument("--base_steps", type=int, default=160, help="the quickstart base's steps")
  p.add_argument("--continue_steps", type=int, default=120,
                 help="steps of each continuation (prose only, code only)")
  p.add_argument("--continue_lr", type=float, default=1e-3, help="peak LR of the continuations")
  p.add_argument("--batch", type=int, default=32, help="rows of 128 bytes per step")
  p.add_argument("--ckpt_every", type=int, default=20, help="continuations' checkpoint interval")
  p.add_argument("--lawa_k", type=int, default=4, help="checkpoints LAWA averages")
  p.add_argument("--eval_batches", type=int, default=16, help="validation batches per domain")
  p.add_argument("--bpe_vocab", type=int, default=1024, help="the BPE tokenizer's ids")
  p.add_argument("--bpe_base_steps", type=int, default=200, help="the BPE model's steps")
  p.add_argument("--bpe_batch", type=int, default=16, help="rows of 128 BPE tokens per step")
  p.add_argument("--vocab_add", type=int, default=512, help="tokens `vocab extend` adds")
  p.add_argument("--vocab_steps", type=int, default=80,
                 help="steps of each continuation on the new language")
  p.add_argument("--new_rows_only_steps", type=int, default=0,
                 help="InitConfig.new_rows_only_steps of the extended continuations")
  p.add_argument("--seed", type=int, default=0, help="the made-up language's lexicon")
  p.add_argument("--skip_vocab", action="store_true", help="only the merging half")
  p.add_argument("--reuse", action="store_true", help="read back runs, merges and evals made")
  p.add_argument("--write", default=RESULTS, help="the RESULTS.md to write ('' not to)")
  args = p.parse_args()
  shown = {k: v for k, v in vars(args).items()
           if k not in ("out", "write", "reuse") and v != p.get_default(k)}
  args.flags = "".join(f" --{k}" if v is True else f" --{k} {v}" for k, v in shown.items())
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  log.setLevel(logging.INFO)  # pretrainx's import may have configured the root logger already
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  m = merge_bench(args)
  v = None if args.skip_vocab else vocab_bench(args)
  text = section(m, v, args, time.perf_counter() - start)
  sys.stdout.write(text)
  if args.write:
    write_section(text, args.write, HEADING)


if __name__ == "__main__":
  main()
