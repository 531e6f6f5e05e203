"""Launch scripts (launch/*.sh): the exact commands `--dry-run` prints for TPU VMs and GPU hosts,
the same argv when run for real against stub gcloud/ssh, and exit 2 with a clear message on bad
input."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

TPU = ["--name=my-v5p", "--zone=us-east5-a", "--project=my-proj"]
WHERE = "--zone=us-east5-a --project=my-proj"
SSH_ALL = f"gcloud compute tpus tpu-vm ssh my-v5p {WHERE} --worker=all --command="
# What install runs on each worker before its venv: jax >= 0.11 needs Python >= 3.12.
NEEDS_312 = ("{ python3.12 -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { echo "
             "\"pretrainx needs Python >= 3.12 on every worker: install it or pass --python=PATH\" "
             ">&2; exit 2; }; } && ")


def _run(script, *args, env=None):
  return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=30, env=env)


def _dry(script, *args):
  cut = args.index("--") if "--" in args else len(args)
  out = _run(script, *args[:cut], "--dry-run", *args[cut:])
  assert out.returncode == 0, out.stderr
  assert out.stderr == ""
  return out.stdout.splitlines()


def _tpu(sub, *args):
  return _dry("tpu_vm.sh", sub, *TPU, *args)


def _remote(line):
  """The remote shell command of a printed `gcloud ... --command=CMD` line."""
  argv = shlex.split(line)
  (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return cmd


@pytest.mark.parametrize("script", ["tpu_vm.sh", "ray_tpu.sh", "gpu_hosts.sh", "local_multiprocess.sh",
                                    "quoting.sh", "tpu_vm_options.sh", "slurm_example.sbatch"])
def test_scripts_are_valid_bash(script):
  out = subprocess.run(["bash", "-n", f"launch/{script}"], cwd=REPO, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr


def test_create_plain_and_queued():
  assert _tpu("create", "--accelerator_type=v5p-64", "--version=v2-alpha-tpuv5") == [
      f"gcloud compute tpus tpu-vm create my-v5p {WHERE} --accelerator-type=v5p-64 "
      "--version=v2-alpha-tpuv5"]
  assert _tpu("create", "--accelerator_type", "v5p-64", "--version", "v2-alpha-tpuv5",
              "--queued", "--spot") == [
      f"gcloud compute tpus queued-resources create my-v5p-qr --node-id=my-v5p {WHERE} "
      "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot"]


def test_install_from_git_repo():
  lines = _tpu("install", "--repo=https://github.com/org/pretrainx.git", "--ref=v1.2")
  assert len(lines) == 1 and lines[0].startswith(SSH_ALL)
  assert _remote(lines[0]) == (
      "{ [ -d ~/pretrainx/.git ] || git clone https://github.com/org/pretrainx.git "
      "~/pretrainx; } && cd ~/pretrainx && git fetch --quiet origin && git checkout --force v1.2 "
      "&& " + NEEDS_312 + "python3.12 -m venv .venv && .venv/bin/pip install --upgrade pip && "
      ".venv/bin/pip install -e '.[test]' 'jax[tpu]'")
  remote = shlex.split(_remote(lines[0]))
  assert remote[-3:] == ["-e", ".[test]", "jax[tpu]"]


def test_install_from_local_checkout_and_from_pip():
  tarball = "/tmp/pretrainx-src.tar.gz"
  lines = _tpu("install", "--source=/src/pretrainx", "--extra=", "--jax_spec=",
               "--python=/opt/py/bin/python3")
  assert lines[:2] == [
      f"git -C /src/pretrainx archive --format=tar.gz --output={tarball} HEAD",
      f"gcloud compute tpus tpu-vm scp {tarball} my-v5p:{tarball} {WHERE} --worker=all"]
  assert _remote(lines[2]) == (
      f"mkdir -p ~/pretrainx && tar -xzf {tarball} -C ~/pretrainx && cd ~/pretrainx && "
      + NEEDS_312.replace("python3.12", "/opt/py/bin/python3") +
      "/opt/py/bin/python3 -m venv .venv && .venv/bin/pip install --upgrade pip && "
      ".venv/bin/pip install -e .")
  (line,) = _tpu("install", "--pip=pretrainx[test] @ git+https://github.com/org/pretrainx",
                 "--remote_dir=/opt/px")
  assert shlex.split(_remote(line))[-2:] == [
      "pretrainx[test] @ git+https://github.com/org/pretrainx", "jax[tpu]"]
  assert _remote(line).startswith("mkdir -p /opt/px && cd /opt/px && " + NEEDS_312)


def test_train_on_all_workers_without_distributed_flags():
  (line,) = _tpu("train", "--gin_file=gin_configs/llama_7b.gin", "--gin_file", "my runs/x.gin",
                 "--run_dir=/mnt/shared/runs/7b", "--", "--gin_param=RunConfig.steps=5",
                 "--restart")
  assert line == SSH_ALL + (
      "\"cd ~/pretrainx && { nohup .venv/bin/python -m pretrainx train "
      "--gin_file=gin_configs/llama_7b.gin --gin_file='my runs/x.gin' "
      "--run_dir=/mnt/shared/runs/7b --gin_param=RunConfig.steps=5 --restart "
      "> train.log 2>&1 < /dev/null & }\"")
  remote = shlex.split(_remote(line))
  start = remote.index("pretrainx")
  assert remote[start + 1:remote.index(">")] == [
      "train", "--gin_file=gin_configs/llama_7b.gin", "--gin_file=my runs/x.gin",
      "--run_dir=/mnt/shared/runs/7b", "--gin_param=RunConfig.steps=5", "--restart"]
  assert "--num_processes" not in line and "--coordinator_address" not in line


def test_train_run_dir_defaults_to_the_bucket():
  (line,) = _tpu("train", "--gin_file=gin_configs/llama_7b.gin", "--bucket=gs://my-bucket")
  assert "--run_dir=gs://my-bucket/runs/" in line
  name = next(a for a in TPU if a.startswith("--name=")).split("=", 1)[1]
  assert f"--run_dir=gs://my-bucket/runs/{name} " in line


def test_logs_and_delete():
  assert _tpu("logs", "--worker=3") == [
      f"gcloud compute tpus tpu-vm ssh my-v5p {WHERE} --worker=3 "
      "--command='tail -n +1 -F ~/pretrainx/train.log'"]
  assert _tpu("delete") == [f"gcloud compute tpus tpu-vm delete my-v5p {WHERE} --quiet"]
  assert _tpu("delete", "--queued", "--qr_name=big-qr") == [
      f"gcloud compute tpus queued-resources delete big-qr {WHERE} --force --quiet"]


@pytest.mark.parametrize("args, message", [
    (["create", "--zone=z"], "create needs --name"),
    (["create", "--name=a"], "create needs --zone"),
    (["create", "--name=a", "--zone=z", "--version=v"], "create needs --accelerator_type"),
    (["create", "--name=a", "--zone=z", "--accelerator_type=v5p-8"], "create needs --version"),
    (["create", "--name=My_TPU", "--zone=z"], "--name=My_TPU must be lowercase"),
    (["install", "--name=a", "--zone=z"], "install needs exactly one of --repo"),
    (["install", "--name=a", "--zone=z", "--repo=r", "--pip=p"], "(got 2)"),
    (["train", "--name=a", "--zone=z", "--run_dir=gs://b"], "train needs --gin_file"),
    (["train", "--name=a", "--zone=z", "--gin_file=g.gin"], "train needs --run_dir or --bucket"),
    (["logs", "--name=a", "--zone=z", "--worker=all"], "--worker=all must be one worker's index"),
    (["train", "--name=a", "--zone=z", "--gin_fle=g.gin"], "unknown option --gin_fle"),
    (["launch", "--name=a"], "unknown subcommand 'launch'"),
    (["create", "--name"], "--name needs a value"),
])
def test_tpu_vm_bad_input_exits_2_with_a_clear_message(args, message):
  out = _run("tpu_vm.sh", *args, "--dry-run")
  assert out.returncode == 2
  assert message in out.stderr
  assert out.stdout == ""


def _ray(sub, *args):
  return _dry("ray_tpu.sh", sub, *TPU, *args)


SSH_0 = f"gcloud compute tpus tpu-vm ssh my-v5p {WHERE} --worker=0 --command="


def test_ray_head_starts_on_one_worker_without_resources():
  assert _ray("head") == [
      SSH_0 + "'cd ~/pretrainx && .venv/bin/ray stop --force; "
      ".venv/bin/ray start --head --port=6379 --dashboard-host=0.0.0.0'"]
  (line,) = _ray("head", "--worker", "1", "--port=7000", "--remote_dir=/opt/px")
  assert "--worker=1 " in line
  assert shlex.split(_remote(line)) == [
      "cd", "/opt/px", "&&", ".venv/bin/ray", "stop", "--force;", ".venv/bin/ray", "start",
      "--head", "--port=7000", "--dashboard-host=0.0.0.0"]
  assert "--resources" not in line  # Ray detects the TPU chips and slice itself


def test_ray_workers_join_the_head_on_every_worker():
  assert _ray("workers", "--head_address", "10.130.0.5:6379") == [
      SSH_ALL + "'cd ~/pretrainx && .venv/bin/ray stop --force; "
      ".venv/bin/ray start --address=10.130.0.5:6379'"]
  (line,) = _ray("workers", "--head_address=my-head.internal:7000")
  assert _remote(line).endswith(".venv/bin/ray start --address=my-head.internal:7000")


def test_ray_stop_and_address():
  assert _ray("stop") == [SSH_ALL + "'cd ~/pretrainx && .venv/bin/ray stop --force'"]
  assert _ray("address") == [
      f"gcloud compute tpus tpu-vm describe my-v5p {WHERE} "
      "--format='value(networkEndpoints[0].ipAddress)'"]


def test_ray_sweep_runs_detached_on_the_head_with_ray_auto():
  (line,) = _ray("sweep", "--", "gin_configs/sweeps/my sweep.gin", "--only", "run-a")
  assert line == SSH_0 + (
      "\"cd ~/pretrainx && { nohup .venv/bin/python -m pretrainx sweep "
      "'gin_configs/sweeps/my sweep.gin' --only run-a --ray=auto "
      "> sweep.log 2>&1 < /dev/null & }\"")
  remote = shlex.split(_remote(line))
  assert remote[remote.index("pretrainx") + 1:remote.index(">")] == [
      "sweep", "gin_configs/sweeps/my sweep.gin", "--only", "run-a", "--ray=auto"]
  (line,) = _ray("sweep", "--", "s.gin", "--ray=10.0.0.2:6379")  # an explicit --ray is kept
  assert "s.gin --ray=10.0.0.2:6379 >" in _remote(line) and "auto" not in line


@pytest.mark.parametrize("args, message", [
    (["head", "--zone=z"], "head needs --name"),
    (["head", "--name=a"], "head needs --zone"),
    (["head", "--name=My_Head", "--zone=z"], "--name=My_Head must be lowercase"),
    (["head", "--name=a", "--zone=z", "--port=0"], "--port=0 must be a TCP port in 1..65535"),
    (["head", "--name=a", "--zone=z", "--port=65536"], "--port=65536 must be a TCP port"),
    (["address", "--name=a", "--zone=z", "--port=http"], "--port=http must be a TCP port"),
    (["workers", "--name=a", "--zone=z"], "workers needs --head_address"),
    (["workers", "--name=a", "--zone=z", "--head_address=10.0.0.2"],
     "--head_address=10.0.0.2 must look like HOST:PORT"),
    (["workers", "--name=a", "--zone=z", "--head_address=h:99999"], "must look like HOST:PORT"),
    (["workers", "--name=a", "--zone=z", "--head_address=h:1; rm -rf x"], "must look like HOST:PORT"),
    (["workers", "--name=a", "--zone=z", "--head_address=h:1", "--worker=0"],
     "workers runs on every worker"),
    (["stop", "--name=a", "--zone=z", "--worker=2"], "stop runs on every worker"),
    (["head", "--name=a", "--zone=z", "--worker=all"], "--worker=all must be one worker's index"),
    (["sweep", "--name=a", "--zone=z"], "sweep needs the sweep arguments after --"),
    (["sweep", "--name=a", "--zone=z", "s.gin"], "unexpected argument 's.gin'"),
    (["head", "--name=a", "--zone=z", "--remote_dir=a b"], "--remote_dir=a b may hold only"),
    (["head", "--name=a", "--zone=z", "--headaddress=h:1"], "unknown option --headaddress"),
    (["start", "--name=a"], "unknown subcommand 'start'"),
    (["workers", "--name=a", "--zone=z", "--head_address"], "--head_address needs a value"),
])
def test_ray_tpu_bad_input_exits_2_with_a_clear_message(args, message):
  out = _run("ray_tpu.sh", *args, "--dry-run")
  assert out.returncode == 2
  assert message in out.stderr
  assert out.stdout == ""


def test_ray_tpu_without_arguments_prints_usage():
  out = _run("ray_tpu.sh")
  assert out.returncode == 2
  assert out.stderr.startswith("usage: launch/ray_tpu.sh SUBCOMMAND")


def test_gpu_hosts_one_process_per_host_with_its_id():
  lines = _dry("gpu_hosts.sh", "--hosts=node1,me@node2,node3", "--gpus_per_host", "4",
               "--port=2345", "--", "--gin_file=gin_configs/llama_7b.gin", "--run_dir=/shared/r")
  assert lines[1] == (
      "ssh me@node2 'cd ~/pretrainx && CUDA_VISIBLE_DEVICES=0,1,2,3 .venv/bin/python -m pretrainx "
      "--coordinator_address=node1:2345 --num_processes=3 --process_id=1 train "
      "--gin_file=gin_configs/llama_7b.gin --run_dir=/shared/r'")
  assert len(lines) == 3
  for i, (line, host) in enumerate(zip(lines, ["node1", "me@node2", "node3"])):
    ssh, target, remote = shlex.split(line)
    assert (ssh, target) == ("ssh", host)
    argv = shlex.split(remote)
    assert argv[argv.index("pretrainx") + 1:] == [
        "--coordinator_address=node1:2345", "--num_processes=3", f"--process_id={i}", "train",
        "--gin_file=gin_configs/llama_7b.gin", "--run_dir=/shared/r"]


@pytest.mark.parametrize("args, message", [
    (["--gpus_per_host=8", "--", "x"], "--hosts is required"),
    (["--hosts=a,,b", "--gpus_per_host=8", "--", "x"], "odd host name ''"),
    (["--hosts=a", "--", "x"], "--gpus_per_host is required"),
    (["--hosts=a", "--gpus_per_host=0", "--", "x"], "--gpus_per_host='0' must be a positive"),
    (["--hosts=a", "--gpus_per_host=8", "--port=70000", "--", "x"], "--port=70000 must be"),
    (["--hosts=a", "--gpus_per_host=8"], "pass the train arguments after --"),
])
def test_gpu_hosts_bad_input_exits_2_with_a_clear_message(args, message):
  out = _run("gpu_hosts.sh", "--dry-run", *args)
  assert out.returncode == 2
  assert message in out.stderr
  assert out.stdout == ""


def _stub(tmp_path, name, exit_code=0, stdout=""):
  """An executable `name` on PATH that records its argv (one JSON list a line), prints `stdout`
  and exits."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / f"{name}.jsonl"
  stub = bin_dir / name
  stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                  f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                  f"sys.stdout.write({stdout!r})\n"
                  f"sys.exit({exit_code} if 'bad' in sys.argv[1] else 0)\n")
  stub.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  return env, log


def test_real_runs_execute_what_dry_run_prints(tmp_path):
  env, log = _stub(tmp_path, "gcloud")
  args = ["train", *TPU, "--gin_file=a b.gin", "--run_dir=gs://b/r", "--", "--gin_param=X.y='z'"]
  printed = _dry("tpu_vm.sh", *args)
  out = _run("tpu_vm.sh", *args, env=env)
  assert out.returncode == 0, out.stderr
  assert [json.loads(l) for l in log.read_text().splitlines()] == [
      shlex.split(l)[1:] for l in printed]

  env, log = _stub(tmp_path, "ssh", exit_code=3)
  hosts = ["--hosts=h1,h2", "--gpus_per_host=1", "--", "--run_dir=r"]
  printed = _dry("gpu_hosts.sh", *hosts)
  out = _run("gpu_hosts.sh", *hosts, env=env)
  assert out.returncode == 0, out.stderr
  calls = sorted(json.loads(l) for l in log.read_text().splitlines())
  assert calls == sorted(shlex.split(l)[1:] for l in printed)
  failing = _run("gpu_hosts.sh", "--hosts=h1,bad", *hosts[1:], env=env)
  assert failing.returncode == 1  # one host failed: the launcher reports it


def test_slurm_example_passes_the_three_flags():
  text = open(os.path.join(REPO, "launch/slurm_example.sbatch")).read()
  for needle in ("--coordinator_address=", "--num_processes=", "--process_id=",
                 "scontrol show hostnames", "$SLURM_PROCID", "#SBATCH --ntasks-per-node=1"):
    assert needle in text


def test_ray_tpu_real_runs_execute_what_dry_run_prints(tmp_path):
  env, log = _stub(tmp_path, "gcloud", stdout="10.130.0.5\n")
  args = ["workers", *TPU, "--head_address=10.130.0.5:6379", "--remote_dir=/opt/px"]
  printed = _dry("ray_tpu.sh", *args)
  out = _run("ray_tpu.sh", *args, env=env)
  assert out.returncode == 0, out.stderr
  assert [json.loads(l) for l in log.read_text().splitlines()] == [
      shlex.split(l)[1:] for l in printed]

  # `address` prints HOST:PORT from what `gcloud ... describe` prints, for --head_address=$(...).
  log.unlink()
  args = ["address", *TPU, "--port=7000"]
  printed = _dry("ray_tpu.sh", *args)
  out = _run("ray_tpu.sh", *args, env=env)
  assert (out.returncode, out.stdout, out.stderr) == (0, "10.130.0.5:7000\n", "")
  assert [json.loads(l) for l in log.read_text().splitlines()] == [
      shlex.split(l)[1:] for l in printed]

  (tmp_path / "empty").mkdir()
  env, _ = _stub(tmp_path / "empty", "gcloud")  # no IP yet (the VM is not READY)
  out = _run("ray_tpu.sh", *args, env=env)
  assert out.returncode == 2 and "no internal IP for worker 0 of my-v5p" in out.stderr
