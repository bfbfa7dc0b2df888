#!/usr/bin/env bash
# Launch `jbilevel train` on a multi-host Cloud TPU VM slice, or on one 8-GPU host.
#
#   scripts/pod_launch.sh check [CONFIG [key=value ...]]  # compile-only memory check here
#                                                # (no TPU): CONFIG's own steps, or CHECK_ARGS'
#   scripts/pod_launch.sh create                 # create the TPU VM slice
#   scripts/pod_launch.sh setup                  # copy this checkout to every worker, install
#   scripts/pod_launch.sh train CONFIG OUT [key=value ...]   # start on all workers
#   scripts/pod_launch.sh logs                   # fetch every worker's log into logs/<TPU_NAME>/
#   scripts/pod_launch.sh delete                 # delete the slice
#   scripts/pod_launch.sh gpu CONFIG OUT [key=value ...]     # one 8-GPU host, run locally
#
# Settings (environment variables, defaults in brackets):
#   PROJECT [gcloud's default project], ZONE [us-east1-d], TPU_NAME [jbilevel-pod],
#   ACCELERATOR_TYPE [v5litepod-64], RUNTIME_VERSION [v2-alpha-tpuv5-lite],
#   TOPOLOGY [from ACCELERATOR_TYPE, e.g. v5e:8x8] (compile check), MODEL [llama-3-8b]
#   (a jbilevel.models.presets name), CHECK_ARGS [--param-dtype bfloat16 --remat],
#   JAX_VERSION [0.10.2], COORDINATOR_PORT [8476].
# OUT must be a directory that every worker sees at the same path (an NFS or gcsfuse mount):
# checkpoints are written by all processes together, the run report by process 0.
set -euo pipefail

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
ZONE="${ZONE:-us-east1-d}"
TPU_NAME="${TPU_NAME:-jbilevel-pod}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-64}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
MODEL="${MODEL:-llama-3-8b}"
CHECK_ARGS="${CHECK_ARGS:---param-dtype bfloat16 --remat}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
COORDINATOR_PORT="${COORDINATOR_PORT:-8476}"
REMOTE_DIR="jbilevel"  # under each worker's home directory
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,20p' "$0"; exit 2; }

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with the project and zone
  local sub="$1"
  shift
  gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

default_topology() {  # v5e slices: chips -> the 2-D topology jax.experimental.topologies names
  case "$ACCELERATOR_TYPE" in
    v5litepod-8) echo "v5e:2x4" ;;
    v5litepod-16) echo "v5e:4x4" ;;
    v5litepod-32) echo "v5e:4x8" ;;
    v5litepod-64) echo "v5e:8x8" ;;
    v5litepod-128) echo "v5e:8x16" ;;
    v5litepod-256) echo "v5e:16x16" ;;
    *) echo "set TOPOLOGY for ACCELERATOR_TYPE=$ACCELERATOR_TYPE (e.g. v5e:8x8)" >&2; exit 2 ;;
  esac
}

check() {  # ahead-of-time compile for the slice's topology; needs libtpu here, not a TPU
  local topology="${TOPOLOGY:-$(default_topology)}"
  "$PYTHON" -c "import libtpu" 2>/dev/null \
    || { echo "install libtpu first: pip install 'jax[tpu]==$JAX_VERSION'" >&2; exit 2; }
  if [ $# -ge 1 ]; then  # a run configuration's own steps; MODEL names its architecture
    "$PYTHON" scripts/compile_check.py --config "$@" --model "$MODEL" --platform tpu \
      --topology "$topology"
    return
  fi
  # shellcheck disable=SC2086  # CHECK_ARGS is a list of flags
  "$PYTHON" scripts/compile_check.py --model "$MODEL" --platform tpu \
    --topology "$topology" $CHECK_ARGS
}

create() {
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
}

setup() {  # the committed tree (git archive), unpacked and installed on every worker
  local archive
  archive="$(mktemp -d)/jbilevel.tar.gz"
  git archive --format=tar.gz -o "$archive" HEAD
  tpu scp "$archive" "$TPU_NAME:~/jbilevel.tar.gz" --worker=all
  tpu ssh "$TPU_NAME" --worker=all --command="set -e
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jbilevel.tar.gz -C ~/$REMOTE_DIR
    python3 -m venv ~/jbilevel-venv
    ~/jbilevel-venv/bin/pip install -q -U pip
    ~/jbilevel-venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -e ~/$REMOTE_DIR
    ~/jbilevel-venv/bin/python -c 'import jax; print(jax.device_count(), jax.devices()[0])'"
}

worker_ips() {  # internal IPs of the slice's workers, worker 0 first
  tpu describe "$TPU_NAME" --format="value(networkEndpoints[].ipAddress)" | tr ';' '\n'
}

train() {
  [ $# -ge 2 ] || usage
  local config="$1" out="$2"
  shift 2
  local ips coordinator count overrides=""
  ips="$(worker_ips)"
  coordinator="$(echo "$ips" | head -n 1):$COORDINATOR_PORT"
  count="$(echo "$ips" | wc -l)"
  for kv in "$@"; do overrides+=" $(printf '%q' "$kv")"; done
  echo "starting $count processes, coordinator $coordinator, config $config, out $out"
  # Each worker reads its own index from the metadata server; jbilevel.distributed reads the
  # JBILEVEL_* variables and calls jax.distributed.initialize with them.
  tpu ssh "$TPU_NAME" --worker=all --command="set -e
    id=\$(curl -s -H 'Metadata-Flavor: Google' \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)
    mkdir -p ~/jbilevel-logs
    cd ~/$REMOTE_DIR
    JBILEVEL_COORDINATOR=$coordinator JBILEVEL_NUM_PROCESSES=$count JBILEVEL_PROCESS_ID=\$id \
      nohup ~/jbilevel-venv/bin/jbilevel train --config $(printf '%q' "$config") \
      --out $(printf '%q' "$out")$overrides loop.progress=false \
      > ~/jbilevel-logs/worker-\$id.log 2>&1 < /dev/null &
    echo worker \$id started, log ~/jbilevel-logs/worker-\$id.log"
}

logs() {
  local dir="logs/$TPU_NAME" i count
  mkdir -p "$dir"
  count="$(worker_ips | wc -l)"
  for ((i = 0; i < count; i++)); do
    tpu scp "$TPU_NAME:~/jbilevel-logs/worker-$i.log" "$dir/" --worker="$i"
  done
  tail -n 5 "$dir"/worker-*.log
}

gpu() {  # one host with 8 GPUs: one process sees all of them; fsdp over the 8
  [ $# -ge 2 ] || usage
  local config="$1" out="$2"
  shift 2
  "$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()" \
    || { echo "install the CUDA build first: pip install 'jax[cuda12]==$JAX_VERSION' -e ." >&2;
         exit 2; }
  # the run's own steps on these GPUs (its model.path and data are here), kept in the cache
  # the run reads (its default, OUT/xla_cache): it loads them instead of compiling them again
  "$PYTHON" scripts/compile_check.py --config "$config" mesh.data=1 mesh.fsdp=8 "$@" \
    --platform gpu --devices 8 --compile-cache "${JAX_COMPILATION_CACHE_DIR:-$out/xla_cache}"
  mkdir -p logs
  jbilevel train --config "$config" --out "$out" mesh.data=1 mesh.fsdp=8 "$@" \
    2>&1 | tee "logs/gpu-$(date +%Y%m%d-%H%M%S).log"
}

[ $# -ge 1 ] || usage
cmd="$1"
shift
case "$cmd" in
  check) check "$@" ;;
  create) create ;;
  setup) setup ;;
  train) train "$@" ;;
  logs) logs ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  gpu) gpu "$@" ;;
  *) usage ;;
esac
