#!/usr/bin/env bash
# Run `mmearth-jax train` on this machine as NUM_PROCESSES processes forming one JAX job.
#
#   NUM_PROCESSES=1 launch/local.sh --config configs/mp_mae.py:demo --workdir runs/demo
#   # rehearse a 2-host job on a CPU: 2 processes x 4 simulated devices = one 8-device mesh
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh --config configs/mp_mae.py:demo \
#       --workdir runs/demo2 --config.mesh.fsdp=4
#
# Needs `mmearth-jax` on PATH: `pip install -e .` (CPU), `-e '.[cuda12]'` (NVIDIA GPUs) or
# `-e '.[tpu]'` (a TPU VM); see setup.py's extras.
#
# Variables: NUM_PROCESSES (required); DEVICES_PER_PROCESS (simulated CPU devices, CPU only);
# PORT (coordinator port, default 12355); LOG_DIR (logs of processes 1.., default .);
# MMEARTH_JAX (the command, default mmearth-jax). SIGTERM/SIGINT are passed to every process
# (each saves a checkpoint and exits). Exits with the first non-zero status of any process.
set -euo pipefail

: "${NUM_PROCESSES:?set NUM_PROCESSES to the number of processes to start (1, or 2+ to rehearse a multi-host job)}"
if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: NUM_PROCESSES=$NUM_PROCESSES is not a positive integer" >&2; exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "local.sh: pass the train arguments, e.g. --config configs/mp_mae.py:demo --workdir runs/demo" >&2
  exit 2
fi
PORT=${PORT:-12355}
LOG_DIR=${LOG_DIR:-.}
read -r -a CMD <<< "${MMEARTH_JAX:-mmearth-jax}"
if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
fi

if [[ "$NUM_PROCESSES" -eq 1 ]]; then
  exec "${CMD[@]}" train "$@"
fi

mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env MMEARTH_COORDINATOR="127.0.0.1:${PORT}" MMEARTH_NUM_PROCESSES="$NUM_PROCESSES" \
      MMEARTH_PROCESS_ID="$i" "${CMD[@]}" train "$@" \
      > >(if [[ $i -eq 0 ]]; then cat; else cat > "$LOG_DIR/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives; wait again until the process is gone.
  while true; do
    set +e; wait "$pid"; code=$?; set -e
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
  done
  if [[ $code -ne 0 && $status -eq 0 ]]; then status=$code; fi
done
exit "$status"
