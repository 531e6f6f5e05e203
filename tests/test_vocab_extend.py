"""Vocabulary extension: `pretrainx vocab extend` (BPE merges appended, old ids kept, fertility)
and InitConfig.extend_vocab_from (new rows by mean / FOCUS / random, old logits kept, new rows
trained first), on a tiny byte-level BPE built offline here."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx import checkpoint
from pretrainx.config import InitConfig, ModelConfig, experiment_to_gin
from pretrainx.cpt.vocab import NewTokens, extend_vocabulary
from pretrainx.model import Transformer
from pretrainx.vocab import HFTokenizerVocabulary
from pretrainx.vocab_extend import extend_tokenizer, new_token_pieces, overlapping_tokens

OLD, ADD = 300, 24  # the source tokenizer's ids; the tokens the extension adds
_EN = ("the quick brown fox jumps over the lazy dog while the small cat sleeps on a warm mat and "
       "some birds sing in the tall green trees near the old river bank ")
_FI = ("hyvää huomenta kaikille ystäville kissa istuu matolla koira juoksee metsässä talvella "
       "lumi sataa hiljaa järven rannalla ja lapset leikkivät pihalla iloisesti ")


def _lines(text: str, n: int, seed: int) -> list[str]:
  words, rng = text.split(), np.random.default_rng(seed)
  return [" ".join(rng.choice(words, 12)) for _ in range(n)]


def _byte_bpe(texts, vocab_size: int):
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["</s>", "<pad>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """The source tokenizer (English), 30 JSON-lines documents of a new language, the extension."""
  d = tmp_path_factory.mktemp("vocab")
  (d / "src").mkdir()
  _byte_bpe(_lines(_EN, 200, 0), OLD).save(str(d / "src" / "tokenizer.json"))
  with open(d / "fi.jsonl", "w", encoding="utf-8") as f:
    for line in _lines(_FI, 30, 1):
      f.write(json.dumps({"text": line}) + "\n")
  report = extend_tokenizer(str(d / "src"), str(d / "fi.jsonl"), ADD, str(d / "ext"))
  return dataclasses.make_dataclass("Tok", ["dir", "src", "ext", "data", "report"])(
      d, str(d / "src"), str(d / "ext"), str(d / "fi.jsonl"), report)


def _tokenizers(tok):
  return HFTokenizerVocabulary(tok.src).tokenizer, HFTokenizerVocabulary(tok.ext).tokenizer


def test_cli_adds_tokens_keeps_old_ids_and_prints_fertility(run_cli, tok, tmp_path):
  out = str(tmp_path / "ext")
  r = run_cli("vocab", "extend", "--tokenizer", tok.src, "--data", tok.data, "--add", str(ADD),
              "--out", out)
  assert r.returncode == 0, r.stderr
  old, new = HFTokenizerVocabulary(tok.src).tokenizer, HFTokenizerVocabulary(out).tokenizer
  assert new.get_vocab_size() == OLD + ADD
  assert all(old.id_to_token(i) == new.id_to_token(i) for i in range(OLD))
  rows = {m[1]: (float(m[2]), float(m[3])) for m in
          re.finditer(r"^\s+(before|after)\s+[\d,]+\s+([\d.]+)\s+([\d.]+)$", r.stdout, re.M)}
  assert set(rows) == {"before", "after"}, r.stdout
  assert rows["after"][0] < rows["before"][0] and rows["after"][1] < rows["before"][1]
  # The new merges come after the old ones: they only ever shorten a text's tokens.
  english = " ".join(_lines(_EN, 5, 7))
  assert len(new.encode(english).ids) <= len(old.encode(english).ids)


def _np_sparsemax(z: np.ndarray) -> np.ndarray:
  """Martins & Astudillo 2016, eq. (2)-(3): tau from the sorted support."""
  zs = np.sort(z)[::-1]
  k = np.arange(1, len(z) + 1)
  kz = k[1 + k * zs > np.cumsum(zs)].max()
  tau = (zs[:kz].sum() - 1) / kz
  return np.maximum(z - tau, 0)


def _np_rows(table: np.ndarray, new: NewTokens, method: str, weights_from: np.ndarray):
  """The new rows by the formulas of pretrainx/cpt/vocab.py, one token at a time."""
  rows = []
  for pieces, cands in zip(new.pieces, new.overlapping):
    anchor = weights_from[list(pieces)].mean(0)
    if method == "mean" or not cands:
      rows.append(table[list(pieces)].mean(0))
      continue
    e = weights_from[list(cands)]
    cos = e @ anchor / (np.linalg.norm(e, axis=1) * np.linalg.norm(anchor))
    rows.append(_np_sparsemax(cos) @ table[list(cands)])
  return np.stack(rows)


def _new_tokens(tok) -> NewTokens:
  old, new = _tokenizers(tok)
  as_tuples = lambda lists: tuple(tuple(x) for x in lists)
  return NewTokens(OLD, OLD + ADD, as_tuples(new_token_pieces(old, new, OLD, OLD + ADD)),
                   as_tuples(overlapping_tokens(old, new, OLD, OLD + ADD)))


def _cfg(vocab_size: int, tied: bool) -> ModelConfig:
  return ModelConfig(vocab_size=vocab_size, embed_dim=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, mlp_dim=192, max_seq_len=256, tie_embeddings=tied,
                     dtype="float32", param_dtype="float32", vocab_multiple=8)


def _head_params(cfg: ModelConfig, seed: int = 0):
  """What vocabulary extension reads and writes: the embedding and an untied lm_head."""
  rng = np.random.default_rng(seed)
  params = {"embed": {"embedding": rng.normal(0, 0.5, (cfg.padded_vocab_size, cfg.embed_dim))
                      .astype(np.float32)}}
  if not cfg.tie_embeddings:
    params["lm_head"] = rng.normal(0, 0.2, (cfg.embed_dim, cfg.padded_vocab_size)
                                   ).astype(np.float32)
  return params


@pytest.mark.parametrize("method,tied", [("mean", False), ("focus", False), ("focus", True),
                                         ("random", False)])
def test_init_methods_match_numpy(tok, method, tied):
  new = _new_tokens(tok)
  assert all(new.pieces) and any(len(c) > 1 for c in new.overlapping)
  src, cfg = _cfg(OLD, tied), _cfg(OLD + ADD, tied)
  params = _head_params(src)
  out = jax.device_get(extend_vocabulary(params, src, cfg, new, method, jax.random.key(1)))
  emb, old_emb = out["embed"]["embedding"], params["embed"]["embedding"]
  assert emb.shape == (cfg.padded_vocab_size, 64)
  np.testing.assert_array_equal(emb[:OLD], old_emb[:OLD])
  new_rows = emb[OLD:OLD + ADD]
  if method == "random":  # the model's own init: normal(init_std), fan-in normal for the head
    assert abs(new_rows.std() / cfg.init_std - 1) < 0.15
    assert abs(out["lm_head"][:, OLD:OLD + ADD].std() * np.sqrt(64) - 1) < 0.15
    return
  np.testing.assert_allclose(new_rows, _np_rows(old_emb, new, method, old_emb), atol=1e-6)
  if not tied:
    head, old_head = out["lm_head"], params["lm_head"]
    np.testing.assert_array_equal(head[:, :OLD], old_head[:, :OLD])
    np.testing.assert_allclose(head[:, OLD:OLD + ADD].T,
                               _np_rows(old_head.T, new, method, old_emb), atol=1e-6)


@pytest.fixture(scope="module")
def extended(tok, tmp_path_factory):
  """A random untied source exported with the old vocabulary, and a run extending it ('focus'
  rows, only the new rows training for 1 step): (runtime, state, source params, source cfg)."""
  import conftest  # pylint: disable=import-outside-toplevel
  from pretrainx.train.init import initial_state  # pylint: disable=import-outside-toplevel
  from pretrainx.train.runtime import build_runtime  # pylint: disable=import-outside-toplevel

  d = tmp_path_factory.mktemp("extended")
  src_exp = conftest.tiny_experiment(
      d / "src", model={"vocab_size": OLD, "tie_embeddings": False, "vocab_multiple": 8},
      run={"seq_len": 32}, data={"vocabulary": HFTokenizerVocabulary(tok.src)})
  src_cfg = src_exp.model
  params = nn.unbox(Transformer(src_cfg).init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))
                    )["params"]
  export = checkpoint.save_params(str(d / "export"), params,
                                  {"step": 0, "config_gin": experiment_to_gin(src_exp)})
  init = InitConfig(source=export, extend_vocab_from=tok.src, new_embeddings="focus",
                    new_rows_only_steps=1)
  exp = conftest.tiny_experiment(
      d / "run", model={"vocab_size": OLD + ADD, "tie_embeddings": False},
      init=dataclasses.asdict(init),
      run={"seq_len": 32}, schedule={"warmup_steps": 0},
      data={"vocabulary": HFTokenizerVocabulary(tok.ext)})
  rt = build_runtime(exp)
  with rt.scope():
    state, step = initial_state(rt, init)
  assert step == 0
  return rt, state, jax.device_get(params), src_cfg


def test_old_token_logits_unchanged(tok, extended):
  rt, state, src_params, src_cfg = extended
  old, _ = _tokenizers(tok)
  ids = np.asarray(old.encode(" ".join(_lines(_EN, 3, 5))).ids[:32])[None]  # [1, seq], old ids
  with rt.scope():
    before = jax.jit(Transformer(src_cfg).apply)({"params": src_params}, jnp.asarray(ids))
    after = jax.jit(rt.model.apply)({"params": state.params}, jnp.asarray(ids))
  before, after = np.asarray(before), np.asarray(after)
  assert after.shape[-1] == 384
  np.testing.assert_array_equal(after[..., :OLD], before[..., :OLD])  # exact, in fp32
  assert np.all(after[..., OLD:OLD + ADD] > -1e8) and np.all(after[..., OLD + ADD:] <= -1e8)
  # The run's rows are the FOCUS rows of the source's, as numpy computes them.
  emb = np.asarray(state.params["embed"]["embedding"])
  src_emb = src_params["embed"]["embedding"]
  np.testing.assert_allclose(emb[OLD:OLD + ADD], _np_rows(src_emb, _new_tokens(tok), "focus",
                                                          src_emb), atol=1e-6)


def test_new_rows_only_steps_moves_only_new_rows(tok, extended):
  rt, state, _, _ = extended
  state = jax.tree.map(jnp.copy, state)  # the step donates its state
  before = jax.device_get(state.params)
  _, new = _tokenizers(tok)
  text = " ".join(_lines(_FI, 40, 9))
  ids = np.asarray(new.encode(text).ids[:8 * 33], np.int32).reshape(8, 33)
  assert (ids >= OLD).any()
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)),
           "segment_ids": np.ones((8, 32), np.int32), "loss_mask": np.ones((8, 32), np.int32),
           "domain": np.zeros((8,), np.int32)}
  steps = []
  with rt.scope():
    for _ in range(2):
      state, _ = rt.train_step(state, rt.put_batch(batch))
      steps.append(jax.device_get(state.params))
  first, second = steps
  # Embedding rows move where their new token is an input; every new head column moves.
  seen = np.unique(ids[:, :-1][ids[:, :-1] >= OLD])
  embed_moved = (first["embed"]["embedding"] != before["embed"]["embedding"]).any(1)  # [vocab]
  head_moved = (first["lm_head"] != before["lm_head"]).any(0)  # [vocab]
  assert np.array_equal(np.flatnonzero(embed_moved), seen)
  assert np.array_equal(np.flatnonzero(head_moved), np.arange(OLD, OLD + ADD))
  same = jax.tree.map(np.array_equal, before["layers"], first["layers"])
  assert all(jax.tree.leaves(same))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, first["layers"],
                                              second["layers"])))  # step 2 trains everything


def _train_args(tok, tmp_path, vocab_path: str, vocab_size: int, export: str):
  return ("train", "--gin_file", "gin_configs/tiny.gin", "--run_dir", str(tmp_path / "run"),
          "--gin_param", f"InitConfig.source = '{export}'",
          "--gin_param", f"InitConfig.extend_vocab_from = '{tok.src}'",
          "--gin_param", "DataConfig.vocabulary = @HFTokenizerVocabulary()",
          "--gin_param", f"HFTokenizerVocabulary.path = '{vocab_path}'",
          "--gin_param", f"ModelConfig.vocab_size = {vocab_size}",
          "--gin_param", "ModelConfig.tie_embeddings = False")


def test_bad_input_is_one_line_and_exit_2(run_cli, tok, extended, tmp_path):
  export = extended[0].exp.init.source
  missing = run_cli("vocab", "extend", "--tokenizer", str(tmp_path / "nowhere"), "--data",
                    tok.data, "--add", "4", "--out", str(tmp_path / "o"))
  # A run tokenizer that moves old ids: two old tokens swapped.
  spec = json.loads(open(f"{tok.ext}/tokenizer.json", encoding="utf-8").read())
  vocab = spec["model"]["vocab"]
  a, b = (t for t, i in vocab.items() if i in (260, 261))
  vocab[a], vocab[b] = vocab[b], vocab[a]
  (tmp_path / "moved").mkdir()
  (tmp_path / "moved" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
  moved = run_cli(*_train_args(tok, tmp_path, str(tmp_path / "moved"), OLD + ADD, export))
  # A smaller vocabulary: another tokenizer of 280 ids.
  (tmp_path / "small").mkdir()
  _byte_bpe(_lines(_EN, 50, 2), 280).save(str(tmp_path / "small" / "tokenizer.json"))
  smaller = run_cli(*_train_args(tok, tmp_path, str(tmp_path / "small"), 280, export))
  for r, words in ((missing, "no Hugging Face tokenizer"), (moved, "changes old id"),
                   (smaller, "smaller than the source's")):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_convert_writes_the_extended_tokenizer(tok, extended, tmp_path):
  from pretrainx import hf  # pylint: disable=import-outside-toplevel

  rt, state, _, _ = extended
  export = checkpoint.save_params(str(tmp_path / "export"), jax.device_get(state.params),
                                  {"step": 0, "config_gin": experiment_to_gin(rt.exp)})
  out = hf.convert_main(export, str(tmp_path / "hf"), "pretrainx-to-hf")
  written = HFTokenizerVocabulary(out).tokenizer
  assert written.get_vocab_size() == OLD + ADD
  assert written.to_str() == HFTokenizerVocabulary(tok.ext).tokenizer.to_str()
  assert json.loads(open(f"{out}/config.json", encoding="utf-8").read())["vocab_size"] == OLD + ADD
