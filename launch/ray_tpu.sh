#!/usr/bin/env bash
# A Ray cluster on Cloud TPU VM slices that already exist and have pretrainx installed (by
# `launch/tpu_vm.sh install`, whose venv must include ray[default]): start the head on one worker of
# a one-host VM, join every worker of each slice to it, print the head's address, run
# `pretrainx sweep --ray=auto` on the head, stop. --dry-run prints the exact commands, one per line,
# and runs nothing. See launch/README.md.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/ray_tpu.sh SUBCOMMAND --name NAME --zone ZONE [--project PROJECT]
                         [--remote_dir ~/pretrainx] [--port 6379] [--dry-run] [options]
  head     [--worker 0]                 start the Ray head on one worker of TPU VM NAME
  workers  --head_address HOST:PORT     join every worker of slice NAME (once per slice)
  address  [--worker 0]                 print the head's internal HOST:PORT
  stop                                  `ray stop --force` on every worker of NAME
  sweep    [--worker 0] -- SWEEP_FILE [SWEEP_ARGS...]
                                        `pretrainx sweep ... --ray=auto` on the head, detached
                                        (output in REMOTE_DIR/sweep.log)
  e.g. launch/ray_tpu.sh workers --name=my-v5p-16 --zone=us-east5-a \
         --head_address="$(launch/ray_tpu.sh address --name=my-head --zone=us-east5-a)"
EOF
  exit 2
}

die() {
  echo "launch/ray_tpu.sh ${sub:-}: error: $*" >&2
  exit 2
}

# sq (shell-quote a word), show_word (one argv word for display) and run (runs a command, or
# with --dry-run prints it).
source "$(dirname "${BASH_SOURCE[0]}")/quoting.sh"
# require (a non-empty option) and validate_tpu_vm (--name, --zone, --project, --remote_dir).
source "$(dirname "${BASH_SOURCE[0]}")/tpu_vm_options.sh"

parse_args() {
  while [ $# -gt 0 ]; do
    local opt=$1 val=
    case $opt in
      --dry-run) dry=1; shift; continue ;;
      --) shift; extra_args=("$@"); return ;;
      --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
      --*) [ $# -ge 2 ] && [[ $2 != --* ]] || die "$opt needs a value."; val=$2; shift 2 ;;
      *) die "unexpected argument '$opt' (sweep arguments go after --)." ;;
    esac
    case $opt in
      --name) name=$val ;;
      --zone) zone=$val ;;
      --project) project=$val ;;
      --remote_dir) remote_dir=$val ;;
      --port) port=$val ;;
      --worker) worker=$val; worker_set=1 ;;
      --head_address) head_address=$val ;;
      *) die "unknown option $opt (see launch/ray_tpu.sh with no arguments for usage)." ;;
    esac
  done
}

validate_common() {
  validate_tpu_vm
  valid_port "$port" || die "--port=$port must be a TCP port in 1..65535 (Ray's default is 6379)."
  [[ $worker =~ ^[0-9]+$ ]] || die "--worker=$worker must be one worker's index (0, 1, ...)."
}

valid_port() {
  [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] && [ "$1" -le 65535 ]
}

# gcloud ssh into worker(s) $1 running the remote shell command $2.
ssh_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

# Only head, address and sweep run on one worker; the others run on all of them.
all_workers_only() {
  [ "$worker_set" -eq 0 ] ||
    die "$sub runs on every worker of --name (--worker=all);" \
      "--worker is for head, address and sweep."
}

cmd_head() {
  # Ray detects the TPU resources itself (TPU: the chips, TPU-<type>-head on worker 0, and the
  # slice name), so `ray start` needs no --resources.
  local start=".venv/bin/ray start --head --port=$port --dashboard-host=0.0.0.0"
  ssh_workers "$worker" "cd $remote_dir && .venv/bin/ray stop --force; $start"
}

cmd_workers() {
  all_workers_only
  local hint="launch/ray_tpu.sh address --name=HEAD --zone=$zone"
  require "$head_address" --head_address "the head's HOST:PORT, e.g. --head_address=\$($hint)"
  [[ $head_address =~ ^[A-Za-z0-9][A-Za-z0-9.-]*:([0-9]+)$ ]] && valid_port "${BASH_REMATCH[1]}" ||
    die "--head_address=$head_address must look like HOST:PORT, e.g. 10.130.0.5:6379."
  # As on the head, Ray detects each worker's TPU resources, so a sweep can ask for a whole slice.
  local start=".venv/bin/ray start --address=$head_address"
  ssh_workers all "cd $remote_dir && .venv/bin/ray stop --force; $start"
}

cmd_address() {
  local describe=(gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
                  --format="value(networkEndpoints[$worker].ipAddress)")
  if [ "$dry" -eq 1 ]; then
    run "${describe[@]}"
    return
  fi
  local ip
  ip=$("${describe[@]}")
  [ -n "$ip" ] || die "no internal IP for worker $worker of $name (is it READY? gcloud compute" \
    "tpus tpu-vm describe $name)."
  echo "$ip:$port"
}

cmd_stop() {
  all_workers_only
  ssh_workers all "cd $remote_dir && .venv/bin/ray stop --force"
}

cmd_sweep() {
  [ ${#extra_args[@]} -gt 0 ] || die "sweep needs the sweep arguments after --, e.g." \
    "-- gin_configs/sweeps/FILE.gin (relative paths are read on the head, from --remote_dir)."
  local cmd=".venv/bin/python -m pretrainx sweep" a ray=0
  for a in "${extra_args[@]}"; do
    cmd+=" $(show_word "$a")"
    [[ $a != --ray && $a != --ray=* ]] || ray=1
  done
  [ "$ray" -eq 1 ] || cmd+=" --ray=auto"  # the cluster this head runs
  ssh_workers "$worker" "cd $remote_dir && { nohup $cmd > sweep.log 2>&1 < /dev/null & }"
}

main() {
  [ $# -ge 1 ] || usage
  sub=$1; shift
  case $sub in
    head | workers | address | stop | sweep) ;;
    -h | --help | help) usage ;;
    *) die "unknown subcommand '$sub' (head, workers, address, stop or sweep)." ;;
  esac
  dry=0 name= zone= project= remote_dir='~/pretrainx' port=6379 worker=0 worker_set=0
  head_address=
  extra_args=() where=()
  parse_args "$@"
  validate_common
  "cmd_$sub"
}

main "$@"
