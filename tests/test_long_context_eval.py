"""Long-context evaluation: passkey / needle prompts fitted to token lengths and depths from the
validation text, the grid through lm-eval (JSON, heat map), its bad-input errors, and the
validation loss by position within the document."""

import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax.core import meta

from pretrainx.config import (DataConfig, Experiment, LongContextEvalConfig, ModelConfig,
                              experiment_to_gin)
from pretrainx.data.pipeline import eval_batches
from pretrainx.harness import long_context as lc
from pretrainx.harness.lm import make_lm
from pretrainx.model import Transformer
from pretrainx.train.eval import evaluate_domains, make_eval_step
from pretrainx.train.step import batch_loss_sums, position_bucket_width
from pretrainx.vocab import ByteVocabulary

MODEL = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_seq_len=384, dtype="float32")


@pytest.fixture(scope="module")
def tiny():
  model = Transformer(MODEL)
  shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32),
                        shapes)
  return model, params


@pytest.fixture(scope="module")
def text():
  return lc.validation_text(DataConfig(), "prose", 400)


def test_prompts_have_their_length_depth_and_answer(text):
  vocab = ByteVocabulary()
  cfg = LongContextEvalConfig(kinds="passkey,needle", lengths="256,300", depths=(1, 0, 0.5),
                              samples=2, seed=3)
  assert cfg.lengths == (256, 300) and cfg.depths == (0.0, 0.5, 1.0)
  for kind in cfg.kinds:
    docs = lc.make_docs(kind, text, vocab, cfg)
    assert docs == lc.make_docs(kind, text, vocab, cfg)  # deterministic
    other = lc.make_docs(kind, text, vocab, LongContextEvalConfig(
        kinds=kind, lengths=cfg.lengths, depths=cfg.depths, samples=2, seed=4))
    assert [d["answer"] for d in docs] != [d["answer"] for d in other]
    assert len(docs) == 2 * 3 * 2
    intro, needle, question = lc.TEMPLATES[kind]
    for d in docs:
      assert len(vocab.encode(d["prompt"])) == d["tokens"] == d["length"]  # exact: bytes
      assert d["answer"].isdigit() and d["answer"] in d["prompt"]
      assert d["prompt"].startswith(intro)
      city = next(c for c in lc.CITIES if f"for {c} is {d['answer']}" in d["prompt"]) \
          if kind == "needle" else ""
      filled = needle.format(answer=d["answer"], city=city)
      assert d["prompt"].endswith(question.format(city=city))
      at = len(vocab.encode(d["prompt"][:d["prompt"].index(filled)]))
      assert at == d["needle_token"]
      before = at - len(vocab.encode(intro))  # haystack tokens before the needle
      assert abs(before - d["depth"] * d["haystack_tokens"]) <= 16  # up to one word off
      if d["depth"] == 0.0:
        assert before == 0
      if d["depth"] == 1.0:
        assert d["prompt"].endswith(filled + question.format(city=city))


def test_bad_input_is_one_line(text):
  for bad, match in (({"depths": (0.0, 1.5)}, "depths"), ({"kinds": "passkey,haystack"}, "kinds"),
                     ({"lengths": ()}, "lengths is empty")):
    with pytest.raises(ValueError, match=match) as err:
      LongContextEvalConfig(**bad)
    assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match=r"max_seq_len=384; use lengths <= 368") as err:
    lc.check_lengths(LongContextEvalConfig(lengths=(256, 380)), MODEL.max_seq_len)
  with pytest.raises(ValueError, match=r"holds [\d,]+ tokens; the longest context needs at "
                                       r"least 100,000,000") as err:
    lc.validation_text(DataConfig(), "prose", 100_000_000)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="leaves no room for a haystack"):
    lc.make_docs("needle", text, ByteVocabulary(), LongContextEvalConfig(lengths=(100,)))


def test_cli_refuses_bad_needle_flags(tmp_path, run_cli):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "config.gin").write_text(experiment_to_gin(Experiment(model=MODEL)))
  out = run_cli("eval", f"--run_dir={run_dir}", "--needle=passkey", "--needle_lengths=64,4096")
  assert out.returncode == 2 and "max_seq_len=384" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
  out = run_cli("eval", f"--run_dir={run_dir}", "--needle=passkey", "--needle_depths=0,2")
  assert out.returncode == 2 and "depths are fractions in [0, 1]" in out.stderr


def test_grid_through_lm_eval(tmp_path, tiny, text):
  model, params = tiny
  cfg = LongContextEvalConfig(kinds=("passkey", "needle"), lengths=(240, 320), depths=(0, 1),
                              samples=1, max_gen_toks=10)
  lm = make_lm(model, params, ByteVocabulary(), max_length=330, batch_rows=2, max_gen_toks=10)
  grids = lc.evaluate_grid(lm, None, cfg, text=text, out_dir=str(tmp_path / "lc"), step=7)
  assert sorted(grids) == ["needle", "passkey"]
  for kind, g in grids.items():
    with open(tmp_path / "lc" / f"{kind}_grid.json", encoding="utf-8") as f:
      assert json.load(f) == g
    with open(tmp_path / "lc" / f"{kind}_grid.png", "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert np.asarray(g["accuracy"]).shape == (2, 2) and g["step"] == 7
    assert all(0.0 <= v <= 1.0 for row in g["accuracy"] for v in row)
    assert sorted(g["mean_by_length"]) == ["240", "320"] and 0.0 <= g["mean"] <= 1.0
    assert [(p["length"], p["depth"]) for p in g["prompts"]] == [(240, 0.0), (240, 1.0),
                                                                  (320, 0.0), (320, 1.0)]
    assert kind in lc.table(g) and "mean" in lc.table(g)
  assert os.path.exists(tmp_path / "lc" / "tasks" / "pretrainx_passkey.yaml")
  assert set(lc.metrics(grids)) == {f"long_context/{k}/{m}" for k in ("passkey", "needle")
                                    for m in ("accuracy", "L240", "L320")}
  with pytest.raises(ValueError, match="exceeds the LM's max_length=330"):
    lc.evaluate_grid(lm, None, LongContextEvalConfig(lengths=(325,)), text=text)


def test_loss_by_position_sums_to_the_loss_and_matches_numpy(tiny):
  model, params = tiny
  assert (position_bucket_width(64), position_bucket_width(1024), position_bucket_width(4096),
          position_bucket_width(4096, 512)) == (16, 256, 1024, 512)
  seq = 64
  batches = eval_batches(DataConfig(), seq, 4, 2)  # both domains, packed documents
  step = jax.jit(make_eval_step(model, 24))  # 0-24, 24-48, 48-64
  r = evaluate_domains(step, params, batches)
  plain = jax.jit(lambda p, b: batch_loss_sums(model, p, b, z_loss=0.0))
  for domain_batches in batches.values():  # eval/loss stays bit-identical
    for b in domain_batches:
      assert float(step(params, b)["ce"]) == float(plain(params, b)["ce"])
  want_ce, want_n = np.zeros(3), np.zeros(3)
  for b in (b for bs in batches.values() for b in bs):
    logits = np.asarray(model.apply({"params": params}, b["inputs"], b["positions"],
                                    b["segment_ids"]), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = (logz - np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]) * b["loss_mask"]
    bucket = np.minimum(b["positions"] // 24, 2)
    np.add.at(want_ce, bucket, ce)
    np.add.at(want_n, bucket, b["loss_mask"])
  assert want_n.min() > 0
  got = {k: v for k, v in r.items() if k.startswith("loss_by_position/")}
  assert list(got) == ["loss_by_position/0-24", "loss_by_position/24-48",
                       "loss_by_position/48-64"]
  np.testing.assert_allclose(list(got.values()), want_ce / want_n, rtol=1e-5)
  assert sum(want_n) == r["tokens"]
  np.testing.assert_allclose(sum(v * n for v, n in zip(got.values(), want_n)) / r["tokens"],
                             r["loss"], rtol=1e-6)


def test_cli_eval_needle_writes_grids_and_metrics(tmp_path, run_cli, monkeypatch):
  """`pretrainx eval --needle` on a run (its state freshly initialised in place of a checkpoint:
  what is tested is the command, not training) over its own validation text."""
  from conftest import tiny_experiment

  from pretrainx.train import runtime
  from pretrainx.train.state import create_train_state

  exp = tiny_experiment(tmp_path / "run")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.gin").write_text(experiment_to_gin(exp))

  def fresh(exp, checkpoint_dir=None, step=None):
    del checkpoint_dir, step
    rt = runtime.build_runtime(exp)
    state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, 0,
                                  exp.run.seq_len)
    return rt, state, 3

  monkeypatch.setattr(runtime, "load_trained", fresh)
  out = run_cli("eval", f"--run_dir={tmp_path / 'run'}", "--needle=passkey",
                "--needle_lengths=200", "--needle_depths=0,1", "--needle_samples=1",
                "--needle_domain=code", "--gin_param=LongContextEvalConfig.max_gen_toks=8")
  assert out.returncode == 0, out.stderr
  assert "passkey |     200" in out.stdout
  with open(tmp_path / "run" / "long_context" / "passkey_grid.json", encoding="utf-8") as f:
    grid = json.load(f)
  assert grid["step"] == 3 and grid["depths"] == [0.0, 1.0] and grid["lengths"] == [200]
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == 3 and "long_context/passkey/L200" in rows[-1]


def test_prompts_fit_over_multibyte_text_with_a_byte_vocabulary():
  """A cut inside a multi-byte character would decode to replacement characters that re-encode
  longer, and the prompt would never reach its length: cuts go between characters."""
  from pretrainx.vocab import ByteVocabulary
  vocab = ByteVocabulary()
  ids = np.asarray(vocab.encode("naïve café — déjà vu — " * 60))
  intro, needle, question = lc.TEMPLATES["passkey"]
  for start in range(0, 40, 3):
    for depth in (0.0, 0.3, 0.5, 0.77, 1.0):
      fitted = lc.fit_prompt(vocab, ids, start, 300, depth,
                             (intro, needle.format(answer="12345"), question))
      assert abs(fitted["tokens"] - 300) <= lc.LENGTH_TOLERANCE
      assert "\ufffd" not in fitted["prompt"]
