"""Data sources: FileTask formats (text, JSON lines, Parquet), clear errors, the hash-held-out
validation split, and SeqIO registration yielding exactly what `iter_documents` reads."""

import json
import math
import sys
import uuid

import pytest

from pretrainx.data import store as token_store
from pretrainx.data import prepare as data_prepare
from pretrainx.config import CorpusTask, FileTask, MixtureSpec
from pretrainx.data.tasks import (SourceDocument, has_validation, iter_documents, register_seqio, seqio_documents)
from pretrainx.vocab import ByteVocabulary


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                  encoding="utf-8")
  return path


def _docs(task, split="train"):
  return list(iter_documents(task, split))


# -- formats -------------------------------------------------------------------------------------


def test_text_files_one_document_per_file_in_sorted_order(tmp_path):
  (tmp_path / "b.txt").write_text("second — ✓\nwith two lines", encoding="utf-8")
  (tmp_path / "a.md").write_text("# first", encoding="utf-8")
  (tmp_path / "skip.jsonl").write_text("{}\n")
  task = FileTask("txt", (str(tmp_path / "*.txt"), str(tmp_path / "*.md")))
  assert _docs(task) == [SourceDocument("# first", "a.md"),
                         SourceDocument("second — ✓\nwith two lines", "b.txt")]
  assert _docs(task, "validation") == []  # no validation patterns, no fraction


def test_jsonl_with_metadata_and_score_fields(tmp_path):
  path = _jsonl(tmp_path / "d.jsonl", [
      {"body": "héllo", "url": "https://ü.example", "quality": 0.7},
      {"body": "no metadata", "quality": 2},
      {"body": 123, "url": None},
  ])
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n   \n")  # blank lines are skipped
  task = FileTask("web", str(path), text_field="body", metadata_field="url",
                  score_field="quality")
  assert task.train_patterns == (str(path),)  # a single pattern string becomes a tuple
  assert _docs(task) == [SourceDocument("héllo", "https://ü.example", 0.7),
                         SourceDocument("no metadata", None, 2.0),
                         SourceDocument("123", None, None)]
  plain = FileTask("web", (str(path),), text_field="body")  # fields not asked for are ignored
  assert [(d.metadata, d.score) for d in _docs(plain)] == [(None, None)] * 3


def test_parquet_rows(tmp_path):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel

  path = tmp_path / "rows.parquet"
  pq.write_table(pa.table({"text": ["row ✓ one", "row two"], "src": ["a", None],
                           "s": [0.5, None]}), path)
  task = FileTask("pq", (str(path),), metadata_field="src", score_field="s")
  assert _docs(task) == [SourceDocument("row ✓ one", "a", 0.5), SourceDocument("row two")]
  bad = FileTask("pq", (str(path),), text_field="content")
  with pytest.raises(ValueError, match="rows.parquet row 0 has no field 'content'"):
    _docs(bad)


def test_parquet_without_pyarrow_says_install_it(tmp_path, monkeypatch):
  path = tmp_path / "rows.parquet"
  path.write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
  with pytest.raises(ValueError, match="needs pyarrow; `pip install pyarrow`"):
    _docs(FileTask("pq", (str(path),)))


def test_auto_format_from_extension(tmp_path):
  (tmp_path / "a.txt").write_text("plain")
  _jsonl(tmp_path / "b.json", [{"text": "from .json"}])
  _jsonl(tmp_path / "c.jsonl", [{"text": "from .jsonl"}, {"text": "second line"}])
  task = FileTask("mixed", (str(tmp_path / "*"),))
  assert [d.text for d in _docs(task)] == ["plain", "from .json", "from .jsonl", "second line"]

  (tmp_path / "d.dat").write_text("unknown extension")
  with pytest.raises(ValueError, match=r"cannot tell the format of .*d\.dat.*FileTask\.format"):
    _docs(task)
  forced = FileTask("forced", (str(tmp_path / "*.dat"),), format="text")
  assert [d.text for d in _docs(forced)] == ["unknown extension"]


def test_spec_errors():
  with pytest.raises(ValueError, match="unknown format 'csv'.*'auto'"):
    FileTask("t", ("x",), format="csv")
  with pytest.raises(ValueError, match="needs a name"):
    FileTask(train_patterns=("x",))
  with pytest.raises(ValueError, match="unknown split 'test'"):
    _docs(CorpusTask("prose"), "test")
  with pytest.raises(ValueError, match="unknown corpus domain"):
    _docs(CorpusTask("poetry"))


def test_no_files_match_lists_the_patterns(tmp_path):
  patterns = (str(tmp_path / "nothing-*.jsonl"), str(tmp_path / "none/**/*.txt"))
  with pytest.raises(ValueError, match="task 'ghost': no files match") as err:
    _docs(FileTask("ghost", patterns))
  assert str(list(patterns)) in str(err.value)


def test_bad_json_lines_name_file_and_line(tmp_path):
  path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "no text field"}])
  with pytest.raises(ValueError, match=r"d\.jsonl:2 has no field 'text' \(fields: \['body'\]\)"):
    _docs(FileTask("t", (str(path),)))
  path.write_text('{"text": "ok"}\n{broken\n')
  with pytest.raises(ValueError, match=r"d\.jsonl:2 is not JSON"):
    _docs(FileTask("t", (str(path),)))
  path.write_text('{"text": "ok"}\n"a text string, not an object"\n')
  with pytest.raises(ValueError, match=r"d\.jsonl:2 is a JSON str, not an object"):
    _docs(FileTask("t", (str(path),)))


def test_empty_document_set_is_a_store_error(tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n\n")
  task = FileTask("empty", (str(tmp_path / "empty.jsonl"),))
  assert _docs(task) == []
  with pytest.raises(token_store.StoreError, match="no documents for empty"):
    data_prepare.prepare(task, tmp_path / "root", ByteVocabulary())


# -- validation split ----------------------------------------------------------------------------


def test_hash_held_out_validation(tmp_path):
  n = 400
  paths = [_jsonl(tmp_path / f"part{k}.jsonl", [{"text": f"doc {k}-{i}"} for i in range(n // 2)])
           for k in range(2)]
  task = FileTask("held", (str(tmp_path / "part*.jsonl"),), validation_fraction=0.2)
  train, valid = _docs(task, "train"), _docs(task, "validation")
  everything = [d.text for d in _docs(FileTask("all", (str(tmp_path / "part*.jsonl"),)))]
  assert set(d.text for d in train).isdisjoint(d.text for d in valid)
  assert sorted(d.text for d in train + valid) == sorted(everything)
  # Both splits keep the source order.
  for split in (train, valid):
    assert [d.text for d in split] == [t for t in everything if t in {d.text for d in split}]
  assert 0.12 * n < len(valid) < 0.28 * n
  # Deterministic: the same again, and from an equal spec.
  assert _docs(task, "validation") == valid
  same = FileTask("held", tuple(str(p) for p in paths), validation_fraction=0.2)
  assert _docs(same, "validation") == valid and _docs(same, "train") == train
  # A larger fraction holds out a superset (the hash, not a draw, decides).
  more = _docs(FileTask("held", task.train_patterns, validation_fraction=0.5), "validation")
  assert {d.text for d in valid} < {d.text for d in more}


def test_validation_patterns_and_has_validation(tmp_path):
  _jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(5)])
  _jsonl(tmp_path / "valid.jsonl", [{"text": "v0"}, {"text": "v1"}])
  task = FileTask("pv", (str(tmp_path / "train.jsonl"),), (str(tmp_path / "valid.jsonl"),),
                  validation_fraction=0.5)  # patterns win over the fraction
  assert [d.text for d in _docs(task, "train")] == [f"t{i}" for i in range(5)]
  assert [d.text for d in _docs(task, "validation")] == ["v0", "v1"]
  assert has_validation(task)
  assert has_validation(CorpusTask("prose"))
  assert not has_validation(FileTask("nv", (str(tmp_path / "train.jsonl"),)))


def test_corpus_task_documents():
  docs = _docs(CorpusTask("prose"), "validation")
  assert docs and all(d.metadata.startswith("prose/") and d.score is None for d in docs)
  assert CorpusTask("code").name == "code"
  wider = _docs(CorpusTask("prose", validation_fraction=0.3), "validation")
  assert len(wider) > len(docs)
  assert {d.metadata for d in wider}.isdisjoint(
      d.metadata for d in _docs(CorpusTask("prose", validation_fraction=0.3), "train"))


# -- SeqIO ---------------------------------------------------------------------------------------


def test_seqio_registration_matches_iter_documents(tmp_path):
  import seqio  # imports TensorFlow: ~15 s  # pylint: disable=import-outside-toplevel
  tag = uuid.uuid4().hex[:8]  # seqio registries are process-wide
  path = _jsonl(tmp_path / "d.jsonl", [
      {"text": f"doc {i} ✓ {'é' * i}", **({"url": f"u/{i}"} if i % 3 else {}),
       **({"q": i / 10} if i % 2 else {})} for i in range(20)])
  file_task = FileTask(f"file_{tag}", (str(path),), metadata_field="url", score_field="q",
                       validation_fraction=0.3)
  no_valid = FileTask(f"novalid_{tag}", (str(path),))
  prose = CorpusTask("prose")
  for spec in (file_task, no_valid, prose):
    assert register_seqio(spec) == spec.name
    assert register_seqio(spec) == spec.name  # the same spec again: fine
  for spec in (file_task, prose):
    for split in ("train", "validation"):
      expected = _docs(spec, split)
      assert expected, (spec.name, split)
      got = list(seqio_documents(spec.name, split))
      assert len(got) == len(expected)
      for g, e in zip(got, expected):  # scores like 0.1 survive exactly; None stays None
        assert (g.text, g.metadata) == (e.text, e.metadata)
        assert g.score == e.score or (g.score is None and e.score is None)
  assert 0.1 in [d.score for split in ("train", "validation") for d in _docs(file_task, split)]
  assert list(seqio_documents(no_valid.name, "validation")) == []

  with pytest.raises(ValueError, match=f"different task or mixture is already registered as "
                                       f"'file_{tag}'"):
    register_seqio(FileTask(f"file_{tag}", (str(path),)))

  mixture = MixtureSpec(f"mix_{tag}", {file_task.name: 3.0, prose.name: 1.0})
  assert register_seqio(mixture) == mixture.name
  assert register_seqio(mixture) == mixture.name
  registered = seqio.get_mixture_or_task(mixture.name)
  assert isinstance(registered, seqio.Mixture)
  assert {t.name for t in registered.tasks} == {file_task.name, prose.name}
  rates = {t.name: registered.get_rate(t) for t in registered.tasks}
  assert math.isclose(rates[file_task.name], 3.0) and math.isclose(rates[prose.name], 1.0)
  with pytest.raises(ValueError, match="already registered"):
    register_seqio(MixtureSpec(mixture.name, {prose.name: 1.0}))
