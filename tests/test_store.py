"""Token stores: round trips, resumable and idempotent writes, corruption and mismatch errors,
the embedded-corpus store made once (also when threads race), and `inspect_text`."""

import json
import math
import os
import shutil
import threading
import time

import numpy as np
import pytest
import tensorstore as ts

from pretrainx.data import corpus
from pretrainx.data import store as token_store
from pretrainx.data import prepare as data_prepare
from pretrainx.data.store import StoreError
from pretrainx.config import CorpusTask, FileTask, MixtureSpec
from pretrainx.data.tasks import SourceDocument, has_validation, iter_documents
from pretrainx.vocab import ByteVocabulary

VOCAB = ByteVocabulary()
DOCS = [
    SourceDocument("plain ascii", None, None),
    SourceDocument("héllo wörld — 日本語 ✓ 🎉", "source/ü", 0.7),
    SourceDocument("", "empty-text", math.nan),
    SourceDocument("line one\nline two\ttabbed", None, -3.0),
]


def _docs(n, fail_at=None):
  """n deterministic documents; raises RuntimeError before document `fail_at`."""
  for i in range(n):
    if i == fail_at:
      raise RuntimeError("simulated interruption")
    yield SourceDocument(f"doc {i}: " + "é✓"[i % 2] * (i % 7), f"m{i}" if i % 3 else None,
                         i / 7 if i % 2 else None)


def _arrays(path):
  """Every array of a store, read straight from TensorStore."""
  out = {}
  for name in token_store.ARRAYS:
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / name)}}
    out[name] = np.asarray(ts.open(spec, open=True).result().read().result())
  return out


def _assert_same_store(a, b):
  arrays_a, arrays_b = _arrays(a), _arrays(b)
  for name in token_store.ARRAYS:
    assert arrays_a[name].dtype == arrays_b[name].dtype, name
    assert arrays_a[name].tobytes() == arrays_b[name].tobytes(), name
  assert json.loads((a / "manifest.json").read_text()) == json.loads(
      (b / "manifest.json").read_text())


def _freeze_mtimes(path):
  """Sets every file's mtime to a fixed past time; returns {file: mtime_ns}."""
  past = time.time_ns() - 10**12
  files = {}
  for root, _, names in os.walk(path):
    for n in names:
      f = os.path.join(root, n)
      os.utime(f, ns=(past, past))
      files[f] = past
  return files


def _mtimes(path):
  return {os.path.join(r, n): os.stat(os.path.join(r, n)).st_mtime_ns
          for r, _, names in os.walk(path) for n in names}


# -- round trips ---------------------------------------------------------------------------------


def test_round_trip_text_metadata_scores(tmp_path, monkeypatch):
  manifest = token_store.write_store(tmp_path / "s", DOCS, VOCAB, name="t", split="train")
  store = token_store.open_store(tmp_path / "s", VOCAB, verify=True)
  assert manifest["complete"] and store.num_docs == len(DOCS)
  lengths = [len(d.text.encode("utf-8")) + 1 for d in DOCS]  # bytes + eos
  assert store.doc_lengths.tolist() == lengths and store.num_tokens == sum(lengths)
  assert store.doc_offsets.dtype == np.int64 and store.doc_offsets[0] == 0
  for i, doc in enumerate(DOCS):
    ids = store.document(i)
    assert ids.dtype == np.int32 and ids[-1] == VOCAB.eos_id
    assert (ids[:-1] != VOCAB.eos_id).all()
    assert VOCAB.decode(ids) == doc.text
    assert store.metadata(i) == doc.metadata
  assert store.metadata_all() == [d.metadata for d in DOCS]
  assert store.scores.dtype == np.float32
  assert np.isnan(store.scores[[0, 2]]).all()
  np.testing.assert_array_equal(store.scores[[1, 3]], np.float32([0.7, -3.0]))

  # Stores over the in-memory limit read tokens through TensorStore: same answers.
  monkeypatch.setattr(token_store, "IN_MEMORY_BYTES", 0)
  lazy = token_store.open_store(tmp_path / "s", VOCAB)
  assert lazy._tokens is None  # pylint: disable=protected-access
  assert [VOCAB.decode(lazy.document(i)) for i in range(len(DOCS))] == [d.text for d in DOCS]
  np.testing.assert_array_equal(lazy.tokens(3, 30), store.tokens(3, 30))


def test_open_missing_store_says_prepare(tmp_path):
  with pytest.raises(StoreError, match="no token store.*data prepare"):
    token_store.open_store(tmp_path / "task" / "train")


def test_empty_document_set_is_an_error(tmp_path):
  with pytest.raises(StoreError, match="no documents for t"):
    token_store.write_store(tmp_path / "s", [], VOCAB, name="t", split="train")
  assert not (tmp_path / "s" / "manifest.json").exists()


# -- resumable, idempotent -----------------------------------------------------------------------


class _CountingVocab(ByteVocabulary):
  """ByteVocabulary that counts encode calls (the name and ids stay those of 'byte')."""

  calls = 0

  def encode(self, text):
    type(self).calls += 1
    return super().encode(text)


@pytest.mark.parametrize("crash", ["source", "commit"])
def test_interrupted_write_resumes_byte_identical(tmp_path, monkeypatch, crash):
  n, flush = 37, 4
  whole = tmp_path / "whole"
  token_store.write_store(whole, _docs(n), VOCAB, name="t", split="train", flush_every_docs=flush)

  part = tmp_path / "part"
  if crash == "source":  # the document source fails after 23 documents
    with pytest.raises(RuntimeError, match="simulated"):
      token_store.write_store(part, _docs(n, fail_at=23), VOCAB, name="t", split="train",
                              flush_every_docs=flush)
  else:  # killed after the arrays grew but before progress was recorded: they are cut back
    real_commit, commits = token_store.Appender.commit, []  # pylint: disable=protected-access

    def commit(self):
      if len(commits) == 4:
        raise RuntimeError("simulated kill in commit")
      commits.append(self.docs)
      real_commit(self)

    monkeypatch.setattr(token_store.Appender, "commit", commit)  # pylint: disable=protected-access
    with pytest.raises(RuntimeError, match="simulated"):
      token_store.write_store(part, _docs(n), VOCAB, name="t", split="train",
                              flush_every_docs=flush)
    monkeypatch.undo()
  done = json.loads((part / "progress.json").read_text())["docs"]
  assert 0 < done < n and done % flush == 0
  assert not (part / "manifest.json").exists()
  with pytest.raises(StoreError, match="half-written"):
    token_store.open_store(part, VOCAB)

  _CountingVocab.calls = 0
  token_store.write_store(part, _docs(n), _CountingVocab(), name="t", split="train",
                          flush_every_docs=flush)
  assert _CountingVocab.calls == n - done  # committed documents are not tokenized again
  _assert_same_store(whole, part)
  assert token_store.open_store(part, VOCAB, verify=True).num_docs == n


def test_half_written_store_of_another_vocabulary_is_refused(tmp_path):
  with pytest.raises(RuntimeError):
    token_store.write_store(tmp_path / "s", _docs(10, fail_at=5), VOCAB, flush_every_docs=2)
  with pytest.raises(StoreError, match="half-written store of another vocabulary"):
    token_store.write_store(tmp_path / "s", _docs(10), ByteVocabulary(extra_ids=64))


def test_second_write_of_a_complete_store_rewrites_nothing(tmp_path):
  path = tmp_path / "s"
  first = token_store.write_store(path, _docs(9), VOCAB, fingerprint={"v": (1, 2)},
                                  flush_every_docs=2)
  frozen = _freeze_mtimes(path)

  def never():
    raise AssertionError("a complete store must not read its source again")
    yield  # pylint: disable=unreachable

  # A fingerprint with a tuple compares equal to the one read back from JSON (a list).
  second = token_store.write_store(path, never(), VOCAB, fingerprint={"v": (1, 2)})
  assert second == first
  assert _mtimes(path) == frozen
  token_store.open_store(path, VOCAB, fingerprint={"v": (1, 2)})


def test_prepare_is_idempotent_and_skips_missing_validation(tmp_path):
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps({"text": f"row {i} ✓", "url": f"u{i}", "q": i / 4}) + "\n"
                          for i in range(12)))
  task = FileTask("web", (str(data),), metadata_field="url", score_field="q")
  assert not has_validation(task)
  root = tmp_path / "root"
  paths = data_prepare.prepare(task, root, VOCAB)
  assert paths == [str(root / "web" / "train")]
  assert not (root / "web" / "validation").exists()
  store = token_store.open_store(paths[0], VOCAB, fingerprint={"source": repr(task)}, verify=True)
  docs = list(iter_documents(task, "train"))
  assert [VOCAB.decode(store.document(i)) for i in range(store.num_docs)] == [d.text for d in docs]
  assert store.metadata_all() == [d.metadata for d in docs]
  np.testing.assert_array_equal(store.scores, np.float32([d.score for d in docs]))
  assert store.manifest["task"] == "web" and store.manifest["split"] == "train"

  frozen = _freeze_mtimes(root)
  assert data_prepare.prepare(task, root, VOCAB) == paths
  assert _mtimes(root) == frozen

  held = FileTask("web2", (str(data),), validation_fraction=0.5)
  assert has_validation(held)
  paths = data_prepare.prepare(held, root, VOCAB)
  assert paths == [str(root / "web2" / "train"), str(root / "web2" / "validation")]
  counts = [token_store.open_store(p, VOCAB).num_docs for p in paths]
  assert sum(counts) == 12 and min(counts) > 0


def test_prepare_mixture_by_name_and_prepare_main(tmp_path):
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6)))
  web = FileTask("web", (str(data),))
  mix = MixtureSpec("mix", {"web": 2.0, "prose": 1.0})
  specs = {"web": web, "mix": mix}
  root = tmp_path / "root"
  paths = data_prepare.prepare(mix, root, VOCAB, specs=specs)
  assert paths == [str(root / "web" / "train"), str(root / "prose" / "train"),
                   str(root / "prose" / "validation")]
  # The corpus stores are the ones training opens: no rebuild, nothing rewritten.
  frozen = _freeze_mtimes(root / "prose")
  for split in ("train", "validation"):
    opened = token_store.ensure_corpus_store(root, "prose", split, VOCAB, 0.05)
    assert opened.num_docs == len(list(iter_documents(CorpusTask("prose"), split)))
  lines = data_prepare.prepare_main(["mix", "web"], root, VOCAB, specs)
  assert _mtimes(root / "prose") == frozen
  assert len(lines) == 3 and lines[0].startswith("web/train: 6 documents, ")
  assert lines[1].startswith("prose/train: ") and str(root / "prose" / "validation") in lines[2]

  with pytest.raises(ValueError, match="unknown task 'nope' in mixture 'bad'.*'mix', 'web'"):
    data_prepare.prepare(MixtureSpec("bad", {"nope": 1.0}), root, VOCAB, specs=specs)
  loop = MixtureSpec("loop", {"loop": 1.0})
  with pytest.raises(ValueError, match="mixture 'loop' contains itself"):
    data_prepare.prepare_main(["loop"], root, VOCAB, {"loop": loop})
  with pytest.raises(ValueError, match="two different tasks are named 'web'"):
    data_prepare.prepare([web, FileTask("web", (str(tmp_path / "*.txt"),))], root, VOCAB)


# -- corruption and mismatches -------------------------------------------------------------------


def test_corrupt_chunk_is_caught(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  token_store.write_store(a, [SourceDocument("abcdef"), SourceDocument("xyz")], VOCAB)
  token_store.write_store(b, [SourceDocument("uvwxyz"), SourceDocument("abc")], VOCAB)
  chunk = a / "tokens" / "0"
  assert chunk.is_file()
  # A valid chunk with other tokens, same sizes: only the checksums can tell.
  shutil.copyfile(b / "tokens" / "0", chunk)
  assert VOCAB.decode(token_store.open_store(a, VOCAB).document(0)) == "uvwxyz"
  with pytest.raises(StoreError, match="corrupt.*checksum"):
    token_store.open_store(a, VOCAB, verify=True)
  # Bytes that do not decode at all: a StoreError (not a raw TensorStore error), verify or not.
  chunk.write_bytes(b"\x00garbage" * 16)
  for verify in (False, True):
    with pytest.raises(StoreError, match="corrupt.*delete it"):
      token_store.open_store(a, VOCAB, verify=verify)


def _resize(path, name, size):
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / name)}}
  ts.open(spec, open=True).result().resize(exclusive_max=[size]).result()


def _write_values(path, name, start, values):
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / name)}}
  arr = ts.open(spec, open=True).result()
  arr[start:start + len(values)].write(np.asarray(values, arr.dtype.numpy_dtype)).result()


@pytest.mark.parametrize("damage", ["manifest_tokens", "short_tokens", "short_scores",
                                    "doc_offsets", "meta_offsets", "missing_array"])
def test_inconsistent_sizes_are_caught(tmp_path, damage):
  path = tmp_path / "s"
  manifest = token_store.write_store(path, DOCS, VOCAB)
  n, total = manifest["num_docs"], manifest["num_tokens"]
  if damage == "manifest_tokens":
    (path / "manifest.json").write_text(json.dumps({**manifest, "num_tokens": total + 1}))
  elif damage == "short_tokens":
    _resize(path, "tokens", total - 1)
  elif damage == "short_scores":
    _resize(path, "scores", n - 1)
  elif damage == "doc_offsets":  # a document of negative length
    _write_values(path, "doc_offsets", 1, [total + 5])
  elif damage == "meta_offsets":  # metadata running past meta_bytes
    _write_values(path, "meta_offsets", n, [10**6])
  else:
    shutil.rmtree(path / "meta_bytes")
  with pytest.raises(StoreError, match="corrupt"):
    token_store.open_store(path, VOCAB)


def test_vocabulary_and_fingerprint_mismatch(tmp_path):
  path = tmp_path / "s"
  token_store.write_store(path, DOCS, VOCAB, fingerprint={"source": "a"})
  bigger = ByteVocabulary(extra_ids=64)
  with pytest.raises(StoreError) as err:
    token_store.open_store(path, bigger)
  for part in ("'byte'", "259", "byte+extra64", "323", "--overwrite"):
    assert part in str(err.value)
  with pytest.raises(StoreError) as err:
    token_store.write_store(path, DOCS, bigger, fingerprint={"source": "a"})
  assert "byte+extra64" in str(err.value) and "'byte'" in str(err.value)

  with pytest.raises(StoreError, match="'source': 'a'.*'source': 'b'"):
    token_store.write_store(path, DOCS, VOCAB, fingerprint={"source": "b"})
  with pytest.raises(StoreError, match="prepare it again with --overwrite"):
    token_store.open_store(path, VOCAB, fingerprint={"source": "b"})
  manifest = token_store.write_store(path, DOCS[:2], VOCAB, fingerprint={"source": "b"},
                                     overwrite=True)
  assert manifest["fingerprint"] == {"source": "b"} and manifest["num_docs"] == 2
  assert token_store.open_store(path, VOCAB, fingerprint={"source": "b"}).num_docs == 2
  with pytest.raises(StoreError):
    token_store.open_store(path, VOCAB, fingerprint={"source": "a"})


def test_unreadable_manifest(tmp_path):
  path = tmp_path / "s"
  token_store.write_store(path, DOCS, VOCAB)
  (path / "manifest.json").write_text("{not json")
  with pytest.raises(StoreError, match="manifest.*unreadable"):
    token_store.open_store(path)


# -- the embedded corpus -------------------------------------------------------------------------


def test_ensure_corpus_store_once_then_rebuilt_on_new_fraction(tmp_path):
  root = tmp_path / "root"
  store = token_store.ensure_corpus_store(root, "prose", "train", VOCAB, 0.05)
  expected = corpus.load_documents("train", ("prose",), 0.05)
  assert store.num_docs == len(expected) > 10
  assert VOCAB.decode(store.document(0)) == expected[0].text
  assert store.metadata_all() == [d.name for d in expected]
  assert store.manifest["fingerprint"] == {"corpus": "prose", "validation_fraction": 0.05}

  frozen = _freeze_mtimes(root / "prose" / "train")
  start = time.perf_counter()
  again = token_store.ensure_corpus_store(root, "prose", "train", VOCAB, 0.05)
  assert time.perf_counter() - start < 0.5
  assert again.manifest == store.manifest
  assert _mtimes(root / "prose" / "train") == frozen

  rebuilt = token_store.ensure_corpus_store(root, "prose", "train", VOCAB, 0.3)
  assert rebuilt.manifest["fingerprint"]["validation_fraction"] == 0.3
  assert rebuilt.num_docs == len(corpus.load_documents("train", ("prose",), 0.3)) < store.num_docs
  token_store.open_store(root / "prose" / "train", VOCAB, verify=True)
  # Only the store and its lock file are left: no temporary or stale copies.
  assert sorted(p.name for p in (root / "prose").iterdir()) == [".train.lock", "train"]


@pytest.mark.parametrize("existing", [None, 0.05])
def test_ensure_corpus_store_threads_race(tmp_path, monkeypatch, existing):
  root = tmp_path / "root"
  if existing is not None:  # racing to replace a store made for another validation_fraction
    token_store.ensure_corpus_store(root, "prose", "validation", VOCAB, existing)
  builds = []
  real_write = token_store._write_store_locked  # pylint: disable=protected-access

  def counting_write(*args, **kwargs):
    builds.append(args[0])
    time.sleep(0.2)  # widen the window in which the others arrive
    return real_write(*args, **kwargs)

  monkeypatch.setattr(token_store, "_write_store_locked", counting_write)
  n = 3
  barrier, results, errors = threading.Barrier(n), [None] * n, []

  def run(k):
    barrier.wait()
    try:
      results[k] = token_store.ensure_corpus_store(root, "prose", "validation", VOCAB, 0.2)
    except Exception as err:  # pylint: disable=broad-except
      errors.append(err)

  threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert len(builds) == 1  # one builder; the others waited for its store
  assert all(r.manifest == results[0].manifest for r in results)
  assert results[0].manifest["fingerprint"]["validation_fraction"] == 0.2
  for r in results:
    assert VOCAB.decode(r.document(0)) == VOCAB.decode(results[0].document(0))
  assert sorted(p.name for p in (root / "prose").iterdir()) == [".validation.lock", "validation"]


# -- inspect -------------------------------------------------------------------------------------


def test_inspect_text_shows_counts_and_text(tmp_path):
  token_store.write_store(tmp_path / "s", DOCS, VOCAB)
  store = token_store.open_store(tmp_path / "s", VOCAB)
  report = token_store.inspect_text(store, num_docs=2, vocabulary=VOCAB)
  assert f"4 documents, {store.num_tokens:,} tokens" in report
  assert "with metadata: 2, with scores: 2" in report
  assert "'plain ascii'" in report and "héllo wörld" in report and "source/ü" in report
  assert "line one" not in report  # only num_docs documents are shown
  raw = token_store.inspect_text(store, num_docs=1)
  assert str(VOCAB.encode("plain")[0]) in raw  # ids when no vocabulary is given
  assert token_store.inspect_text(tmp_path / "s", 2, VOCAB) == report  # a path works too
  with pytest.raises(StoreError, match="no token store"):
    token_store.inspect_text(tmp_path / "missing", 2, VOCAB)
