#!/usr/bin/env bash
# Render a JobSet for r1jax and submit it with kubectl:
#
#   launch/k8s/submit.sh --accelerator tpu --name r1-v5p --image REGISTRY/r1jax:TAG -- \
#       r1jax train configs/train/my_run.yaml mesh.data=1 mesh.fsdp=8 mesh.expert=8 mesh.tensor=4
#   launch/k8s/submit.sh --accelerator gpu --name r1-h100 --image REGISTRY/r1jax:TAG --hosts 32 -- r1jax train ...
#
# Needs: kubectl pointing at a GKE cluster with the JobSet controller installed, TPU slice or GPU node
# pools, an image with r1jax installed (jax[tpu] or jax[cuda12]), and out_dir / checkpoint.directory on
# storage every pod can write (gs:// or a shared volume). --dry-run prints the YAML and the kubectl command.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
accel="" name="" image="" hosts="" dry_run=0
tpu_accelerator="tpu-v5p-slice" tpu_topology="4x8x8" chips_per_host=4
gpu_accelerator="nvidia-h100-80gb" gpus_per_host=8 port=12345 max_restarts=3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --accelerator) accel="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --tpu-accelerator) tpu_accelerator="$2"; shift 2 ;;
    --tpu-topology) tpu_topology="$2"; shift 2 ;;
    --chips-per-host) chips_per_host="$2"; shift 2 ;;
    --gpu-accelerator) gpu_accelerator="$2"; shift 2 ;;
    --gpus-per-host) gpus_per_host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "launch/k8s/submit.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
done
[[ "$accel" == "tpu" || "$accel" == "gpu" ]] || { echo "launch/k8s/submit.sh: --accelerator tpu|gpu is required" >&2; exit 2; }
[[ -n "$name" ]] || { echo "launch/k8s/submit.sh: --name is required" >&2; exit 2; }
[[ -n "$image" ]] || { echo "launch/k8s/submit.sh: --image is required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "launch/k8s/submit.sh: no command given (put it after --)" >&2; exit 2; }
if [[ -z "$hosts" ]]; then
  if [[ "$accel" == "tpu" ]]; then  # chips in the topology / chips per host
    hosts=$(( $(echo "$tpu_topology" | tr 'x' '*') / chips_per_host ))
  else
    hosts=32
  fi
fi

# The command becomes one YAML (JSON) string for `bash -c`.
command_json=$(python3 -c 'import json, shlex, sys; print(json.dumps(" ".join(shlex.quote(a) for a in sys.argv[1:])))' "$@")
rendered=$(NAME="$name" IMAGE="$image" HOSTS="$hosts" COMMAND="$command_json" MAX_RESTARTS="$max_restarts" \
  TPU_ACCELERATOR="$tpu_accelerator" TPU_TOPOLOGY="$tpu_topology" CHIPS_PER_HOST="$chips_per_host" \
  GPU_ACCELERATOR="$gpu_accelerator" GPUS_PER_HOST="$gpus_per_host" PORT="$port" \
  DEVICE_IDS="$(seq -s, 0 $((gpus_per_host - 1)))" \
  python3 -c 'import os, string, sys; print(string.Template(open(sys.argv[1]).read()).substitute(os.environ))' \
  "$here/jobset-$accel.yaml")

if [[ $dry_run -eq 1 ]]; then
  printf '%s\n---\n# kubectl apply -f -\n' "$rendered"
  exit 0
fi
printf '%s\n' "$rendered" | kubectl apply -f -
