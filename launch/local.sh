#!/usr/bin/env bash
# Run one command as N cooperating JAX processes on this machine (loopback coordinator), e.g. to try
# multi-host code paths on CPU:
#
#   launch/local.sh -n 2 --cpu-devices 4 -- r1jax train configs/train/tiny_pretrain.yaml mesh.data=2 mesh.expert=4
#
# Each process gets R1JAX_COORDINATOR_ADDRESS / R1JAX_NUM_PROCESSES / R1JAX_PROCESS_ID, which
# r1jax.parallel.mesh.initialize_distributed() reads (CPU processes talk over gloo). Output lines are
# prefixed with [process id]. If one process fails the others are stopped; the exit status is the
# first failure's. --dry-run prints the commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  echo "options: -n N (processes, default 2)  --cpu-devices K (simulated CPU devices per process; sets"
  echo "         JAX_PLATFORMS=cpu)  --port P (coordinator port, default: a free one)  --dry-run"
}

nproc=2
cpu_devices=""
port=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) nproc="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch/local.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "launch/local.sh: no command given (put it after --)" >&2; exit 2
fi
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: -n must be a positive integer, got '$nproc'" >&2; exit 2
fi
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

envs=()
envs+=("R1JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "R1JAX_NUM_PROCESSES=$nproc")
if [[ -n "$cpu_devices" ]]; then
  envs+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
fi

if [[ $dry_run -eq 1 ]]; then
  for ((i = 0; i < nproc; i++)); do
    printf 'env'; printf ' %q' "${envs[@]}" "R1JAX_PROCESS_ID=$i" "$@"; printf '\n'
  done
  exit 0
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < nproc; i++)); do
  # $! is the command itself (env execs it), so stopping it stops the process, not a wrapper.
  env "${envs[@]}" "R1JAX_PROCESS_ID=$i" "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

# Wait for all; on the first failure stop the rest (a dead peer would leave them waiting in a collective).
status=0
remaining=$nproc
while [[ $remaining -gt 0 ]]; do
  set +e
  wait -n
  rc=$?
  set -e
  remaining=$((remaining - 1))
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "launch/local.sh: a process exited with status $rc; stopping the others" >&2
    cleanup
  fi
done
exit $status
