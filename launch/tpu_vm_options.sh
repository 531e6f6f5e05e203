# Checks of the options every gcloud TPU VM script takes (sourced, not run; needs `die` and `sub`):
# --name, --zone, --project, --remote_dir. Sets `where` (the --zone/--project gcloud flags).

require() {  # require VALUE FLAG HINT
  [ -n "$1" ] || die "$sub needs $2 ($3)."
}

validate_tpu_vm() {
  require "$name" --name "the TPU VM name, e.g. --name=my-v5p"
  [[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name=$name must be lowercase letters, digits and hyphens, starting with a letter."
  require "$zone" --zone "e.g. --zone=us-east5-a"
  [[ $remote_dir =~ ^[A-Za-z0-9_./~-]+$ ]] ||
    die "--remote_dir=$remote_dir may hold only letters, digits and _ . / ~ -" \
      "(it is used unquoted)."
  where=(--zone="$zone")
  [ -z "$project" ] || where+=(--project="$project")
}
