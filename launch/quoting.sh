# Shell-quoting helpers shared by the launch scripts (sourced, not run): how a command is shown by
# --dry-run so that the printed line can be pasted back into a shell, and `run`, which does that.

# $1 quoted for a POSIX shell: as is when plainly safe, else in single quotes, or in double quotes
# when it holds single quotes but nothing that double quotes would expand.
sq() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 == *\'* && ! $1 =~ [\"\$\`\\!] ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# One argv word for display; `--flag=value` keeps the flag bare and quotes only the value.
show_word() {
  if [[ $1 =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    sq "${BASH_REMATCH[2]}"
  else
    sq "$1"
  fi
}

# Runs "$@", or with --dry-run ($dry = 1 in the calling script) prints it as one
# copy-pasteable line.
run() {
  if [ "$dry" -eq 1 ]; then
    local words=() w
    for w in "$@"; do words+=("$(show_word "$w")"); done
    echo "${words[*]}"
  else
    "$@"
  fi
}
