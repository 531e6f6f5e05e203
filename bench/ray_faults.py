"""Ray under misuse and faults, timed through the CLI as a user runs it.

1. A wrong --ray address: an HTTP server on 127.0.0.1 (what the dashboard's port looks like) and a
   port nothing listens on. Prints the time to exit, the exit status and the lines on stderr.
2. The local cluster `--ray` starts (gcs_server, raylet, agents, workers): which of the driver's
   descendant processes are still alive after the driver exits normally, and after it is killed
   with SIGKILL mid-prepare (a FIFO input holds a task), polled for 60 s.
Prints a markdown table for bench/RESULTS.md. Survivors are killed (by pid) at the end.
Run: .venv/bin/python bench/ray_faults.py
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORPHAN_WAIT_S = 60.0


def _cli(*args: str) -> tuple[float, int, str]:
  start = time.monotonic()
  out = subprocess.run([sys.executable, "-m", "pretrainx", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=900, check=False)
  return time.monotonic() - start, out.returncode, out.stderr


def _data(folder: str, fifo: bool = False) -> str:
  """A FileTask 'web' over 2 JSON-lines files (and a FIFO, f9.jsonl); returns its gin file."""
  os.makedirs(os.path.join(folder, "data"), exist_ok=True)
  for f in range(2):
    with open(os.path.join(folder, "data", f"f{f}.jsonl"), "w", encoding="utf-8") as out:
      out.writelines(json.dumps({"text": f"file {f} doc {i}"}) + "\n" for i in range(50))
  if fifo:
    os.mkfifo(os.path.join(folder, "data", "f9.jsonl"))
  gin = os.path.join(folder, "data.gin")
  with open(gin, "w", encoding="utf-8") as out:
    out.write(f"include {os.path.join(REPO, 'gin_configs/tiny.gin')!r}\n"
              "DataConfig.domains = ['web']\nDataConfig.tasks = [@web/FileTask()]\n"
              f"DataConfig.store_dir = {os.path.join(folder, 'stores')!r}\n"
              "web/FileTask.name = 'web'\n"
              f"web/FileTask.train_patterns = [{os.path.join(folder, 'data', '*.jsonl')!r}]\n")
  return gin


class _QuietHandler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass


def wrong_addresses(gin: str) -> list[str]:
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  rows = []
  try:
    for what, address in (("HTTP server", f"127.0.0.1:{server.server_address[1]}"),
                          ("HTTP server as ray://", f"ray://127.0.0.1:{server.server_address[1]}"),
                          ("nothing listens", "127.0.0.1:9")):
      seconds, code, err = _cli("data", "prepare", "web", f"--gin_file={gin}", f"--ray={address}")
      rows.append(f"| wrong --ray address: {what} | {seconds:.1f} s to exit {code}, "
                  f"{len(err.strip().splitlines())} line(s) on stderr |")
  finally:
    server.shutdown()
  return rows


def _stat(pid: int) -> tuple[int, int] | None:
  """(parent pid, start time) of a live process, None if gone (or a zombie)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _descendants(root: int, seen: dict[int, tuple[int, str]]) -> None:
  """Adds every live descendant of `root` to seen: {pid: (start time, command)}."""
  parents = {}
  for name in filter(str.isdigit, os.listdir("/proc")):
    st = _stat(int(name))
    if st:
      parents[int(name)] = st
  family = {root}
  grew = True
  while grew:
    grew = False
    for pid, (ppid, _) in parents.items():
      if ppid in family and pid not in family:
        family.add(pid)
        grew = True
  for pid in family - {root}:  # the command as it reads now (a Ray worker renames itself)
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
    except OSError:
      continue
    seen[pid] = (parents[pid][1], cmd)


def _alive(seen: dict[int, tuple[int, str]]) -> dict[int, str]:
  return {pid: cmd for pid, (start, cmd) in seen.items()
          if (_stat(pid) or (0, -1))[1] == start}


def _watch(proc: subprocess.Popen, seen: dict, until, timeout: float = 300.0) -> None:
  deadline = time.monotonic() + timeout
  while proc.poll() is None and not until(seen):
    if time.monotonic() > deadline:
      proc.kill()
      raise RuntimeError(f"{proc.args} did not get there within {timeout:g} s")
    _descendants(proc.pid, seen)
    time.sleep(0.2)


def _orphans(seen: dict) -> tuple[float, dict[int, str]]:
  """Seconds until the recorded processes are gone (at most ORPHAN_WAIT_S), and survivors."""
  start = time.monotonic()
  shown = False
  while _alive(seen) and time.monotonic() - start < ORPHAN_WAIT_S:
    if not shown and time.monotonic() - start > 5:
      print(f"alive 5 s after the driver: {sorted(_alive(seen).values())}", file=sys.stderr)
      shown = True
    time.sleep(0.5)
  return time.monotonic() - start, _alive(seen)


def _kill(survivors: dict[int, str]) -> None:
  for pid in survivors:
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass


def _row(what: str, seen: dict, seconds: float, survivors: dict[int, str]) -> str:
  names = sorted({cmd.split()[0].rsplit("/", 1)[-1] for cmd in survivors.values()})
  return (f"| {what} | {len(seen)} processes; {len(survivors)} alive after {seconds:.0f} s"
          f"{' (' + ', '.join(names) + ')' if names else ''} |")


def local_cluster(folder: str) -> list[str]:
  rows = []
  cmd = [sys.executable, "-m", "pretrainx", "data", "prepare", "web", "--split=train", "--ray",
         "--ray_cpus=2"]
  gin = _data(os.path.join(folder, "normal"))
  proc = subprocess.Popen(cmd + [f"--gin_file={gin}"], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  seen: dict = {}
  _watch(proc, seen, lambda s: False)
  code = proc.wait()
  seconds, survivors = _orphans(seen)
  rows.append(_row(f"local cluster, driver exits ({code})", seen, seconds, survivors))
  _kill(survivors)

  gin = _data(os.path.join(folder, "killed"), fifo=True)
  proc = subprocess.Popen(cmd + [f"--gin_file={gin}"], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  seen = {}
  _watch(proc, seen, lambda s: any("tokenize_shard" in c for _, c in s.values()))
  time.sleep(1.0)
  _descendants(proc.pid, seen)
  proc.kill()  # SIGKILL: no atexit, no ray.shutdown
  proc.wait()
  seconds, survivors = _orphans(seen)
  rows.append(_row("local cluster, driver killed (SIGKILL) mid-prepare", seen, seconds,
                   survivors))
  _kill(survivors)
  try:  # a reader still blocked on the FIFO (if any survived) goes with the kill; free it anyway
    fd = os.open(os.path.join(folder, "killed", "data", "f9.jsonl"), os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)
  except OSError:
    pass
  return rows


def main() -> None:
  with tempfile.TemporaryDirectory(prefix="pretrainx-ray-faults-") as folder:
    rows = wrong_addresses(_data(os.path.join(folder, "wrong")))
    rows += local_cluster(folder)
  print("| case | result |\n|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
  main()
