"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny experiments."""

import os
import tempfile

# LLVM's optimisation level 0 for the test processes: the HLO graphs stay as traced (every test
# still runs what users run, op for op), and compiling, most of a test's time on tiny shapes,
# takes about half as long (test_generate.py and test_attention_impls.py: 142 s -> 89 s).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One OpenBLAS thread per process (and per subprocess, notebook kernel and Ray worker, which
# inherit it): the suite runs a test process per core, and OpenBLAS's threads, spinning while
# they wait for each other on a busy core, made scipy's L-BFGS (5 parameters) 12x slower (a
# Chinchilla fit: 17 s -> 1.5 s). Results do not depend on the thread count.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Token stores (the embedded corpus is tokenized on first use) go to a fresh directory per test
# process, never to the user's ~/.cache.
os.environ["PRETRAINX_DATA_DIR"] = tempfile.mkdtemp(prefix="pretrainx-test-stores-")
# ...and the caches of the datasets lm-eval tasks load likewise.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="pretrainx-test-hf-datasets-")
# One persistent XLA compilation cache for the whole run: made by the first process that loads
# this file (pytest's controller, whose environment the xdist workers inherit), and shared by the
# test processes, the CLI subprocesses they start and the Ray workers of sweeps, so that the same
# tiny model is compiled once per run, not once per process. Never the user's ~/.cache.
_OWN_JAX_CACHE = "PRETRAINX_TEST_JAX_CACHE" not in os.environ  # removed at the end, by its maker
if _OWN_JAX_CACHE:
  os.environ["PRETRAINX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="pretrainx-test-jax-cache-")
JAX_CACHE_DIR = os.environ["PRETRAINX_TEST_JAX_CACHE"]
os.environ["PRETRAINX_JAX_CACHE_DIR"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# TensorFlow (seqio's tests) and triton (torch's, loaded when transformers imports a model) both
# carry LLVM: loading TensorFlow first makes triton's import segfault, whatever runs next in
# that test process. Loading triton first is safe, so it goes first where it is installed.
import importlib.util  # noqa: E402

if importlib.util.find_spec("triton") is not None:
  import triton  # noqa: E402,F401  pylint: disable=unused-import

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_experiment(run_dir, **sections):
  """The tiny gin preset as an Experiment, quiet, in `run_dir`, with section overrides."""
  from pretrainx.config import parse_gin

  exp = parse_gin([os.path.join(REPO, "gin_configs/tiny.gin")])
  run = {"run_dir": str(run_dir), "progress_bar": False, "peak_tflops": 1.0,
         **sections.pop("run", {})}
  return exp.replace(run=run, **sections)


@pytest.fixture
def tiny_exp(tmp_path):
  return lambda **sections: tiny_experiment(tmp_path / "run", **sections)


@pytest.fixture
def run_cli(capsys, monkeypatch):
  """`pretrainx ARGS` in this process (8 fake devices), from the repository root ->
  .returncode, .stdout, .stderr. For tests of what a command does; a subprocess stays where the
  process boundary is the point (signals, exit of the interpreter, several processes)."""
  import types

  from pretrainx import cli

  monkeypatch.chdir(REPO)

  def run(*args):
    capsys.readouterr()
    try:
      code = cli.main(list(args))
    except SystemExit as exit_:  # `plan` exits with its verdict, argparse with its usage errors
      code = exit_.code
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

  return run


# -- object storage on loopback: a GCS emulator and an S3 server, one of each per test process --
# The endpoints are fixed at import, so that every module (and every subprocess a test starts)
# sees the same environment a user would set; the servers start on first use.


def abstract_gpu_mesh():
  """A context in which Pallas lowers for an NVIDIA GPU that this CPU host does not have (jax >=
  0.12 asks the mesh's device which GPU to target; an H100 here)."""
  import jax  # pylint: disable=import-outside-toplevel
  gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                    platform="gpu")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu))


from servers import ServerError, free_port, gcs_env, s3_env, start_gcs, start_s3  # noqa: E402

GCS_PORT, S3_PORT = free_port(), free_port()
os.environ.update(gcs_env(GCS_PORT))
os.environ.update(s3_env(S3_PORT))
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"):
  os.environ.pop(_name, None)
GCS_BUCKET, S3_BUCKET = "runs", "data"


def _started(start, *args):
  """start(*args), or the test fails with the server's one line (what to install or free)."""
  try:
    return start(*args)
  except ServerError as err:
    pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def gcs_server():
  """fake-gcs-server on 127.0.0.1, in memory, holding the bucket gs://runs (tests/servers.py)."""
  proc = _started(start_gcs, GCS_PORT, (GCS_BUCKET,))
  yield f"http://127.0.0.1:{GCS_PORT}"
  proc.terminate()
  proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server():
  """moto's S3 server on 127.0.0.1 holding the bucket s3://data."""
  server = _started(start_s3, S3_PORT, (S3_BUCKET,))
  yield f"http://127.0.0.1:{S3_PORT}"
  server.stop()


@pytest.fixture
def gcs_dir(gcs_server, request):
  """A fresh prefix in gs://runs for one test."""
  return f"gs://{GCS_BUCKET}/{_prefix(request)}"


def _prefix(request) -> str:
  import re
  import uuid

  return re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40] + "-" + uuid.uuid4().hex[:8]


@pytest.fixture
def s3_dir(s3_server, request):
  """A fresh prefix in s3://data for one test."""
  return f"s3://{S3_BUCKET}/{_prefix(request)}"


# -- xdist groups: a module whose fixtures are expensive runs on one worker ----------------------


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Under --dist loadgroup, xdist tags each grouped test's id with '@group' (after the other
  hooks); a pytest/xdist pair on which that has no effect would silently spread a group's tests
  (and build its fixtures) over every worker."""
  if getattr(config.option, "loadgroup", False):
    lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
      raise pytest.UsageError(f"xdist_group did not apply to {lost[0]} (and {len(lost) - 1} "
                              "more): install the pytest and pytest-xdist that pyproject.toml "
                              "pins (`make install`).")


# -- nothing skipped silently: `make test` passes --expected-skips (README.md says how many) -------


def pytest_addoption(parser):
  parser.addoption("--expected-skips", type=int, default=None,
                   help="fail the run unless exactly this many tests were skipped (make test)")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
  expected = session.config.getoption("--expected-skips")
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if expected is None or reporter is None or hasattr(session.config, "workerinput"):
    return  # asked for, and counted once, by the controller (xdist workers report to it)
  skipped = reporter.stats.get("skipped", [])  # test and collection (module-level) skips
  if len(skipped) != expected:
    reasons = sorted({f"{r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}"
                      for r in skipped})
    reporter.write_line("")
    reporter.write_line(f"expected {expected} skipped tests, got {len(skipped)}: a dependency that "
                        "`make test` installs is missing, or a new skip needs its reason in "
                        "README.md's count. Skipped: " + ("; ".join(reasons) or "none"), red=True)
    if exitstatus == 0:
      session.exitstatus = 1


def pytest_unconfigure(config):
  if _OWN_JAX_CACHE and not hasattr(config, "workerinput"):
    import shutil

    shutil.rmtree(JAX_CACHE_DIR, ignore_errors=True)


# -- Ray: a local cluster per module ----------------------------------------------------------


def subprocess_env() -> dict[str, str]:
  """This process's environment for a `pretrainx` subprocess that should see this machine as a
  user's would (its own --cpu_devices, not the suite's 8 fake devices), but keeps the suite's
  LLVM optimisation level 0 (above): it compiles in about half the time, and every process of a
  test compiles the same way, so their results still compare bit for bit."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  return env


@pytest.fixture(scope="module")
def ray_address():
  """A local 2-CPU Ray cluster, one per module that asks (test_ray.py, the teacher cache's Ray
  parts): its address for other processes, and this process joined.

  Its workers (and the runs they start) see this machine as a user's would: without the suite's
  8 fake devices, and with credentials in their own environment (inherited from this process, as
  a cluster's hosts have theirs), never in a job's runtime environment. (A credentials file is the
  other way; TensorStore 0.1.86's default AWS chain ignores AWS_SHARED_CREDENTIALS_FILE.)"""
  import ray

  level0 = subprocess_env().get("XLA_FLAGS")  # ...but with the suite's optimisation level 0
  flags = os.environ.pop("XLA_FLAGS", None)
  if level0:
    os.environ["XLA_FLAGS"] = level0
  # The raylet logs to every driver's stderr once this machine's disk is 95% full (CI's shared
  # disk once was), which the tests' one-line error checks would count: it may fill to 99% here.
  os.environ.setdefault("RAY_local_fs_capacity_threshold", "0.99")
  try:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
  except Exception as err:  # pylint: disable=broad-except
    pytest.fail(f"cannot start a local Ray cluster ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}): run `make install` for "
                "ray[default], and stop stale clusters with `ray stop --force`.", pytrace=False)
  finally:
    if flags is not None:
      os.environ["XLA_FLAGS"] = flags
  yield ray.get_runtime_context().gcs_address
  ray.shutdown()
