#!/usr/bin/env bash
# Cloud TPU VM lifecycle for pretrainx: create a slice (or a queued resource), install pretrainx on
# every worker, start `python -m pretrainx train` on all workers, stream a worker's log, delete.
# --dry-run prints the exact commands, one per line, and runs nothing. See launch/README.md.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_vm.sh SUBCOMMAND --name NAME --zone ZONE [--project PROJECT] [--dry-run] [options]
  create   --accelerator_type TYPE (e.g. v5p-64) --version RUNTIME (e.g. v2-alpha-tpuv5)
           [--queued [--qr_name QR]] [--spot]
  install  (--repo GIT_URL [--ref origin/main] | --source LOCAL_CHECKOUT | --pip PIP_SPEC)
           [--extra test] [--jax_spec 'jax[tpu]'] [--python python3.12] [--remote_dir ~/pretrainx]
  train    --gin_file FILE [--gin_file FILE ...] (--bucket BUCKET | --run_dir PATH)
           (the run directory defaults to gs://BUCKET/runs/NAME; $PRETRAINX_BUCKET sets BUCKET)
           [--remote_dir ~/pretrainx] [-- EXTRA_TRAIN_ARGS...]
  logs     [--worker 0] [--remote_dir ~/pretrainx]
  delete   [--queued [--qr_name QR]]
EOF
  exit 2
}

die() {
  echo "launch/tpu_vm.sh ${sub:-}: error: $*" >&2
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
      --queued) queued=1; shift; continue ;;
      --spot) spot=1; shift; continue ;;
      --) shift; extra_args=("$@"); return ;;
      --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
      --*) [ $# -ge 2 ] && [[ $2 != --* ]] || die "$opt needs a value."; val=$2; shift 2 ;;
      *) die "unexpected argument '$opt' (train arguments go after --)." ;;
    esac
    case $opt in
      --name) name=$val ;;
      --zone) zone=$val ;;
      --project) project=$val ;;
      --accelerator_type) accel=$val ;;
      --version) version=$val ;;
      --qr_name) qr_name=$val ;;
      --repo) repo=$val ;;
      --ref) ref=$val ;;
      --source) source_dir=$val ;;
      --pip) pip_spec=$val ;;
      --extra) extra=$val ;;
      --jax_spec) jax_spec=$val ;;
      --python) python=$val ;;
      --remote_dir) remote_dir=$val ;;
      --gin_file) gin_files+=("$val") ;;
      --run_dir) run_dir=$val ;;
      --bucket) bucket=$val ;;
      --worker) worker=$val ;;
      *) die "unknown option $opt (see launch/tpu_vm.sh with no arguments for usage)." ;;
    esac
  done
}

validate_common() {
  validate_tpu_vm
  qr_name=${qr_name:-$name-qr}
}

# gcloud ssh into worker(s) $1 running the remote shell command $2.
ssh_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

cmd_create() {
  require "$accel" --accelerator_type "e.g. --accelerator_type=v5p-64"
  require "$version" --version "the TPU runtime, e.g. --version=v2-alpha-tpuv5"
  local opts=(--accelerator-type="$accel")
  if [ "$queued" -eq 1 ]; then
    opts+=(--runtime-version="$version")
    [ "$spot" -eq 0 ] || opts+=(--spot)
    run gcloud compute tpus queued-resources create "$qr_name" --node-id="$name" "${where[@]}" \
      "${opts[@]}"
  else
    opts+=(--version="$version")
    [ "$spot" -eq 0 ] || opts+=(--spot)
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" "${opts[@]}"
  fi
}

# The remote commands that make REMOTE_DIR/.venv with --python (jax >= 0.11 needs Python >= 3.12;
# a worker without it stops with one line) and pip-install $1 (already quoted) into it.
venv_and_pip() {
  local py
  py=$(sq "$python")
  local line="{ $py -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { echo \"pretrainx needs"
  line+=" Python >= 3.12 on every worker: install it or pass --python=PATH\" >&2; exit 2; }; }"
  line+=" && $py -m venv .venv && .venv/bin/pip install --upgrade pip && .venv/bin/pip install"
  line+=" $1"
  [ -z "$jax_spec" ] || line+=" $(sq "$jax_spec")"
  echo "$line"
}

cmd_install() {
  local sources=0 spec=. remote
  for s in "$repo" "$source_dir" "$pip_spec"; do [ -z "$s" ] || sources=$((sources + 1)); done
  [ "$sources" -eq 1 ] || die "install needs exactly one of --repo GIT_URL," \
    "--source LOCAL_CHECKOUT or --pip PIP_SPEC (got $sources)."
  [ -z "$extra" ] || spec=".[$extra]"
  if [ -n "$repo" ]; then
    remote="{ [ -d $remote_dir/.git ] || git clone $(sq "$repo") $remote_dir; } && cd $remote_dir"
    remote+=" && git fetch --quiet origin && git checkout --force $(sq "$ref")"
    remote+=" && $(venv_and_pip "-e $(sq "$spec")")"
  elif [ -n "$source_dir" ]; then
    [ -d "$source_dir/.git" ] || [ "$dry" -eq 1 ] ||
      die "--source=$source_dir is not a git checkout (its committed HEAD is what gets copied)."
    local tarball=/tmp/pretrainx-src.tar.gz
    run git -C "$source_dir" archive --format=tar.gz --output="$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:$tarball" "${where[@]}" --worker=all
    remote="mkdir -p $remote_dir && tar -xzf $tarball -C $remote_dir && cd $remote_dir"
    remote+=" && $(venv_and_pip "-e $(sq "$spec")")"
  else
    remote="mkdir -p $remote_dir && cd $remote_dir && $(venv_and_pip "$(sq "$pip_spec")")"
  fi
  ssh_workers all "$remote"
}

cmd_train() {
  [ ${#gin_files[@]} -gt 0 ] || die "train needs --gin_file (e.g. --gin_file=gin_configs/llama_7b.gin;" \
    "relative paths are read on the workers, from --remote_dir)."
  bucket=${bucket#gs://}
  if [ -z "$run_dir" ] && [ -n "$bucket" ]; then run_dir="gs://${bucket%/}/runs/$name"; fi
  require "$run_dir" "--run_dir or --bucket" "where checkpoints and metrics go: --bucket=BUCKET for gs://BUCKET/runs/$name, or --run_dir=gs://BUCKET/runs/run1 (a path every worker mounts works too)"
  # On TPU VMs jax.distributed finds the coordinator, process count and id itself: no flags.
  local train=".venv/bin/python -m pretrainx train" g a
  for g in "${gin_files[@]}"; do train+=" $(show_word "--gin_file=$g")"; done
  train+=" $(show_word "--run_dir=$run_dir")"
  for a in "${extra_args[@]}"; do train+=" $(show_word "$a")"; done
  ssh_workers all "cd $remote_dir && { nohup $train > train.log 2>&1 < /dev/null & }"
}

cmd_logs() {
  [[ $worker =~ ^[0-9]+$ ]] || die "--worker=$worker must be one worker's index (0, 1, ...)."
  ssh_workers "$worker" "tail -n +1 -F $remote_dir/train.log"
}

cmd_delete() {
  if [ "$queued" -eq 1 ]; then
    run gcloud compute tpus queued-resources delete "$qr_name" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

main() {
  [ $# -ge 1 ] || usage
  sub=$1; shift
  case $sub in
    create | install | train | logs | delete) ;;
    -h | --help | help) usage ;;
    *) die "unknown subcommand '$sub' (create, install, train, logs or delete)." ;;
  esac
  dry=0 queued=0 spot=0 name= zone= project= accel= version= qr_name= repo= ref=origin/HEAD
  source_dir= pip_spec= extra=test jax_spec='jax[tpu]' python=python3.12 remote_dir='~/pretrainx'
  run_dir= worker=0
  bucket=${PRETRAINX_BUCKET:-}
  gin_files=() extra_args=() where=()
  parse_args "$@"
  validate_common
  "cmd_$sub"
}

main "$@"
