#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host): create it, copy and install this checkout on
# every worker, run `python -m launch.train` on all workers at once, delete the slice.
#
#   PROJECT=my-proj ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 \
#     launch/tpu_pod.sh all --gin_file=experiments/quickstart.gin --gin_file=hardware/fsdp.gin \
#                           --workdir=/mnt/shared/runs/qs
#
# Steps one at a time: create | setup | run ARGS... | logs | ssh | delete | all ARGS... (create,
# setup, run, delete). `run` passes ARGS to launch.train on every worker. Each worker runs one JAX
# process over its local chips; t_jax.sharding.initialize_distributed() (called by launch.train)
# finds the other workers through the TPU metadata server (jax.distributed auto-detection), so no
# coordinator flags are needed. Process 0 (worker 0) writes logs and metrics.
#
# --workdir must be storage that every worker sees at the same path (checkpoints are written by all
# workers together): a Filestore/NFS mount or a gcsfuse-mounted bucket, set up by MOUNT_CMD below.
# A local path works for runs that never restore from a checkpoint.
# Untested here (no TPU access when written): the commands follow the Cloud TPU VM documentation
# (`gcloud compute tpus tpu-vm create|scp|ssh|delete`); check versions with
# `gcloud compute tpus tpu-vm versions list --zone=$ZONE` and accelerator types with
# `gcloud compute tpus accelerator-types list --zone=$ZONE`.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"                    # 1: print the gcloud commands instead of running them
gcloud() { if [[ "$DRY_RUN" == 1 ]]; then printf '+ gcloud'; printf ' %q' "$@"; echo; else command gcloud "$@"; fi; }
PROJECT="${PROJECT:-$(command gcloud config get-value project 2>/dev/null || true)}"
ZONE="${ZONE:-us-west4-a}"
TPU_NAME="${TPU_NAME:-t-jax-${USER:-user}}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"  # v5e: 16 chips on 4 hosts; v4-32, v5p-32, v6e-16, ...
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"  # v4: tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
SPOT="${SPOT:-0}"                          # 1: spot capacity (cheaper, may be preempted)
REMOTE_DIR="${REMOTE_DIR:-t_jax}"          # checkout location on each worker (under ~)
PYTHON="${PYTHON:-python3.11}"             # the package needs Python >= 3.11
MOUNT_CMD="${MOUNT_CMD:-}"                 # e.g. 'sudo mkdir -p /mnt/shared && sudo mount -t nfs 10.0.0.2:/vol /mnt/shared'
DETACH="${DETACH:-0}"                      # 1: run under nohup (survives ssh disconnects); see `logs`

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU=(--zone="$ZONE" --project="$PROJECT")

ssh_all() {  # ssh_all COMMAND: run on every worker of the slice at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU[@]}" --worker=all --command="$1"
}

create() {
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${extra[@]}"
}

setup() {  # copy the working tree (tracked and untracked, not ignored) to every worker and install it
  local tarball
  tarball="$(mktemp -t t_jax_XXXX).tar.gz"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --null -T -)
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":t_jax.tar.gz "${TPU[@]}" --worker=all
  rm -f "$tarball"
  ssh_all "set -e; sudo apt-get -qq update && sudo apt-get -qq install -y $PYTHON $PYTHON-venv >/dev/null
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/t_jax.tar.gz -C ~/$REMOTE_DIR
    [ -d ~/venv ] || $PYTHON -m venv ~/venv
    ~/venv/bin/pip install -q --upgrade pip && ~/venv/bin/pip install -q -e ~/$REMOTE_DIR'[tpu]'
    ${MOUNT_CMD:+$MOUNT_CMD}
    ~/venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
}

run() {  # run ARGS...: launch.train on every worker (one JAX process per host)
  local args
  printf -v args '%q ' "$@"
  local cmd="cd ~/$REMOTE_DIR && ~/venv/bin/python -m launch.train $args"
  if [[ "$DETACH" == 1 ]]; then
    ssh_all "nohup bash -c '$cmd' > ~/train.log 2>&1 < /dev/null &"
    echo "started; follow worker 0 with: $0 logs"
  else
    ssh_all "$cmd"
  fi
}

logs() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU[@]}" --worker=0 --command="tail -f ~/train.log"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU[@]}" --quiet
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create) create ;;
  setup) setup ;;
  run) run "$@" ;;
  logs) logs ;;
  ssh) gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU[@]}" --worker="${WORKER:-0}" ;;
  delete) delete ;;
  all)
    create
    trap delete EXIT  # tear the slice down even when setup or training fails
    setup
    DETACH=0 run "$@"
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
