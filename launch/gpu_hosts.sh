#!/usr/bin/env bash
# Starts `python -m pretrainx train` as one jax.distributed process per GPU host over ssh: the first
# host is the coordinator, process ids follow the --hosts order. --dry-run prints the exact ssh
# commands, one per line, and runs nothing. See launch/README.md.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/gpu_hosts.sh --hosts H1,H2,... --gpus_per_host N [--port 1234]
                           [--remote_dir ~/pretrainx] [--dry-run] -- TRAIN_ARGS...
  e.g. launch/gpu_hosts.sh --hosts node1,node2 --gpus_per_host 8 -- \
         --gin_file=gin_configs/llama_7b.gin --run_dir=/shared/runs/7b
EOF
  exit 2
}

die() {
  echo "launch/gpu_hosts.sh: error: $*" >&2
  exit 2
}

# sq (shell-quote a word) and show_word (one argv word for display).
source "$(dirname "${BASH_SOURCE[0]}")/quoting.sh"

parse_args() {
  while [ $# -gt 0 ]; do
    local opt=$1 val=
    case $opt in
      --dry-run) dry=1; shift; continue ;;
      --) shift; train_args=("$@"); return ;;
      --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
      --*) [ $# -ge 2 ] && [[ $2 != --* ]] || die "$opt needs a value."; val=$2; shift 2 ;;
      *) die "unexpected argument '$opt' (train arguments go after --)." ;;
    esac
    case $opt in
      --hosts) hosts_csv=$val ;;
      --gpus_per_host) gpus=$val ;;
      --port) port=$val ;;
      --remote_dir) remote_dir=$val ;;
      *) die "unknown option $opt (see launch/gpu_hosts.sh with no arguments for usage)." ;;
    esac
  done
}

validate() {
  [ -n "$hosts_csv" ] || die "--hosts is required: comma-separated, e.g. --hosts=node1,node2."
  IFS=, read -r -a hosts <<< "$hosts_csv"
  local h
  for h in "${hosts[@]}"; do
    [[ $h =~ ^[A-Za-z0-9_.@-]+$ ]] ||
      die "--hosts=$hosts_csv has an empty or odd host name '$h' (use host1,host2,...)."
  done
  [ -n "$gpus" ] || die "--gpus_per_host is required (the GPUs each host uses, e.g. 8)."
  [[ $gpus =~ ^[1-9][0-9]*$ ]] ||
    die "--gpus_per_host='$gpus' must be a positive integer (the GPUs each host uses, e.g. 8)."
  [[ $port =~ ^[1-9][0-9]*$ ]] && [ "$port" -le 65535 ] ||
    die "--port=$port must be a TCP port in 1..65535 that the first host can listen on."
  [[ $remote_dir =~ ^[A-Za-z0-9_./~-]+$ ]] ||
    die "--remote_dir=$remote_dir may hold only letters, digits and _ . / ~ -" \
      "(it is used unquoted)."
  [ ${#train_args[@]} -gt 0 ] ||
    die "pass the train arguments after --, e.g. -- --gin_file=gin_configs/llama_7b.gin --run_dir=DIR."
}

# The shell command that process $1 runs on its host.
remote_command() {
  local devices a coordinator=${hosts[0]#*@}
  devices=$(seq -s, 0 $((gpus - 1)))
  local cmd="cd $remote_dir && CUDA_VISIBLE_DEVICES=$devices .venv/bin/python -m pretrainx"
  cmd+=" --coordinator_address=$coordinator:$port --num_processes=${#hosts[@]}"
  cmd+=" --process_id=$1 train"
  for a in "${train_args[@]}"; do cmd+=" $(show_word "$a")"; done
  echo "$cmd"
}

main() {
  [ $# -ge 1 ] || usage
  dry=0 hosts_csv= gpus= port=1234 remote_dir='~/pretrainx'
  hosts=() train_args=() pids=()
  parse_args "$@"
  validate
  local i status=0
  for i in "${!hosts[@]}"; do
    local cmd
    cmd=$(remote_command "$i")
    if [ "$dry" -eq 1 ]; then
      echo "ssh ${hosts[$i]} $(sq "$cmd")"
      continue
    fi
    (ssh "${hosts[$i]}" "$cmd" 2>&1 < /dev/null | sed -u "s/^/[process $i ${hosts[$i]}] /") &
    pids+=($!)
  done
  for i in "${pids[@]}"; do
    wait "$i" || status=1
  done
  exit $status
}

main "$@"
