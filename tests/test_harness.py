"""lm-evaluation-harness on pretrainx models: the same numbers as lm-eval's own `hf` backend on
the model exported to Hugging Face format, offline tasks from local YAML and JSON-lines files,
per-token scoring, `pretrainx eval --harness_tasks` and `pretrainx score`."""

import json
import math
import os

import numpy as np
import pytest

import lm_eval
import tokenizers
import transformers  # noqa: F401  pylint: disable=unused-import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax.core import meta  # noqa: E402

from pretrainx import hf  # noqa: E402
from pretrainx.checkpoint import save_params  # noqa: E402
from pretrainx.hf_tokenizer import write_byte_tokenizer, write_tokenizer  # noqa: E402
from pretrainx.vocab import ByteVocabulary, HFTokenizerVocabulary  # noqa: E402
from pretrainx.harness import runner  # noqa: E402
from pretrainx.harness.lm import make_lm  # noqa: E402
from pretrainx.harness.scoring import TokenScorer, rolling_windows  # noqa: E402
from pretrainx.config import Experiment, ModelConfig, RunConfig, experiment_to_gin
from pretrainx.model import Transformer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot and bright",
         "one two three four five six", "red green blue yellow", "def add(a, b): return a + b"]
MAX_LENGTH = 48


def _tokenizer(directory):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 10, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
               "pad_token": "<pad>", "model_max_length": MAX_LENGTH}, f)
  return tok.get_vocab_size()


def _write_tasks(folder):
  """Three local tasks, one per request type."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  words = " ".join(TEXTS).split()
  mc = [{"question": f"{TEXTS[i % 6]} and", "choices": [w for w in rng.choice(words, 3)],
         "answer": int(i % 3)} for i in range(12)]
  ppl = [{"text": " ".join(rng.choice(words, int(n)))} for n in (5, 30, 70)]  # 70 > MAX_LENGTH
  gen = [{"prompt": TEXTS[i], "target": "the"} for i in range(4)]
  for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
    with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  common = "dataset_path: json\ntest_split: test\n"
  files = lambda name: f"dataset_kwargs:\n  data_files:\n    test: {folder}/{name}.jsonl\n"
  specs = {
      "px_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
               "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
               "metric_list:\n  - metric: acc\n",
      "px_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
      "px_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['\\n', 'sun']\n"
                "  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"}
  for task, body in specs.items():
    name = task.split("_")[1]
    with open(os.path.join(folder, f"{task}.yaml"), "w", encoding="utf-8") as f:
      f.write(f"task: {task}\n{common}{files(name)}{body}")
  return list(specs)


def _random_params(model, std=0.2, seed=0):
  shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32),
                      shapes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A random fp32 byte-level pretrainx model, converted to HF by `convert` (with the byte
  tokenizer it writes), and the task files."""
  root = tmp_path_factory.mktemp("harness")
  cfg = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_seq_len=64, dtype="float32", tie_embeddings=False)
  model = Transformer(cfg)
  params = _random_params(model)
  exp = Experiment(model=cfg, run=RunConfig(seq_len=MAX_LENGTH))
  save_params(str(root / "export"), params, {"step": 0, "config_gin": experiment_to_gin(exp)})
  hf_dir = hf.convert_main(str(root / "export"), str(root / "hf"), "pretrainx-to-hf")
  return model, params, ByteVocabulary(), hf_dir, _write_tasks(str(root / "tasks")), \
      str(root / "tasks")


TRICKY = ["", " ", "a", "the cat\n", "\n\n\t\r\n", "  two  spaces ", "héllo wörld", "日本語のテキスト",
          "emoji 🎉👩‍👩‍👧", "\x00\x01\x7f", "Ġ Ċ ĉ", "</s><pad><unk>", "<|R|><extra_id_0>",
          "def f(x):\n    return x  # ok", "\u200b\ufeff\u00a0", "a" * 300]


@pytest.mark.parametrize("extra_ids", [0, 8])
def test_byte_tokenizer_encodes_like_the_byte_vocabulary(tmp_path, extra_ids):
  vocab = ByteVocabulary(extra_ids=extra_ids)
  write_byte_tokenizer(vocab, str(tmp_path), model_max_length=512)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tok.bos_token_id) == (
      vocab.eos_id, vocab.pad_id, vocab.unk_id, None)
  assert len(tok) == vocab.vocab_size and not tok.add_bos_token and not tok.add_eos_token
  for text in TRICKY:
    want = vocab.encode(text).tolist()
    assert tok.encode(text) == want, text  # lm-eval's hf backend: encode() with no arguments
    assert tok(text)["input_ids"] == want and tok([text, "x"])["input_ids"][0] == want
    assert tok.decode(want) == text == vocab.decode(want)
  assert tok.decode([*vocab.encode("ab").tolist(), vocab.eos_id], skip_special_tokens=True) == "ab"
  bad_utf8 = [0xE6 + 3, 0x97 + 3, ord("x") + 3]  # a truncated character, then 'x'
  assert tok.decode(bad_utf8) == vocab.decode(bad_utf8)
  if extra_ids:
    assert tok.convert_ids_to_tokens([259, 259 + extra_ids - 1]) == ["<|R|>", "<extra_id_0>"]


def test_convert_copies_a_hugging_face_tokenizer(tmp_path):
  source, out = tmp_path / "tokenizer", tmp_path / "out"
  _tokenizer(str(source))
  out.mkdir()
  vocab = HFTokenizerVocabulary(str(source))
  written = write_tokenizer(vocab, str(out), model_max_length=64)
  assert sorted(os.path.basename(f) for f in written) == ["tokenizer.json",
                                                          "tokenizer_config.json"]
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert (tok.eos_token_id, tok.pad_token_id) == (vocab.eos_id, vocab.pad_id)
  for text in TEXTS:
    assert tok.encode(text) == vocab.encode(text).tolist()
  (source / "tokenizer_config.json").unlink()  # a bare tokenizer.json: a config is written
  write_tokenizer(HFTokenizerVocabulary(str(source)), str(tmp_path / "bare"), model_max_length=64)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bare"))
  assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.model_max_length == 64
  assert tok.encode(TEXTS[0]) == vocab.encode(TEXTS[0]).tolist()


def _by_doc(results, task):
  return {s["doc_id"]: s for s in results["samples"][task]}


def _lm_eval_hf(hf_dir, cfg, **model_args):
  """lm-eval's own hf backend on an HF directory, its tokenizer as it loads by default."""
  manager = runner._task_manager(cfg)  # pylint: disable=protected-access
  return lm_eval.simple_evaluate(
      model="hf", model_args={"pretrained": hf_dir, "dtype": "float32", "device": "cpu",
                              **model_args},
      tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit, batch_size=4,
      bootstrap_iters=0, log_samples=True, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
      torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)


def _loglikelihoods(results, task):
  """doc id -> the log-likelihood of each of its requests (lm-eval's samples or our report)."""
  return {d: [float(r[0] if isinstance(r, (list, tuple)) else r) for resp in s["resps"]
              for r in resp] for d, s in _by_doc(results, task).items()}


def _assert_same_loglikelihoods(ours, theirs, tasks, atol=1e-4, rtol=1e-7):
  """Equal within atol, plus fp32 rounding of a long request's sum (a rolling window of ~1,700
  nats differed by 1.6e-4 between jax 0.12 and torch 2.14: 9e-8 of it)."""
  for task in tasks:
    a, b = _loglikelihoods(ours, task), _loglikelihoods(theirs, task)
    assert sorted(a) == sorted(b) and a
    for doc in sorted(a):
      np.testing.assert_allclose(a[doc], b[doc], atol=atol, rtol=rtol, err_msg=f"{task} {doc}")
    assert min(min(x) for x in a.values()) < -5  # log-likelihoods of substance


@pytest.mark.slow
def test_results_equal_lm_eval_hf_backend(exported):
  model, params, vocab, hf_dir, tasks, include = exported
  cfg = runner.HarnessConfig(tasks=tuple(tasks), include_path=include)
  ours = runner.evaluate(make_lm(model, params, vocab, max_length=MAX_LENGTH, batch_rows=4), cfg)
  theirs = _lm_eval_hf(hf_dir, cfg, max_length=MAX_LENGTH)  # the tokenizer `convert` wrote
  assert ours["results"]["px_mc"]["acc,none"] == theirs["results"]["px_mc"]["acc,none"]
  _assert_same_loglikelihoods(ours, theirs, ("px_mc", "px_ppl"))
  for metric in ("word_perplexity,none", "bits_per_byte,none"):
    assert math.isclose(ours["results"]["px_ppl"][metric], theirs["results"]["px_ppl"][metric],
                        rel_tol=1e-4)
  gen_a, gen_b = _by_doc(ours, "px_gen"), _by_doc(theirs, "px_gen")
  assert [gen_a[d]["filtered_resps"] for d in sorted(gen_a)] == \
      [gen_b[d]["filtered_resps"] for d in sorted(gen_b)]
  values = runner.metrics(ours)
  assert "harness/px_mc/acc" in values and "harness/px_ppl/word_perplexity" in values


@pytest.mark.slow
def test_packed_scoring_equals_one_request_per_row(exported):
  model, params, vocab, *_ = exported
  rng = np.random.default_rng(1)
  requests = [(list(rng.integers(3, 200, n)), list(rng.integers(3, 200, m)))
              for n, m in ((5, 3), (20, 1), (40, 30), (1, 2), (2, 60))]
  packed = TokenScorer(model, params, MAX_LENGTH, batch_rows=2).score(requests)
  for (ctx, cont), got in zip(requests, packed):
    whole = (ctx + cont)[-(MAX_LENGTH + 1):]
    logits = model.apply({"params": params}, jnp.asarray([whole[:-1]]))[0]
    logp = np.asarray(jax.nn.log_softmax(logits))
    want = logp[np.arange(len(whole) - 1), whole[1:]][-min(len(cont), len(whole) - 1):]
    np.testing.assert_allclose(got.logprobs, want, atol=1e-5)
    assert got.greedy.shape == want.shape


@pytest.mark.parametrize("n", [1, 5, 47, 48, 49, 100, 145])
def test_rolling_windows_equal_lm_eval(n):
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

  tokens = list(range(10, 10 + n))
  theirs = [make_disjoint_window(w) for w in
            get_rolling_token_windows(tokens, prefix_token=1, max_seq_len=MAX_LENGTH,
                                      context_len=1)]
  ours = rolling_windows(tokens, 1, MAX_LENGTH)
  assert [(list(a), list(b)) for a, b in theirs] == ours
  assert sum(len(c) for _, c in ours) == n


@pytest.mark.slow
def test_a_task_without_offline_data_is_one_clear_error(tmp_path, exported):
  (tmp_path / "remote.yaml").write_text(
      "task: px_remote\ndataset_path: some-org/absent-dataset\ntest_split: test\n"
      "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\n"
      "doc_to_target: 0\n")
  cfg = runner.HarnessConfig(tasks=("px_remote",), include_path=str(tmp_path))
  with pytest.raises(ValueError, match="harness task 'px_remote': its data is not available "
                                       "offline.*nothing is downloaded"):
    runner.load_tasks(cfg)
  with pytest.raises(ValueError, match="unknown harness task 'px_nope'"):
    runner.load_tasks(runner.HarnessConfig(tasks=("px_nope",), include_path=str(tmp_path)))
  # A process keeps the task index it made (lm-eval's own takes seconds): a task file added to
  # the include directory since is found all the same.
  nope = runner.HarnessConfig(tasks=("px_nope",), include_path=str(tmp_path))
  with pytest.raises(ValueError, match="unknown harness task 'px_nope'"):
    runner.load_tasks(nope, include_defaults=False)
  (tmp_path / "nope.yaml").write_text(
      (tmp_path / "remote.yaml").read_text().replace("px_remote", "px_nope"))
  with pytest.raises(ValueError, match="harness task 'px_nope': its data is not available"):
    runner.load_tasks(nope, include_defaults=False)


def _metric_steps(run_dir, name):
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["step"] for line in f if f'"{name}"' in line]


@pytest.mark.slow
def test_in_loop_harness_of_a_continual_pretraining_run_survives_resume(tmp_path, exported):
  from conftest import tiny_experiment

  from pretrainx.train.loop import train

  *_, include = exported
  quiet = {"sample_tokens": 0, "eval_batches": 1, "log_every": 2}
  source = tiny_experiment(tmp_path / "source", run={**quiet, "steps": 2})
  train(source)
  harness = {"tasks": ("px_mc",), "include_path": include, "every_steps": 2, "limit": 6,
             "batch_rows": 8}
  cpt = tiny_experiment(tmp_path / "cpt", run={**quiet, "steps": 4}, harness=harness,
                        init={"source": str(tmp_path / "source")},
                        checkpoint={"every_steps": 2})
  train(cpt)
  run_dir = str(tmp_path / "cpt")
  assert _metric_steps(run_dir, "harness/px_mc/acc") == [2, 4]
  report = json.loads((tmp_path / "cpt" / "harness" / "step_00000004.json").read_text())
  assert report["step"] == 4 and "acc,none" in report["results"]["px_mc"]
  assert len(report["samples"]["px_mc"]) == 6
  train(cpt.replace(run={"steps": 6}))  # resumes from step 4
  assert _metric_steps(run_dir, "harness/px_mc/acc") == [2, 4, 6]  # the earlier ones are kept


@pytest.mark.slow
def test_cli_eval_harness_and_score(tmp_path, exported, run_cli):
  """`eval --harness_tasks` of a tiny byte-level run, and lm-eval's hf backend on its `convert`
  output with default settings (max_length: max_position_embeddings) give the same per-request
  log-likelihoods when --harness_max_length is ModelConfig.max_seq_len; then `score`."""
  from conftest import tiny_experiment

  from pretrainx.train.loop import train

  *_, include = exported
  exp = tiny_experiment(tmp_path / "run", run={"steps": 2, "sample_tokens": 0,
                                               "eval_batches": 1})
  train(exp)
  run_dir = str(tmp_path / "run")
  out = run_cli("eval", f"--run_dir={run_dir}", "--harness_tasks=px_mc,px_ppl",
                f"--harness_include={include}", "--harness_limit=4",
                f"--harness_max_length={exp.model.max_seq_len}")
  assert out.returncode == 0, out.stderr
  assert "harness/px_mc/acc = " in out.stdout and "harness/px_ppl/word_perplexity" in out.stdout
  assert _metric_steps(run_dir, "harness/px_mc/acc") == [2]
  report = os.path.join(run_dir, "harness", "step_00000002.json")
  with open(report, encoding="utf-8") as f:
    ours = json.load(f)
  for command in (("export", f"--run_dir={run_dir}", f"--out={tmp_path / 'export'}"),
                  ("convert", str(tmp_path / "export"), str(tmp_path / "hf"))):
    out = run_cli(*command)
    assert out.returncode == 0, out.stderr
  assert exp.run.seq_len < exp.model.max_seq_len  # the two defaults differ
  cfg = runner.HarnessConfig(tasks=("px_mc", "px_ppl"), include_path=include, limit=4)
  theirs = _lm_eval_hf(str(tmp_path / "hf"), cfg)
  _assert_same_loglikelihoods(ours, theirs, cfg.tasks)
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": t, "name": f"d{i}"}) + "\n"
                          for i, t in enumerate(TEXTS)))
  scores = tmp_path / "scores.jsonl"
  out = run_cli("score", f"--run_dir={run_dir}", f"--input={docs}", "--id_field=name",
                f"--out={scores}")
  assert out.returncode == 0, out.stderr
  lines = [json.loads(line) for line in scores.read_text().splitlines()]
  assert [r["id"] for r in lines] == [f"d{i}" for i in range(len(TEXTS))]
  for row, text in zip(lines, TEXTS):
    assert row["num_tokens"] == len(text.encode()) == len(row["logprobs"])  # byte vocabulary
    assert all(lp <= 0 for lp in row["logprobs"])
    assert row["min_20_logprob"] <= row["mean_logprob"]
  bad = run_cli("eval", f"--run_dir={run_dir}", "--harness_tasks=px_nope",
                f"--harness_include={include}")
  assert bad.returncode == 2 and "unknown harness task 'px_nope'" in bad.stderr
  bad = run_cli("eval", f"--run_dir={run_dir}", "--harness_tasks=px_mc",
                f"--harness_include={include}", f"--harness_max_length={exp.model.max_seq_len + 1}")
  assert bad.returncode == 2 and "--harness_max_length" in bad.stderr
