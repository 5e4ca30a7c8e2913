#!/usr/bin/env bash
# Run an r1jax command on every worker of a Cloud TPU VM pod slice (e.g. v5p-512: 64 hosts x 4 chips):
# copy this checkout to each worker, install it with jax[tpu], then run the command on all workers at
# once. jax.distributed finds the other workers through the TPU metadata server (R1JAX_DISTRIBUTED=auto).
#
#   launch/tpu_pod.sh --tpu my-v5p-512 --zone us-east5-a [--project P] -- \
#       r1jax train configs/train/my_run.yaml mesh.data=1 mesh.fsdp=8 mesh.expert=8 mesh.tensor=4
#
# Needs: gcloud (authenticated), an existing TPU VM slice, and a run directory every worker can write
# (out_dir / checkpoint.directory on gs://... or a shared filesystem): checkpoints are written by all hosts.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  echo "options: --tpu NAME --zone ZONE [--project P] [--dir DIR (on the workers, default r1jax)]"
  echo "         [--no-copy] [--no-install] [--pip-extra 'pkg ...'] [--dry-run]"
}

tpu="" zone="" project="" dir="r1jax" copy=1 install=1 pip_extra="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --no-copy) copy=0; shift ;;
    --no-install) install=0; shift ;;
    --pip-extra) pip_extra="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch/tpu_pod.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$tpu" ]] || { echo "launch/tpu_pod.sh: --tpu NAME is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "launch/tpu_pod.sh: --zone ZONE is required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "launch/tpu_pod.sh: no command given (put it after --)" >&2; exit 2; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
tarball="/tmp/r1jax-src-$$.tar.gz"
gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" --worker=all)
[[ -n "$project" ]] && where+=(--project "$project")

run() {  # print, and unless --dry-run, execute
  local line
  line=$(printf '%q ' "$@")
  printf '%s\n' "${line% }"
  [[ $dry_run -eq 1 ]] || "$@"
}

quoted_cmd=$(printf '%q ' "$@")
quoted_cmd="${quoted_cmd% }"
if [[ $copy -eq 1 ]]; then
  run tar -czf "$tarball" --exclude=.git --exclude=./runs --exclude='.venv*' --exclude=__pycache__ -C "$repo" .
  run "${gc[@]}" scp "$tarball" "$tpu:/tmp/r1jax-src.tar.gz" "${where[@]}"
  run "${gc[@]}" ssh "$tpu" "${where[@]}" --command "mkdir -p $dir && tar -xzf /tmp/r1jax-src.tar.gz -C $dir"
  [[ $dry_run -eq 1 ]] || rm -f "$tarball"
fi
if [[ $install -eq 1 ]]; then
  run "${gc[@]}" ssh "$tpu" "${where[@]}" --command \
    "cd $dir && python3 -m pip install -q -U 'jax[tpu]' -e . $pip_extra"
fi
# All workers start the same command; ~/.local/bin holds the r1jax entry point of a --user install.
run "${gc[@]}" ssh "$tpu" "${where[@]}" --command \
  "cd $dir && export PATH=\$HOME/.local/bin:\$PATH R1JAX_DISTRIBUTED=auto && $quoted_cmd"
