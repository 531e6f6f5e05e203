"""`pretrainx distill cache`: a teacher's top-k log-probs per token of a token store, equal to a
direct teacher forward over the same pieces, resumable, readable across parts, refused for another
store, and the same when its parts run as Ray tasks."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx import checkpoint, cli
from pretrainx.config import experiment_to_gin, parse_gin
from pretrainx.data import pipeline
from pretrainx.data import teacher_cache as tc
from pretrainx.data.store import open_store
from pretrainx.model import Transformer
from pretrainx.train import distill_cache
from pretrainx.train.runtime import build_runtime
from pretrainx.data.pipeline import TrainBatches
from pretrainx.train.state import create_train_state
from pretrainx.train.teacher import load_teacher, load_teacher_params, teacher_for

pytestmark = pytest.mark.xdist_group("teacher_cache")  # its module fixtures are built once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs/tiny.gin")
L, K = 32, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The stores of tasks 'web' (12 short documents, some longer than a 32-token piece, one of a
  single token) and 'other'; a freshly initialised tiny model exported as the teacher (and one
  of another vocabulary); web's teacher cache (k=4, seq_len=32) written in this process."""
  tmp = tmp_path_factory.mktemp("teacher_cache")
  (tmp / "web").mkdir()
  texts = [f"doc {i}: " + "lorem ipsum dolor " * (i % 5) for i in range(11)] + [""]
  with open(tmp / "web/part0.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
  (tmp / "other").mkdir()
  (tmp / "other/part0.jsonl").write_text("".join(
      json.dumps({"text": f"another store {i} " * 9}) + "\n" for i in range(8)))
  gin_file = tmp / "web.gin"
  gin_file.write_text(
      "DataConfig.tasks = [@web/FileTask(), @other/FileTask()]\n"
      f"DataConfig.store_dir = '{tmp / 'stores'}'\n" + "".join(
          f"{t}/FileTask.name = '{t}'\n{t}/FileTask.train_patterns = ['{tmp / t}/*.jsonl']\n"
          f"{t}/FileTask.validation_fraction = 0.0\n" for t in ("web", "other")))
  gin = [f"--gin_file={TINY}", f"--gin_file={gin_file}"]
  assert cli.main(["data", "prepare", "web", "other", "--split=train", *gin]) == 0
  exp = parse_gin([TINY, str(gin_file)], ["DistillConfig.teacher_dtype='float32'"])
  run_dir = _export(exp, tmp / "teacher")
  _export(exp.replace(model={"vocab_size": exp.model.vocab_size + 64}), tmp / "other_vocab")
  gin = [*gin, "--gin_param=DistillConfig.teacher_dtype='float32'"]
  exp = exp.replace(distill={"teacher": run_dir})
  path, version = distill_cache.cache_teacher(exp, "web", k=K, seq_len=L)
  store = open_store(str(tmp / "stores/web/train"))
  return {"run_dir": run_dir, "gin": gin, "exp": exp, "tmp": tmp, "store": store,
          "path": path, "version": version}


def _export(exp, path):
  """A params export of a freshly initialised model of `exp` (a stand-in teacher)."""
  model = Transformer(exp.model)
  params = nn.unbox(model.init(jax.random.key(7), jnp.zeros((1, exp.run.seq_len), jnp.int32)))
  return checkpoint.save_params(str(path), params["params"],
                                {"step": 0, "config_gin": experiment_to_gin(exp)})


def _direct(run, pieces):
  """The teacher's log-probs [n, V] of each (start, stop) store token range, run alone as one
  row (positions from 0)."""
  exp = run["exp"].replace(run={"seq_len": L})
  rt = build_runtime(exp)
  teacher, params = load_teacher(rt, exp.distill)
  batch = {k: np.zeros((8, L), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                   "positions", "loss_mask")}
  for i, (a, b) in enumerate(pieces):
    tokens = run["store"].tokens(a, b + 1)
    batch["inputs"][i, :b - a], batch["targets"][i, :b - a] = tokens[:-1], tokens[1:]
    batch["segment_ids"][i, :b - a], batch["positions"][i, :b - a] = 1, np.arange(b - a)
  with rt.scope():
    logits = jax.jit(teacher.apply)(params, rt.put_batch(batch))
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return [logp[i, :b - a] for i, (a, b) in enumerate(pieces)]


def test_entries_equal_a_direct_teacher_forward_over_the_same_pieces(run):
  store = run["store"]
  cache = tc.open_teacher_cache(store)
  assert cache.version == run["version"] == 1 and cache.k == K and cache.seq_len == L
  info = cache.info
  assert info["num_tokens"] == store.num_tokens and info["complete"]
  assert info["teacher"] == run["run_dir"] and info["parts"][0]["complete"]
  lengths = store.doc_lengths
  long_doc = int(np.argmax(lengths))
  assert lengths[long_doc] - 1 > L  # a second piece exists
  off = store.doc_offsets
  a = int(off[long_doc])
  end = int(off[long_doc + 1]) - 1  # the eos: no input
  pieces = [(a, a + L), (a + L, min(end, a + 2 * L)), (int(off[0]), int(off[1]) - 1)]
  direct = _direct(run, pieces)
  ids, logprobs, target = cache.read(0, store.num_tokens)
  for (lo, hi), want in zip(pieces, direct):
    top = np.argsort(-want, axis=-1, kind="stable")[:, :K]
    np.testing.assert_array_equal(ids[lo:hi], top)
    np.testing.assert_allclose(logprobs[lo:hi], np.take_along_axis(want, top, -1), atol=2e-5)
    nxt = store.tokens(lo + 1, hi + 1)
    np.testing.assert_allclose(target[lo:hi], want[np.arange(hi - lo), nxt], atol=2e-5)
  # the second piece's context starts at its own start: not the first piece's continuation
  assert not np.allclose(logprobs[a + L], logprobs[a + L - 1])
  ends = off[1:] - 1  # every document's eos: the one-hot filler
  np.testing.assert_array_equal(ids[ends], 0)
  np.testing.assert_array_equal(logprobs[ends, 0], 0.0)
  assert np.isneginf(logprobs[ends, 1:]).all() and (target[ends] == 0).all()
  # reads across any range give the same entries
  sub = cache.read(a + 3, end + 1)
  np.testing.assert_array_equal(sub[1], logprobs[a + 3:end + 1])


def test_all_of_the_vocabulary_sums_to_one(run):
  exp = run["exp"]
  path, version = distill_cache.cache_teacher(exp, "web", k=10_000, seq_len=L, name="full",
                                              batch_rows=16)
  cache = tc.open_teacher_cache(run["store"], "full")
  assert cache.k == exp.model.vocab_size and path.endswith("full/v1") and version == 1
  _, logprobs, _ = cache.read(0, run["store"].num_tokens)
  np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_an_interrupted_write_resumes_its_version(run, monkeypatch):
  real, calls = tc.PartWriter.write, []

  def interrupted(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(self, *args, **kwargs)

  monkeypatch.setattr(tc.PartWriter, "write", interrupted)
  with pytest.raises(KeyboardInterrupt):
    distill_cache.cache_teacher(run["exp"], "web", k=K, seq_len=L, name="resumed")
  progress = tc.read_progress(os.path.join(run["store"].path, "teacher_caches/resumed/v1"), 0)
  assert progress["done_rows"] == 8 and not progress["complete"]
  with pytest.raises(tc.TeacherCacheError, match="incomplete"):
    tc.open_teacher_cache(run["store"], "resumed")
  calls.clear()
  monkeypatch.setattr(tc.PartWriter, "write", lambda self, *a, **kw: (calls.append(1),
                                                                      real(self, *a, **kw)))
  path, version = distill_cache.cache_teacher(run["exp"], "web", k=K, seq_len=L, name="resumed")
  assert version == 1 and len(calls) == -(-progress["rows"] // 8) - 1  # the rest only
  resumed = tc.open_teacher_cache(run["store"], "resumed").read(0, run["store"].num_tokens)
  whole = tc.open_teacher_cache(run["store"]).read(0, run["store"].num_tokens)
  for got, want in zip(resumed, whole):
    np.testing.assert_array_equal(got, want)


def _cache_cli(run, *args):
  return cli.main(["distill", "cache", "--task=web", f"--seq_len={L}", f"--k={K}",
                   "--name=cli", *run["gin"], *args])


def test_the_cli_writes_a_cache_and_says_where(run, capsys):
  assert _cache_cli(run, f"--teacher={run['run_dir']}", "--parts=2") == 0
  out = capsys.readouterr().out
  assert "teacher_caches/cli/v1 (v1): " in out and "MiB on disk" in out
  cache = tc.open_teacher_cache(run["store"], "cli")
  assert len(cache.info["parts"]) == 2
  whole = tc.open_teacher_cache(run["store"]).read(0, run["store"].num_tokens)
  for got, want in zip(cache.read(0, run["store"].num_tokens), whole):
    np.testing.assert_allclose(got, want, atol=2e-5)
  cut = cache.info["parts"][1]["tokens"][0]  # a read across the parts' boundary
  for got, want in zip(cache.read(cut - 5, cut + 5), whole):
    np.testing.assert_allclose(got, want[cut - 5:cut + 5], atol=2e-5)


@pytest.mark.parametrize("args, message", [
    (["--teacher=/nonexistent/teacher_run"], "the teacher /nonexistent/teacher_run does not exist"),
    (["--teacher={tmp}/other_vocab"], "vocab_size=323 but the student has 259"),
    (["--k=0", "--teacher={run_dir}"], "--k=0"),
    ([], "no teacher"),
])
def test_bad_input_is_one_clear_line(run, capsys, args, message):
  assert _cache_cli(run, *(a.format(run_dir=run["run_dir"], tmp=run["tmp"]) for a in args)) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_cache_for_another_store_is_refused(run):
  data = pipeline.open_domain_store(run["exp"].data, "other", "train")
  shutil.copytree(os.path.join(run["store"].path, "teacher_caches"),
                  os.path.join(data.path, "teacher_caches"))
  with pytest.raises(tc.TeacherCacheError, match="a cache for another store") as err:
    tc.open_teacher_cache(data)
  assert "\n" not in str(err.value)
  with pytest.raises(tc.TeacherCacheError, match="holds no teacher cache 'nope'.*distill cache"):
    tc.open_teacher_cache(run["store"], "nope")


def test_parts_are_contiguous_document_ranges_of_about_equal_tokens():
  offsets = np.asarray([0, 3, 5, 9, 10])
  assert [p["docs"] for p in tc.split_parts(offsets, 3)] == [[0, 2], [2, 3], [3, 4]]
  assert [p["tokens"] for p in tc.split_parts(offsets, 3)] == [[0, 5], [5, 9], [9, 10]]
  assert [p["docs"] for p in tc.split_parts(offsets, 99)] == [[0, 1], [1, 2], [2, 3], [3, 4]]
  assert tc.split_parts(offsets, 1) == [{"docs": [0, 4], "tokens": [0, 10]}]


@pytest.mark.slow
def test_two_parts_on_ray_equal_the_cache_made_here(run, ray_address, capsys):
  assert _cache_cli(run, f"--teacher={run['run_dir']}", "--parts=2", "--name=on_ray",
                    f"--ray={ray_address}") == 0
  assert "teacher_caches/on_ray/v1 (v1)" in capsys.readouterr().out
  cache = tc.open_teacher_cache(run["store"], "on_ray")
  assert len(cache.info["parts"]) == 2 and all(p["complete"] for p in cache.info["parts"])
  here = tc.open_teacher_cache(run["store"]).read(0, run["store"].num_tokens)
  got = cache.read(0, run["store"].num_tokens)
  np.testing.assert_array_equal(got[0], here[0])
  np.testing.assert_allclose(got[1], here[1], atol=2e-5)
  np.testing.assert_allclose(got[2], here[2], atol=2e-5)


def test_a_full_cache_trains_as_the_online_teacher(run):
  """A cache of the whole vocabulary (k = vocab_size) gives the online teacher's losses, KD and
  teacher CE for 3 steps: the rows carry its entries for exactly the pieces the student sees."""
  exp = run["exp"].replace(run={"seq_len": L, "global_batch_size": 8, "steps": 3},
                           data={"domains": ("web",)}, distill={"alpha": 0.5})
  distill_cache.cache_teacher(exp, "web", name="full", k=exp.model.vocab_size, seq_len=L)
  out = {}
  for name, e in (("online", exp), ("cached", exp.replace(distill={"cache": "full"}))):
    rt = build_runtime(e, teacher=teacher_for(e))
    assert rt.teacher.online == (name == "online")
    data = TrainBatches(e.data, L, 8, distill=e.distill)
    with rt.scope():
      state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, e.mesh.rules, 0, L)
      params = load_teacher_params(rt) if rt.teacher.online else None
      out[name] = []
      for step in range(3):
        state, metrics = rt.train_step(state, rt.put_batch(data.batch_at(step)),
                                       *rt.step_args(params))
        out[name].append([float(metrics[k]) for k in ("loss", "distill/kd",
                                                      "distill/teacher_ce",
                                                      "distill/top1_agreement")])
  np.testing.assert_allclose(out["cached"], out["online"], rtol=2e-5, atol=1e-6)


def test_training_on_a_store_without_the_cache_is_one_line(run):
  exp = run["exp"].replace(data={"domains": ("web", "other")}, distill={"cache": "teacher"})
  with pytest.raises(tc.TeacherCacheError, match=r"pretrainx distill cache"):
    TrainBatches(exp.data, L, 4, distill=exp.distill)
