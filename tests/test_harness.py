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
from pretrainx.vocab import HFTokenizerVocabulary  # noqa: E402
from pretrainx.harness import runner  # noqa: E402
from pretrainx.harness.lm import make_lm  # noqa: E402
from pretrainx.harness.scoring import TokenScorer, rolling_windows  # noqa: E402
from pretrainx.config import ModelConfig
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
  """A random fp32 pretrainx model, exported to HF with its tokenizer, and the task files."""
  root = tmp_path_factory.mktemp("harness")
  hf_dir = str(root / "hf")
  vocab_size = _tokenizer(hf_dir)
  cfg = ModelConfig(vocab_size=vocab_size, embed_dim=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=64, max_seq_len=64, dtype="float32",
                    tie_embeddings=False)
  model = Transformer(cfg)
  params = _random_params(model)
  hf.export_hf(params, cfg, hf_dir)
  return model, params, HFTokenizerVocabulary(hf_dir), hf_dir, _write_tasks(str(root / "tasks")), \
      str(root / "tasks")


def _by_doc(results, task):
  return {s["doc_id"]: s for s in results["samples"][task]}


@pytest.mark.slow
def test_results_equal_lm_eval_hf_backend(exported):
  model, params, vocab, hf_dir, tasks, include = exported
  cfg = runner.HarnessConfig(tasks=tuple(tasks), include_path=include)
  ours = runner.evaluate(make_lm(model, params, vocab, max_length=MAX_LENGTH, batch_rows=4), cfg)
  manager = runner._task_manager(cfg)  # pylint: disable=protected-access
  theirs = lm_eval.simple_evaluate(
      model="hf", model_args={"pretrained": hf_dir, "dtype": "float32", "device": "cpu",
                              "max_length": MAX_LENGTH},
      tasks=tasks, task_manager=manager, batch_size=4, bootstrap_iters=0, log_samples=True,
      random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
      fewshot_random_seed=cfg.seed)
  assert ours["results"]["px_mc"]["acc,none"] == theirs["results"]["px_mc"]["acc,none"]
  for task in ("px_mc", "px_ppl"):
    a, b = _by_doc(ours, task), _by_doc(theirs, task)
    assert sorted(a) == sorted(b)
    ll_a = np.array([[float(r[0] if isinstance(r, (list, tuple)) else r) for r in a[d]["resps"]
                      for r in r] for d in sorted(a)], dtype=object)
    ll_b = np.array([[float(r[0] if isinstance(r, (list, tuple)) else r) for r in b[d]["resps"]
                      for r in r] for d in sorted(b)], dtype=object)
    for x, y in zip(ll_a, ll_b):
      np.testing.assert_allclose(np.array(x, float), np.array(y, float), atol=1e-4, rtol=0)
    assert min(min(x) for x in ll_a) < -5  # log-likelihoods of substance
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
  from conftest import tiny_experiment

  from pretrainx.train.loop import train

  *_, include = exported
  train(tiny_experiment(tmp_path / "run", run={"steps": 2, "sample_tokens": 0,
                                               "eval_batches": 1}))
  run_dir = str(tmp_path / "run")
  out = run_cli("eval", f"--run_dir={run_dir}", "--harness_tasks=px_mc,px_ppl",
                f"--harness_include={include}", "--harness_limit=4")
  assert out.returncode == 0, out.stderr
  assert "harness/px_mc/acc = " in out.stdout and "harness/px_ppl/word_perplexity" in out.stdout
  assert _metric_steps(run_dir, "harness/px_mc/acc") == [2]
  assert os.path.exists(os.path.join(run_dir, "harness", "step_00000002.json"))
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
