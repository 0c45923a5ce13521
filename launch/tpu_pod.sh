#!/usr/bin/env bash
# Create (or reuse) a Cloud TPU VM slice, copy this repository to every worker, install it with
# its `tpu` extra (JAX with libtpu, setup.py), and run the same train command on all workers (JAX
# auto-detects the pod).
#
#   TPU_NAME=mmearth-v4-64 ZONE=us-central2-b ACCELERATOR_TYPE=v4-64 PROJECT=my-project \
#   launch/tpu_pod.sh --config configs/mp_mae.py:atto --workdir gs://my-bucket/runs/atto \
#       --config.data.path=/mnt/disks/mmearth/shards
#
# Variables: TPU_NAME, ZONE, ACCELERATOR_TYPE, PROJECT (required); RUNTIME_VERSION (default
# tpu-ubuntu2204-base); SPOT=1 for a preemptible slice (preemption sends SIGTERM: every worker
# saves a checkpoint; re-running this script resumes from it).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME, the name of the TPU VM slice}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v4-64 or v5p-128}"
: "${PROJECT:?set PROJECT, the Google Cloud project}"
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
if [[ $# -eq 0 ]]; then
  echo "tpu_pod.sh: pass the train arguments, e.g. --config configs/mp_mae.py:atto --workdir gs://..." >&2
  exit 2
fi
command -v gcloud >/dev/null || { echo "tpu_pod.sh: gcloud is not installed" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
TPU=(gcloud compute tpus tpu-vm --project "$PROJECT" --zone "$ZONE")

if ! "${TPU[@]}" describe "$TPU_NAME" >/dev/null 2>&1; then
  "${TPU[@]}" create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" \
      --version "$RUNTIME_VERSION" ${SPOT:+--spot}
fi

# The committed code, identical on every worker.
ARCHIVE=$(mktemp --suffix=.tar.gz)
git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
"${TPU[@]}" scp "$ARCHIVE" "$TPU_NAME":mmearth_jax.tar.gz --worker=all
"${TPU[@]}" ssh "$TPU_NAME" --worker=all --command \
    "rm -rf mmearth_jax && mkdir mmearth_jax && tar -xzf mmearth_jax.tar.gz -C mmearth_jax && \
     python3 -m pip install -q -U -e './mmearth_jax[tpu]'"

ARGS=$(printf '%q ' "$@")
"${TPU[@]}" ssh "$TPU_NAME" --worker=all --command \
    "cd mmearth_jax && PATH=\$HOME/.local/bin:\$PATH mmearth-jax train $ARGS"
