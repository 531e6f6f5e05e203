"""Ray: `data prepare --ray` and `sweep --ray` on a local Ray cluster started by the fixture.

Prepared stores are compared byte for byte with the in-process ones; workers, drivers and runs are
killed for real (SIGKILL, SIGINT) and the reruns checked. A FIFO as one input file holds a shard's
task at a known point: its reader blocks until the test writes the file's contents.
"""

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pretrainx import cluster
from pretrainx.data import prepare
from pretrainx.data import store as token_store
from pretrainx.config import FileTask
from pretrainx.data.tasks import iter_documents
from pretrainx.vocab import ByteVocabulary
from pretrainx.scaling.results import load_results

from conftest import REPO

pytestmark = pytest.mark.xdist_group("ray")  # one cluster per module, on one test process
import ray  # noqa: E402

VOCAB = ByteVocabulary()
TINY = os.path.join(REPO, "gin_configs/tiny.gin")


def _write_files(folder, files=4, docs=120):
  os.makedirs(folder, exist_ok=True)
  contents = {}
  for f in range(files):
    lines = [json.dumps({"text": f"file {f} doc {i} " + "é abc " * (i % 37), "url": f"u/{f}/{i}",
                         "quality": i / 7}) for i in range(docs)]
    contents[f"f{f}.jsonl"] = "\n".join(lines) + "\n"
    with open(os.path.join(folder, f"f{f}.jsonl"), "w", encoding="utf-8") as out:
      out.write(contents[f"f{f}.jsonl"])
  return contents


def _task(folder):
  return FileTask("web", (os.path.join(folder, "*.jsonl"),), metadata_field="url",
                  score_field="quality", validation_fraction=0.1)


def _tree(folder):
  """{relative path: bytes} of every file under folder."""
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _gin(tmp_path, data, stores):
  path = tmp_path / "data.gin"
  path.write_text(f"include {TINY!r}\nDataConfig.domains = ['web']\n"
                  "DataConfig.tasks = [@web/FileTask()]\n"
                  f"DataConfig.store_dir = {str(stores)!r}\n"
                  "web/FileTask.name = 'web'\n"
                  f"web/FileTask.train_patterns = [{os.path.join(str(data), '*.jsonl')!r}]\n"
                  "web/FileTask.metadata_field = 'url'\nweb/FileTask.score_field = 'quality'\n"
                  "web/FileTask.validation_fraction = 0.1\n")
  return str(path)


def _cli(*args, env=None, **kwargs):
  return subprocess.run([sys.executable, "-m", "pretrainx", *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=300, **kwargs)


@pytest.mark.slow
def test_prepare_on_two_workers_equals_in_process_byte_for_byte(tmp_path, ray_address):
  data = tmp_path / "data"
  _write_files(data)
  stores = tmp_path / "stores"
  out = _cli("data", "prepare", "web", f"--gin_file={_gin(tmp_path, data, stores)}",
             f"--ray={ray_address}")
  assert out.returncode == 0, out.stderr
  assert "web/train:" in out.stdout and "web/validation:" in out.stdout
  task = _task(data)
  for split in ("train", "validation"):
    here = tmp_path / "here" / split
    manifest = prepare.prepare_file_split(str(here), task, split, VOCAB)
    on_ray = _tree(stores / "web" / split)
    assert ".parts/plan.json" not in on_ray  # the parts are gone once the store is complete
    assert on_ray == _tree(here)
    # ...and token for token what one process writing the documents in order makes
    one = token_store.write_store(str(tmp_path / "one" / split), iter_documents(task, split),
                                  VOCAB, name="web", split=split,
                                  fingerprint={"source": repr(task)})
    assert one == manifest and manifest["num_docs"] > 0


SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


def _job_env_vars(driver_pid):
  """The env_vars of the runtime environment Ray keeps with the job whose driver is driver_pid,
  as the cluster's job table holds it."""
  from ray._private import state
  from ray.core.generated import gcs_pb2

  table = state.state._connect_and_get_accessor().get_job_table(  # pylint: disable=protected-access
      skip_submission_job_info_field=True, skip_is_running_tasks_field=True)
  for raw in table:
    entry = gcs_pb2.JobTableData.FromString(raw)
    if entry.driver_pid == driver_pid:
      serialized = entry.config.runtime_env_info.serialized_runtime_env
      return json.loads(serialized or "{}").get("env_vars", {})
  raise AssertionError(f"no job of driver {driver_pid} in the cluster's job table")


def test_prepare_on_ray_from_and_into_buckets_sends_no_secrets(tmp_path, gcs_dir, s3_dir,
                                                               ray_address):
  """Input files in gs:// (the emulator), the store in s3:// (moto): `data prepare --ray` joins
  the cluster, whose workers have credentials of their own (see ray_address); the job's runtime
  environment, read back from Ray, locates both servers but holds no secret, and the store equals
  the local one."""
  from pretrainx import storage

  local = tmp_path / "data"
  for name, text in _write_files(local, files=3, docs=40).items():
    storage.write_text(f"{gcs_dir}/data/{name}", text)
  gin = tmp_path / "bucket.gin"
  gin.write_text(f"include {TINY!r}\nDataConfig.domains = ['web']\n"
                 "DataConfig.tasks = [@web/FileTask()]\n"
                 f"DataConfig.store_dir = '{s3_dir}/stores'\n"
                 "web/FileTask.name = 'web'\n"
                 f"web/FileTask.train_patterns = ['{gcs_dir}/data/*.jsonl']\n"
                 "web/FileTask.metadata_field = 'url'\nweb/FileTask.score_field = 'quality'\n"
                 "web/FileTask.validation_fraction = 0.1\n")
  env = dict(os.environ, AWS_SESSION_TOKEN="session-secret", PRETRAINX_API_KEY="key-secret")
  proc = subprocess.Popen([sys.executable, "-m", "pretrainx", "data", "prepare", "web",
                           "--split=train", f"--gin_file={gin}", f"--ray={ray_address}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert "web/train:" in out
  sent = _job_env_vars(proc.pid)
  assert not [k for k in sent if SECRET_NAME.search(k)], sorted(sent)
  assert "session-secret" not in sent.values() and os.environ["AWS_SECRET_ACCESS_KEY"] not in \
      sent.values()
  assert {"STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL", "AWS_REGION"} <= set(sent), sorted(sent)
  store = f"{s3_dir}/stores/web/train"
  remote = json.loads(storage.read_text(f"{store}/manifest.json"))
  here = prepare.prepare_file_split(str(tmp_path / "here"), _task(str(local)), "train", VOCAB)
  assert remote["checksums"] == here["checksums"] and remote["num_docs"] == here["num_docs"]
  assert token_store.open_store(store, VOCAB, verify=True)
  assert not storage.glob(f"{store}/.parts/*")


def _fifo_reader(fifo, timeout=120.0):
  """Waits for a process to open the FIFO for reading; returns (its pid, our write end)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
      if err.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
        raise
      time.sleep(0.05)
      continue
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    for _ in range(100):
      for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
          links = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
          continue
        if str(fifo) in links and int(pid) != os.getpid():
          return int(pid), fd
      time.sleep(0.05)
    raise AssertionError(f"the FIFO {fifo} is open, but no process shows it")
  raise AssertionError(f"no task opened {fifo} within {timeout} s")


def _holds(pid, path):
  """Whether process `pid` has `path` open."""
  try:
    return any(os.readlink(f"/proc/{pid}/fd/{n}") == str(path)
               for n in os.listdir(f"/proc/{pid}/fd"))
  except OSError:  # gone
    return False


def _make_fifo_input(data):
  """Four regular files and a FIFO as the last one (f4.jsonl); returns the FIFO's contents."""
  _write_files(data)
  contents = "".join(json.dumps({"text": f"late doc {i}", "url": f"late/{i}", "quality": 1.0})
                     + "\n" for i in range(50))
  os.mkfifo(data / "f4.jsonl")
  return contents


def _replace_fifo(data, contents):
  os.unlink(data / "f4.jsonl")
  (data / "f4.jsonl").write_text(contents, encoding="utf-8")


@pytest.mark.slow
def test_worker_killed_mid_prepare_is_retried_and_the_store_is_the_same(tmp_path, ray_address):
  data = tmp_path / "data"
  contents = _make_fifo_input(data)
  task = _task(data)
  where = cluster.connect(ray_address)
  result = {}

  def drive():
    try:
      result["manifest"] = prepare.prepare_file_split(str(tmp_path / "ray"), task, "train",
                                                      VOCAB, cluster=where)
    except Exception as err:  # pylint: disable=broad-except
      result["error"] = err

  driver = threading.Thread(target=drive)
  driver.start()
  pid, fd = _fifo_reader(data / "f4.jsonl")
  os.kill(pid, signal.SIGKILL)  # the Ray worker tokenizing the FIFO's shard dies mid-task
  os.close(fd)
  deadline = time.monotonic() + 60
  while _holds(pid, data / "f4.jsonl"):  # until the dead worker's files are closed
    assert time.monotonic() < deadline, f"worker {pid} still holds the FIFO after SIGKILL"
    time.sleep(0.05)
  pid2, fd = _fifo_reader(data / "f4.jsonl")  # Ray retried the task on a new worker
  assert pid2 != pid
  os.write(fd, contents.encode())
  os.close(fd)
  driver.join(120)
  assert "error" not in result, result.get("error")
  _replace_fifo(data, contents)
  here = prepare.prepare_file_split(str(tmp_path / "here"), task, "train", VOCAB)
  assert result["manifest"] == here
  assert _tree(tmp_path / "ray") == _tree(tmp_path / "here")


@pytest.mark.slow
def test_killed_prepare_reruns_only_unfinished_shards(tmp_path, ray_address):
  data = tmp_path / "data"
  contents = _make_fifo_input(data)
  stores = tmp_path / "stores"
  gin = _gin(tmp_path, data, stores)
  cmd = [sys.executable, "-m", "pretrainx", "data", "prepare", "web", "--split=train",
         f"--gin_file={gin}", f"--ray={ray_address}"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _, fd = _fifo_reader(data / "f4.jsonl")
  parts = stores / "web" / "train" / ".parts"
  deadline = time.monotonic() + 120
  while sum(os.path.exists(parts / f"{i:05d}" / "part.json") for i in range(4)) < 4:
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.1)
  proc.kill()  # the whole prepare dies with one shard unfinished
  proc.wait()
  os.close(fd)
  assert not (stores / "web" / "train" / "manifest.json").exists()
  # The finished shards' files go away: a rerun that tokenized them again would fail.
  saved = {f"f{i}.jsonl": (data / f"f{i}.jsonl").read_text() for i in range(4)}
  for name in saved:
    os.unlink(data / name)
  _replace_fifo(data, contents)
  out = _cli(*cmd[3:])
  assert out.returncode == 0, out.stderr
  assert "web/train:" in out.stdout
  for name, text in saved.items():
    (data / name).write_text(text)
  here = tmp_path / "here"
  prepare.prepare_file_split(str(here), _task(data), "train", VOCAB)
  assert _tree(stores / "web" / "train") == _tree(here)


def test_unreachable_ray_address_is_one_line_and_exit_2(tmp_path):
  out = _cli("data", "prepare", "prose", "--ray=127.0.0.1:9")
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0
  assert "cannot reach a Ray cluster at 127.0.0.1:9" in out.stderr
  assert "ray start --head" in out.stderr


def test_ray_address_without_a_ray_head_fails_in_seconds_with_one_line(ray_address):
  """An HTTP server (what the dashboard's port is) given as --ray: exit 2 and one line in seconds,
  where ray.init retried for 14 minutes; so does a head that wants a token this shell lacks."""
  import http.server

  class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # pylint: disable=arguments-differ
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    address = f"127.0.0.1:{server.server_address[1]}"  # (bench/ray_faults.py times ray:// too)
    start = time.monotonic()
    out = _cli("data", "prepare", "prose", f"--ray={address}")
    seconds = time.monotonic() - start
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert f"{address} answers, but not as a Ray head" in out.stderr
    assert "ray start --head" in out.stderr and "--address" not in out.stderr
    assert seconds < 30, seconds
  finally:
    server.shutdown()
  env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # the fixture set it
  out = _cli("data", "prepare", "prose", f"--ray={ray_address}", env=env)
  assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
  assert "asks for its auth token: set RAY_AUTH_MODE=token" in out.stderr


def test_auto_without_a_cluster_here_says_what_to_do(monkeypatch):
  from ray._private import services

  def none_here(*_):
    raise ConnectionError("Could not find any running Ray instance. Please specify the one to "
                          "connect to by setting `--address` flag or `RAY_ADDRESS` ...")

  monkeypatch.delenv("RAY_ADDRESS", raising=False)
  monkeypatch.setattr(services, "get_ray_address_from_environment", none_here)
  with pytest.raises(cluster.ClusterError) as err:
    cluster._resolve("auto")  # pylint: disable=protected-access
  assert "no Ray cluster runs on this machine" in str(err.value)
  assert "--address" not in str(err.value) and "ray start --head" in str(err.value)


def test_a_bad_input_line_on_ray_reads_as_it_does_here(tmp_path, ray_address):
  """A malformed JSON line, found by a task on the cluster: exit 2 and the one line that names the
  file and line, without Ray's remote traceback or colour codes."""
  data = tmp_path / "data"
  _write_files(data, files=2, docs=10)
  with open(data / "f1.jsonl", "a", encoding="utf-8") as f:
    f.write('{"text": "cut off\n')
  out = _cli("data", "prepare", "web", "--split=train",
             f"--gin_file={_gin(tmp_path, data, tmp_path / 'stores')}", f"--ray={ray_address}")
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().count("\n") == 0, out.stderr
  assert f"{data / 'f1.jsonl'}:11 is not JSON" in out.stderr
  assert "\x1b[" not in out.stderr and "Traceback" not in out.stderr


def test_driver_prints_its_workers_logs_but_not_other_processes_tpu_logs():
  """Ray's log monitor streams each node's tpu_logs folder (any process's libtpu logs) to every
  driver, as lines without a worker pid: connect() keeps those out of the driver's output."""
  import types

  printed = []
  fake = types.SimpleNamespace(print_to_stdstream=lambda data, **kw: printed.append(data["pid"]))
  cluster._print_only_job_logs(fake)  # pylint: disable=protected-access
  cluster._print_only_job_logs(fake)  # pylint: disable=protected-access  (wrapped once)
  for pid, job in ((None, None), (None, ""), (1234, "01000000"), ("raylet", None),
                   ("autoscaler", None), (5678, None)):
    fake.print_to_stdstream({"pid": pid, "job": job, "lines": ["x"], "is_err": True},
                            ignore_prefix=False)
  assert printed == [1234, "raylet", "autoscaler", 5678]


def test_forwarded_environment_locates_storage_and_holds_no_secret():
  env = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
         "AWS_SHARED_CREDENTIALS_FILE": "/f", "AWS_PROFILE": "p", "AWS_REGION": "r",
         "AWS_DEFAULT_REGION": "r", "AWS_ENDPOINT_URL": "e", "AWS_ENDPOINT_URL_S3": "e",
         "GOOGLE_APPLICATION_CREDENTIALS": "/g", "GOOGLE_CLOUD_PROJECT": "p",
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "t", "STORAGE_EMULATOR_HOST": "h", "HF_TOKEN": "t",
         "HF_HOME": "/h", "PRETRAINX_DATA_DIR": "/d", "PRETRAINX_API_KEY": "k",
         "JAX_PLATFORMS": "cpu", "EPATH_USE_TF": "false", "HOME": "/root"}
  assert sorted(cluster.forwarded_env(env)) == [
      "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
      "EPATH_USE_TF", "GOOGLE_CLOUD_PROJECT", "HF_HOME", "JAX_PLATFORMS", "PRETRAINX_DATA_DIR",
      "STORAGE_EMULATOR_HOST"]


# -- sweeps -----------------------------------------------------------------------------------


def _sweep_file(tmp_path, lrs, steps):
  path = tmp_path / "sweep.gin"
  bindings = ["RunConfig.sample_tokens = 0", "RunConfig.eval_batches = 1",
              "RunConfig.log_every = 5", "RunConfig.peak_tflops = 1.0",
              "CheckpointConfig.every_steps = 10", "CheckpointConfig.async_save = False",
              f"RunConfig.steps = {steps}"]
  path.write_text(f"SweepConfig.name = 'r'\nSweepConfig.gin_files = [{TINY!r}]\n"
                  f"SweepConfig.bindings = {bindings!r}\n"
                  f"SweepConfig.grid = {{'OptimizerConfig.learning_rate': {lrs!r}}}\n"
                  f"SweepConfig.run_root = {str(tmp_path / 'runs')!r}\n"
                  f"SweepConfig.results = {str(tmp_path / 'results')!r}\n"
                  "SweepConfig.max_retries = 2\n")
  return str(path)


def _children(config_hash):
  """Pids of processes training the grid point `config_hash` (`sweep FILE --only HASH`)."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    except OSError:
      continue
    if b"--only" in argv and config_hash.encode() in argv:
      pids.append(int(pid))
  return pids


def _checkpoints(run_dir):
  ckpts = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []


def _wait_for_checkpoint(run_dir, config_hash, proc, after=0, timeout=240.0):
  """The pid of the run's process once it has a final checkpoint past step `after`."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, proc.communicate()
    if any(step > after for step in _checkpoints(run_dir)):
      pids = _children(config_hash)
      if pids:
        return pids[0]
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint past step {after} in {run_dir} within {timeout} s")


def _pending(pid, sig):
  """Whether `sig` waits to be delivered to process `pid` (as it does while the process is
  stopped)."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
  except OSError:  # gone
    return False
  return any(m & (1 << (sig - 1)) for m in masks)


def _logs(tmp_path, run):
  folder = tmp_path / "runs" / "logs"
  names = os.listdir(folder) if folder.is_dir() else []
  return sorted(folder / n for n in names if n.startswith(run.name + "."))


@pytest.mark.slow
def test_sweep_on_two_workers_survives_ctrl_c_and_a_crashed_run_and_trains_nothing_twice(
    tmp_path, ray_address):
  """One sweep, on one cluster: Ctrl-C cancels it and its runs (exit 130, each stopped at a
  checkpoint, only finished runs have rows); run again, it resumes them, retries a run killed
  mid-training from its own checkpoint, and writes one row per grid point; a third call trains
  nothing."""
  from pretrainx.scaling import sweep as S

  # The victim is held (SIGSTOP) from its first checkpoint until Ctrl-C's SIGTERM reaches it, so
  # that it cannot finish before the signal however loaded the machine is; then it has 90 steps
  # to go, ample for the kill in the second call.
  sweep_file = _sweep_file(tmp_path, [1e-3, 2e-3], steps=100)
  runs = S.expand(S.parse_sweep(sweep_file))
  victim = runs[0]
  dry = _cli("sweep", sweep_file, "--ray", "--dry_run")
  assert dry.returncode == 0, dry.stderr
  assert "2 to run, each with 1 CPU, retried up to 2 times" in dry.stdout
  assert dry.stdout.count("pending") == 2 and not os.path.exists(tmp_path / "results")
  cmd = [sys.executable, "-m", "pretrainx", "sweep", sweep_file, f"--ray={ray_address}",
         f"--workdir={REPO}"]

  # Ctrl-C once a run has its first checkpoint: the driver and every run stop.
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  held = _wait_for_checkpoint(victim.experiment.run.run_dir, victim.config_hash, proc)
  os.kill(held, signal.SIGSTOP)
  proc.send_signal(signal.SIGINT)
  deadline = time.monotonic() + 120
  while not _pending(held, signal.SIGTERM) and proc.poll() is None:  # the cancel reaches it
    assert time.monotonic() < deadline, "Ctrl-C sent the victim's run no SIGTERM"
    time.sleep(0.05)
  os.kill(held, signal.SIGCONT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "cancelled; the runs that were training stopped at a checkpoint" in err
  assert "again to resume" in err
  deadline = time.monotonic() + 60
  while any(_children(run.config_hash) for run in runs):  # the runs' processes stop too
    assert time.monotonic() < deadline, "a run kept training after Ctrl-C"
    time.sleep(0.2)
  finished = [] if not os.path.exists(tmp_path / "results") else load_results(
      str(tmp_path / "results"), allow_empty=True)  # the runs done before the victim started
  assert all(r["status"] == "done" for r in finished)
  finished = {r["config_hash"] for r in finished}
  assert victim.config_hash not in finished and len(finished) < len(runs)
  stopped_at = _checkpoints(victim.experiment.run.run_dir)[-1]
  logs_before = {run.name: len(_logs(tmp_path, run)) for run in runs}

  # Again: the victim resumes, is killed past its next checkpoint, and Ray retries it.
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  pid = _wait_for_checkpoint(victim.experiment.run.run_dir, victim.config_hash, proc,
                             after=stopped_at)
  os.kill(pid, signal.SIGKILL)  # the run crashes mid-training
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, out + err
  rows = load_results(str(tmp_path / "results"))
  assert sorted(r["config_hash"] for r in rows) == sorted(r.config_hash for r in runs)
  assert all(r["status"] == "done" for r in rows)  # one row per run: none trained twice
  for run in runs:
    new = _logs(tmp_path, run)[logs_before[run.name]:]
    assert len(new) == (2 if run is victim else 0 if run.config_hash in finished else 1), new
    resumed = [int(m) for log in new
               for m in re.findall(r"resumed from \S*checkpoints/(\d+)", log.read_text())]
    if run is victim:  # the retry resumed from the checkpoint that the crashed try wrote
      assert max(resumed) > stopped_at, resumed
  again = _cli("sweep", sweep_file, f"--ray={ray_address}")
  assert again.returncode == 0 and again.stdout.count("done before, skipped") == 2


def test_tpu_sweep_plan_asks_for_whole_slices(tmp_path):
  sweep_file = _sweep_file(tmp_path, [1e-3, 2e-3], steps=10)
  with open(sweep_file, "a", encoding="utf-8") as f:
    f.write("SweepConfig.tpu = 'v5p-16'\n")
  out = _cli("sweep", sweep_file, "--ray=10.0.0.1:6379", "--dry_run")  # no cluster needed
  assert out.returncode == 0, out.stderr
  assert "each with one whole v5p-16 slice (v5p 2x2x2, 8 chips, a process per host)" in out.stdout
  bad = tmp_path / "bad.gin"
  bad.write_text(open(sweep_file, encoding="utf-8").read() + "SweepConfig.tpu = 'v5p-12'\n")
  out = _cli("sweep", str(bad), "--ray", "--dry_run")
  assert out.returncode == 2 and "v5p-12" in out.stderr
