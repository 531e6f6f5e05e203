#!/usr/bin/env bash
# Runs `python -m pretrainx ARGS...` as N processes of one jax.distributed job on this machine
# (coordinator on 127.0.0.1), each with its own CPU devices. Exits non-zero if any process fails.
# Usage: launch/local_multiprocess.sh N [--devices_per_process D] [--dry-run] train --gin_file=...
set -euo pipefail
usage() { echo "usage: $0 NUM_PROCESSES [--devices_per_process D] [--dry-run] COMMAND [ARGS...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
n=$1; shift
[[ $n =~ ^[1-9][0-9]*$ ]] || usage
devices=1
dry=0
while [ $# -gt 0 ]; do
  case $1 in
    --devices_per_process) devices=$2; shift 2 ;;
    --devices_per_process=*) devices=${1#*=}; shift ;;
    --dry-run) dry=1; shift ;;
    *) break ;;
  esac
done
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
port=${PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  cmd=("$python" -m pretrainx --cpu_devices="$devices" --coordinator_address="127.0.0.1:$port"
       --num_processes="$n" --process_id="$i" "$@")
  if [ $dry -eq 1 ]; then
    echo "XLA_FLAGS= ${cmd[*]}"
    continue
  fi
  (cd "$here" && env -u XLA_FLAGS "${cmd[@]}" 2>&1 | sed -u "s/^/[process $i] /") &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status
