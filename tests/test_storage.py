"""pretrainx.storage on local disk, the GCS emulator and the S3 server: the same calls, the same
results, and one clear line for a missing bucket, a denied bucket or a glob with no matches."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pretrainx import storage

from servers import ServerError, free_port, start_gcs, start_s3


@pytest.fixture(params=["local", "gs", "s3"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_dir" if request.param == "gs" else "s3_dir")


def test_files_round_trip_everywhere(root):
  storage.makedirs(root)
  a = storage.join(root, "sub", "a.txt")
  storage.write_text(a, "hello ✓")
  storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
  storage.write_json(storage.join(root, "c.json"), {"x": [1, 2]})
  assert storage.read_text(a) == "hello ✓"
  assert storage.read_json(storage.join(root, "c.json")) == {"x": [1, 2]}
  assert storage.exists(a) and storage.isfile(a) and not storage.isdir(a)
  assert storage.isdir(storage.join(root, "sub"))
  assert storage.listdir(root) == ["c.json", "sub"]
  assert storage.listdir(storage.join(root, "nothing")) == []
  with storage.open_file(a, "r") as f:
    assert f.read() == "hello ✓"
  assert storage.glob(storage.join(root, "sub", "*.txt")) == [a]
  assert storage.glob(storage.join(root, "**", "*.txt")) == [a]
  assert storage.glob(storage.join(root, "*", "b.*")) == [storage.join(root, "sub", "b.bin")]
  moved = storage.move_tree(storage.join(root, "sub"), storage.join(root, "moved"),
                            delete_first=("a.txt",))
  assert storage.listdir(moved) == ["a.txt", "b.bin"]
  assert not storage.exists(storage.join(root, "sub"))
  storage.remove(storage.join(root, "c.json"))
  storage.remove(storage.join(root, "c.json"))  # already gone: no error
  storage.rmtree(root)
  assert not storage.exists(moved)


def test_names(tmp_path):
  assert storage.resolve("gs://b//x/./y/") == "gs://b/x/y"
  assert storage.resolve("~/x") == os.path.expanduser("~/x")
  assert storage.join("s3://b/x", "y", "z") == "s3://b/x/y/z"
  assert storage.parent("gs://b/x/y") == "gs://b/x" and storage.parent("gs://b") == "gs://b"
  assert storage.basename("gs://b/x/y/") == "y"
  with pytest.raises(storage.StorageError, match="unsupported storage scheme hdfs://"):
    storage.resolve("hdfs://x/y")


def test_kvstore_specs(tmp_path, s3_server):
  assert storage.kvstore(tmp_path) == {"driver": "file", "path": f"{tmp_path}/"}
  assert storage.kvstore("gs://runs/a/b") == {"driver": "gcs", "bucket": "runs", "path": "a/b/"}
  assert storage.kvstore("s3://data/x") == {"driver": "s3", "bucket": "data", "path": "x/",
                                            "endpoint": s3_server, "aws_region": "us-east-1",
                                            "aws_credentials": {"type": "environment"}}


def test_a_credentials_file_reaches_tensorstore(tmp_path, s3_server, monkeypatch):
  """Workers that get their keys from a credentials file (AWS_SHARED_CREDENTIALS_FILE), not their
  environment, read and write s3:// arrays: TensorStore's own chain ignores that variable."""
  import tensorstore as ts
  creds = tmp_path / "credentials"
  creds.write_text(f"[default]\naws_access_key_id = {os.environ['AWS_ACCESS_KEY_ID']}\n"
                   f"aws_secret_access_key = {os.environ['AWS_SECRET_ACCESS_KEY']}\n")
  for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws for the default chain to find
  spec = storage.kvstore("s3://data/creds-file")
  assert spec["aws_credentials"] == {"type": "profile", "profile": "default",
                                     "credentials_file": str(creds), "config_file": str(creds)}
  store = ts.KvStore.open(spec).result()
  store.write("k", b"v").result()
  assert store.read("k").result().value == b"v"
  default_chain = {k: v for k, v in spec.items() if k != "aws_credentials"}
  with pytest.raises(ValueError):  # what it was: TensorStore's chain finds no credentials
    ts.KvStore.open(default_chain).result().write("k", b"w").result()


def test_tensorstore_arrays_in_buckets(gcs_dir, s3_dir):
  import tensorstore as ts
  for root in (gcs_dir, s3_dir):
    spec = {"driver": "zarr", "kvstore": storage.kvstore(storage.join(root, "arr")),
            "metadata": {"shape": [10], "chunks": [4], "dtype": "<i4"}}
    arr = ts.open(spec, create=True).result()
    arr[2:5].write(np.array([1, 2, 3], np.int32)).result()
    again = ts.open({"driver": "zarr", "kvstore": spec["kvstore"]}, open=True).result()
    np.testing.assert_array_equal(again.read().result(), [0, 0, 1, 2, 3, 0, 0, 0, 0, 0])
    assert storage.exists(storage.join(root, "arr", ".zarray"))


@pytest.mark.parametrize("where", ["gs", "s3"])
def test_missing_bucket_is_one_line_with_the_fix(where, gcs_server, s3_server):
  path = f"{where}://no-such-bucket/run"
  create = "gcloud storage buckets create" if where == "gs" else "aws s3 mb"
  with pytest.raises(storage.StorageError) as err:
    storage.check_bucket(path, "write the run directory")
  assert str(err.value) == (
      f"cannot write the run directory {path}: bucket {where}://no-such-bucket does not exist; "
      f"create it (`{create} {where}://no-such-bucket`) or fix the path.")
  for call in (lambda: storage.write_text(path + "/x", "1"), lambda: storage.read_text(path + "/x"),
               lambda: storage.glob(path + "/*.jsonl")):
    with pytest.raises(storage.StorageError, match="no-such-bucket does not exist; create it"):
      call()


def test_appending_to_a_bucket_is_refused(gcs_dir):
  with pytest.raises(storage.StorageError, match="buckets cannot append"):
    storage.open_file(gcs_dir + "/m.jsonl", "a")


@pytest.fixture(scope="module")
def denying_s3():
  """A second S3 server that checks credentials (moto with IAM auth on): ours are unknown."""
  port = free_port()
  env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
  proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  import socket
  deadline = time.time() + 60
  while time.time() < deadline:
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        break
    time.sleep(0.2)
  yield f"http://127.0.0.1:{port}"
  proc.terminate()
  proc.wait(timeout=30)


def test_denied_bucket_says_check_credentials(denying_s3, tmp_path):
  code = ("from pretrainx import storage\n"
          "try:\n  storage.check_bucket('s3://data/run', 'write')\n"
          "except storage.StorageError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AWS_ENDPOINT_URL": denying_s3})
  assert out.stdout.strip() == (
      "cannot write s3://data/run: access to bucket s3://data is denied; check the AWS "
      "credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID, ~/.aws) and the bucket policy; "
      "AWS_ENDPOINT_URL points at another endpoint."), out.stderr[-2000:]


def test_staged_dir_uploads_whole_files_at_each_sync(gcs_dir):
  staged = storage.StagedDir(gcs_dir)
  with open(staged.path("m.json"), "a") as f:
    f.write("1\n")
  assert not storage.exists(gcs_dir + "/m.json")  # nothing until a sync
  staged.sync()
  assert storage.read_text(gcs_dir + "/m.json") == "1\n"
  with open(staged.path("m.json"), "a") as f:
    f.write("2\n")
  staged.close()
  assert storage.read_text(gcs_dir + "/m.json") == "1\n2\n"


def test_staged_dir_appends_parts_of_bounded_size(gcs_dir, monkeypatch):
  """Each sync of an appended file uploads only its new bytes; every MERGE_PARTS small parts
  become one object; a resumed writer goes on appending; a rewritten file starts a new epoch."""
  from pretrainx.storage import staged as staged_module
  monkeypatch.setattr(staged_module, "MERGE_PARTS", 3)
  sent = []
  write = storage.write_bytes
  monkeypatch.setattr(staged_module, "write_bytes",
                      lambda p, d: sent.append(len(d)) or write(p, d))
  path = gcs_dir + "/m.jsonl"
  staged = storage.StagedDir(gcs_dir, appended={"m.jsonl": storage.PARTS_DIR})
  for i in range(7):
    with open(staged.path("m.jsonl"), "a") as f:
      f.write(f"{i}\n")
    staged.sync()
  staged.sync()  # nothing new: nothing sent
  assert sent == [2, 2, 2, 6, 2, 2, 2, 6, 2]  # new bytes, and a merge every 3 parts
  assert storage.listdir(path + ".parts") == ["0000-000000000000", "0000-000000000006",
                                              "0000-000000000012"]
  assert storage.read_appended(path) == b"0\n1\n2\n3\n4\n5\n6\n"
  staged.close()
  again = storage.StagedDir(gcs_dir, pull=("m.jsonl",), appended={"m.jsonl": storage.PARTS_DIR})
  with open(again.path("m.jsonl"), "a") as f:
    f.write("7\n")
  again.sync()
  assert storage.read_appended(path) == b"0\n1\n2\n3\n4\n5\n6\n7\n"
  with open(again.path("m.jsonl"), "w") as f:  # rewritten, as a resume that drops rows does
    f.write("0\n1\n")
  again.replaced("m.jsonl")
  again.close()
  assert storage.listdir(path + ".parts") == ["0001-000000000000"]
  assert storage.read_appended(path) == b"0\n1\n"
  storage.remove(path)
  assert not storage.exists(path + ".parts")


@pytest.mark.parametrize("where", ["local", "gs", "s3"])
def test_exclusive_refuses_a_second_holder_and_frees_on_exit(where, request, tmp_path):
  root = str(tmp_path) if where == "local" else request.getfixturevalue(
      "gcs_dir" if where == "gs" else "s3_dir")
  lock = storage.join(root, ".store.lock")
  with storage.exclusive(lock, "preparing the store"):
    with pytest.raises(storage.StorageError, match="is preparing the store") as err:
      with storage.exclusive(lock, "preparing the store"):
        pass
    if where != "local":
      assert f"pid {os.getpid()}" in str(err.value) and "when its lease expires" in str(err.value)
  with storage.exclusive(lock, "preparing the store"):  # released: free again
    pass
  if where != "local":
    assert not storage.exists(lock)


def test_a_second_prepare_of_the_same_store_in_a_bucket_is_refused(gcs_dir):
  from pretrainx.data import store as token_store
  from pretrainx.data.tasks import SourceDocument
  from pretrainx.vocab import ByteVocabulary
  path = f"{gcs_dir}/stores/web/train"
  with storage.exclusive(token_store.lock_path(path), "preparing"):
    with pytest.raises(storage.StorageError, match=r"is writing the token store .*Wait for it"):
      token_store.write_store(path, [SourceDocument("x")], ByteVocabulary())
  manifest = token_store.write_store(path, [SourceDocument("x")], ByteVocabulary())
  assert manifest["complete"] and not storage.exists(token_store.lock_path(path))


@pytest.mark.parametrize("where", ["gs", "s3"])
def test_exclusive_waits_for_the_holder(where, request):
  lock = storage.join(request.getfixturevalue("gcs_dir" if where == "gs" else "s3_dir"), "l")
  order = []

  def hold():
    with storage.exclusive(lock, "working"):
      order.append("first in")
      time.sleep(1.5)
      order.append("first out")

  t = threading.Thread(target=hold)
  t.start()
  while not order:
    time.sleep(0.05)
  with storage.exclusive(lock, "working", wait_seconds=60):
    order.append("second in")
  t.join()
  assert order == ["first in", "first out", "second in"]


HOLD_LEASE = """
import sys, time
from pretrainx import storage
with storage.exclusive(sys.argv[1], "writing the token store"):
  print("held", flush=True)
  time.sleep(600)
"""

PREPARE_GIN = """
include 'gin_configs/tiny.gin'
DataConfig.domains = ['web']
DataConfig.tasks = [@web/FileTask()]
DataConfig.store_dir = '{root}/stores'
web/FileTask.name = 'web'
web/FileTask.train_patterns = ['{root}/data/train.jsonl']
web/FileTask.validation_patterns = ['{root}/data/valid.jsonl']
"""


@pytest.mark.parametrize("where", ["gs", "s3"])
def test_a_killed_holders_lease_is_taken_over_after_its_ttl(where, request, tmp_path):
  """Two processes: one holds a store's lease (renewing it) and is killed with SIGKILL; a
  `data prepare` of that store, run as users run it, takes the lease over once it is older than
  its TTL, names the dead holder, and prints few lines (no ~/.aws: TensorStore is quiet)."""
  from conftest import REPO
  from pretrainx.data import store as token_store
  root = request.getfixturevalue("gcs_dir" if where == "gs" else "s3_dir")
  storage.write_text(f"{root}/data/train.jsonl", json.dumps({"text": "a document " * 20}) + "\n")
  storage.write_text(f"{root}/data/valid.jsonl", json.dumps({"text": "held out"}) + "\n")
  (tmp_path / "home").mkdir()
  gin = tmp_path / "web.gin"
  gin.write_text(PREPARE_GIN.format(root=root))
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
         "PRETRAINX_LEASE_TTL_S": "2", "HOME": str(tmp_path / "home")}
  lock = token_store.lock_path(f"{root}/stores/web/train")
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, lock], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    first = storage.read_json(lock)
    time.sleep(1.0)  # the holder renews its lease every TTL / 3
    assert storage.read_json(lock)["beat"] > first["beat"]
  finally:
    holder.kill()
    holder.wait()
  time.sleep(2.0)  # the TTL
  start = time.monotonic()
  out = subprocess.run([sys.executable, "-m", "pretrainx", "--cpu_devices=2", "data", "prepare",
                        "web", f"--gin_file={gin}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"taking over the lease {lock}: its holder (host {socket.gethostname()}, pid " \
         f"{holder.pid}, since {first['since']}) has not renewed it" in out.stderr
  assert "web/train: 1 documents" in out.stdout and not storage.exists(lock)
  lines = (out.stdout + out.stderr).splitlines()
  assert len(lines) < 20, "\n".join(lines[:40])
  print(f"prepare with a takeover: {time.monotonic() - start:.1f} s, {len(lines)} lines")


def test_local_copy_downloads_a_bucket_file(gcs_dir, tmp_path):
  storage.write_bytes(gcs_dir + "/w.bin", b"abc")
  with storage.local_copy(gcs_dir + "/w.bin") as local:
    assert not storage.is_remote(local) and open(local, "rb").read() == b"abc"
  assert not os.path.exists(local)
  with storage.local_copy(tmp_path / "x") as same:
    assert same == str(tmp_path / "x")


def test_gin_files_read_from_a_bucket(gcs_dir):
  from pretrainx.config import parse_gin
  storage.write_text(gcs_dir + "/exp.gin", "include 'gin_configs/tiny.gin'\n"
                     "RunConfig.steps = 7\n")
  assert parse_gin([gcs_dir + "/exp.gin"]).run.steps == 7
  with pytest.raises(FileNotFoundError, match="gin file gs://.*missing.gin not found"):
    parse_gin([gcs_dir + "/missing.gin"])


def test_results_rows_many_writers_one_bucket(gcs_dir):
  from pretrainx.scaling import results
  table = gcs_dir + "/results"
  row = lambda i: {"run": f"r{i}", "config_hash": f"h{i}", "N": 10 * (i + 1), "D": 1000, "C": 6e4,
                   "train_loss": 2.0 - i / 10, "eval_loss": float("nan") if i == 2 else 2.1,
                   "domain_losses": {"prose": 2.1}, "bindings": ["a = 1"], "seconds": 1.0,
                   "status": "done"}
  threads = [threading.Thread(target=results.append_result, args=(table, row(i))) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  rows = results.load_results(table)
  assert sorted(r["run"] for r in rows) == ["r0", "r1", "r2", "r3"]
  assert [r for r in rows if r["run"] == "r2"][0]["eval_loss"] is None  # NaN stays strict JSON
  assert rows[0]["domain_losses"] == {"prose": 2.1} and rows[0]["bindings"] == ["a = 1"]
  for name in storage.listdir(table):
    json.loads(storage.read_text(storage.join(table, name)))
  with pytest.raises(storage.StorageError, match="SQLite cannot live in a bucket"):
    results.append_result(gcs_dir + "/results.sqlite", row(0))


# Where pretrainx may still touch the local file system directly, and why: none of these is a
# path a user gives (staging and temporary directories, the embedded corpus, gin's local search
# path, the local-only legacy SQLite table). Gin text no longer goes through temporary files.
_LOCAL_ONLY = {
    "pretrainx/config/gin_io.py": 1,  # gin search paths, for local gin files
    "pretrainx/metrics.py": 5,        # the local staging copy that StagedDir uploads (and that a
                                      # resumed run rewrites without the rows past its step)
    "pretrainx/data/corpus.py": 3,    # the embedded corpus is Python's own stdlib
    "pretrainx/scaling/results.py": 4,  # legacy SQLite tables, refused for buckets
    "pretrainx/scaling/ray_sweep.py": 4,  # a run's local log file and work directory
    "pretrainx/cluster.py": 4,        # /proc: the local Ray cluster's processes, machine facts
    "pretrainx/platforms.py": 6,      # TPU devices under /dev and /sys: machine facts
    "pretrainx/multihost.py": 1,      # libtpu's own file: a machine fact
    "pretrainx/harness/score_docs.py": 1,  # the local staging copy that StagedDir uploads
    "pretrainx/train/goodput.py": 3,  # the local staging copy that StagedDir uploads
    # The local checkpoint tier: each host's own disk or RAM by design (a bucket is refused),
    # shared with Orbax's P2P file server, which reads and writes it with os and shutil.
    "pretrainx/checkpoint/local.py": 30,
}


def test_no_module_but_storage_touches_files_directly():
  import re
  pattern = re.compile(r"(?<![\w.])open\(|glob\.glob|os\.listdir|shutil\.|os\.makedirs|os\.remove|"
                       r"os\.rename|os\.replace|os\.path\.(exists|isdir|isfile)|sqlite3\.connect")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  found = {}
  for folder, _, files in os.walk(os.path.join(repo, "pretrainx")):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), repo)
        if not rel.startswith("pretrainx/storage/"):
          hits = len(pattern.findall(open(os.path.join(folder, name)).read()))
          if hits:
            found[rel] = hits
  assert found == _LOCAL_ONLY


def test_file_tasks_stream_jsonl_text_and_parquet_from_a_bucket(s3_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from pretrainx.config import FileTask
  from pretrainx.data.tasks import iter_documents
  table = pa.table({"text": [f"doc {i}" for i in range(2500)], "q": [i / 10 for i in range(2500)]})
  sink = pa.BufferOutputStream()
  pq.write_table(table, sink, row_group_size=700)
  storage.write_bytes(f"{s3_dir}/d/a.parquet", sink.getvalue().to_pybytes())
  storage.write_text(f"{s3_dir}/d/sub/b.jsonl", '{"text": "json doc", "q": 1}\n')
  storage.write_text(f"{s3_dir}/d/c.txt", "a whole text file")
  task = FileTask("t", (f"{s3_dir}/d/**/*.*",), score_field="q")
  docs = list(iter_documents(task, "train"))
  assert [d.text for d in docs[:2]] == ["doc 0", "doc 1"] and docs[2499].score == 249.9
  assert [d.text for d in docs[2500:]] == ["a whole text file", "json doc"]  # sorted paths
  assert docs[2500].metadata == "c.txt"


def test_fit_reads_a_csv_the_user_brings_from_a_bucket(gcs_dir, capsys):
  """`pretrainx fit gs://.../runs.csv`: the table read from the bucket, the report written there."""
  from pretrainx import cli
  rng = np.random.default_rng(0)
  lines = ["N,D,loss"]
  for n in (1e5, 3e5, 1e6, 3e6):
    for d in (1e7, 3e7, 1e8):
      loss = 1.7 + 400 / n ** 0.34 + 410 / d ** 0.28 + rng.normal(0, 1e-3)
      lines.append(f"{int(n)},{int(d)},{loss:.5f}")
  storage.write_text(f"{gcs_dir}/runs.csv", "\n".join(lines) + "\n")
  assert cli.main(["fit", f"{gcs_dir}/runs.csv", "--bootstrap=4"]) == 0
  assert capsys.readouterr().out.startswith(f"12 runs from {gcs_dir}/runs.csv (loss: eval_loss)")
  assert "fit.json" in storage.listdir(f"{gcs_dir}/fit")
  report = json.loads(storage.read_text(f"{gcs_dir}/fit/fit.json"))
  assert report["chinchilla"]["E"] == pytest.approx(1.7, abs=0.15)


def test_fit_reads_parquet_and_csv_tables(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from pretrainx.scaling.results import load_results
  pq.write_table(pa.table({"N": [1e5, 2e5], "D": [1e7, 1e7], "loss": [3.0, 2.9]}),
                 str(tmp_path / "t.parquet"))
  rows = load_results(str(tmp_path / "t.parquet"))
  assert [(r["N"], r["eval_loss"], r["status"]) for r in rows] == [(100000, 3.0, "done"),
                                                                    (200000, 2.9, "done")]
  assert rows[0]["C"] == 6 * 1e5 * 1e7
  (tmp_path / "bad.csv").write_text("N,tokens,loss\n1,2,3\n")
  with pytest.raises(ValueError, match=r"lacks column\(s\) \['D'\].*give N .*D .*and loss"):
    load_results(str(tmp_path / "bad.csv"))
  with pytest.raises(FileNotFoundError, match="results table .*missing.csv not found"):
    load_results(str(tmp_path / "missing.csv"))


def test_a_test_server_that_cannot_start_says_what_to_free():
  """The fixtures' servers: a taken port is one line naming it, not a time-out."""
  with socket.socket() as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    for start in (start_gcs, start_s3):
      with pytest.raises(ServerError, match=rf"cannot listen on 127\.0\.0\.1:{port} .*free the "
                                            "port"):
        start(port, ("x",))
