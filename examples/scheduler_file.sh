#!/usr/bin/env bash
# Segment a tomogram on GPU nodes with a Dask scheduler file: no dask-jobqueue, any batch system.
#
#   examples/scheduler_file.sh all INPUT OUTPUT.zarr [tileseg run options]   # everything on this node, then stop
#
# or, across nodes (the scheduler file, the tomogram and the output on a shared file system):
#
#   examples/scheduler_file.sh scheduler &                        # on one node: writes $SCHEDULER_FILE
#   srun --ntasks-per-node=1 examples/scheduler_file.sh workers & # on every GPU node: one worker per GPU
#   examples/scheduler_file.sh run INPUT OUTPUT.zarr --batch 8    # anywhere: tileseg run --scheduler $SCHEDULER_FILE
#
# Each worker gets one GPU (CUDA_VISIBLE_DEVICES=N, seen as 'cuda'), two threads and the Dask resource
# GPU=1: tileseg's block tasks each ask for GPU=0.5, so a worker runs two blocks at once, one on the GPU
# while the other reads or writes. Without --resources GPU=1 a --device cuda run never gets a task.
# A stopped run is finished by the same 'run' with --resume.
#
# Environment:
#   SCHEDULER_FILE  where the scheduler writes its address   (default: $HOME/tileseg-scheduler.json)
#   GPUS            GPU indices on this node, e.g. "0 1 2 3"  (default: CUDA_VISIBLE_DEVICES, else all nvidia-smi lists)
#   DEVICE          cuda, or cpu for CPU-only workers         (default: cuda)
#   CPU_WORKERS     workers per node with DEVICE=cpu          (default: 1)
#   THREADS         threads per worker                        (default: 2)
#   WAIT_WORKERS    workers 'run' waits for before starting   (default: 1; 'all': every worker it started)
#   SCHEDULER_ARGS  extra 'dask scheduler' arguments, e.g. "--port 8786 --dashboard-address :8787"
#   WORKER_DIR      worker scratch space                      (default: ${TMPDIR:-/tmp})
set -euo pipefail

SCHEDULER_FILE=${SCHEDULER_FILE:-$HOME/tileseg-scheduler.json}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-2}
WORKER_DIR=${WORKER_DIR:-${TMPDIR:-/tmp}}
PIDS=()

gpus() {
    if [[ -n "${GPUS+set}" ]]; then echo "${GPUS//,/ }"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then echo "${CUDA_VISIBLE_DEVICES//,/ }"
    else nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' '
    fi
}

start_scheduler() {  # in the background; returns once the scheduler file is written
    rm -f "$SCHEDULER_FILE"  # never attach to a stale address
    # shellcheck disable=SC2086
    dask scheduler --scheduler-file "$SCHEDULER_FILE" ${SCHEDULER_ARGS:-} &
    PIDS+=($!)
    for _ in $(seq 600); do [[ -s "$SCHEDULER_FILE" ]] && return 0; sleep 0.1; done
    echo "scheduler_file.sh: the scheduler wrote no $SCHEDULER_FILE within a minute" >&2
    return 1
}

start_workers() {  # in the background; prints how many were started
    local n=0 host
    host=$(hostname -s)
    if [[ "$DEVICE" == cpu ]]; then
        for i in $(seq "${CPU_WORKERS:-1}"); do
            dask worker --scheduler-file "$SCHEDULER_FILE" --nthreads "$THREADS" --nworkers 1 \
                --name "$host-cpu$i" --local-directory "$WORKER_DIR" >&2 &
            PIDS+=($!); n=$((n + 1))
        done
    else
        for gpu in $(gpus); do
            CUDA_VISIBLE_DEVICES=$gpu dask worker --scheduler-file "$SCHEDULER_FILE" --nthreads "$THREADS" --nworkers 1 \
                --resources GPU=1 --name "$host-gpu$gpu" --local-directory "$WORKER_DIR" >&2 &
            PIDS+=($!); n=$((n + 1))
        done
    fi
    [[ $n -gt 0 ]] || { echo "scheduler_file.sh: no GPUs found; set GPUS, or DEVICE=cpu" >&2; return 1; }
    echo "$n"
}

run() {  # INPUT OUTPUT [tileseg run options]: waits for WAIT_WORKERS workers, then segments
    python - "$SCHEDULER_FILE" "${WAIT_WORKERS:-1}" <<'EOF'
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="60s") as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=600)
EOF
    tileseg run "$1" "$2" --scheduler "$SCHEDULER_FILE" --device "$DEVICE" "${@:3}"
}

stop() {  # only the processes this script started
    if [[ ${#PIDS[@]} -gt 0 ]]; then kill "${PIDS[@]}" 2>/dev/null || true; wait "${PIDS[@]}" 2>/dev/null || true; fi
}

case "${1:-}" in
    scheduler) trap stop EXIT; start_scheduler; wait ;;
    workers) trap stop EXIT; start_workers >/dev/null; wait ;;
    run) shift; [[ $# -ge 2 ]] || { echo "usage: $0 run INPUT OUTPUT.zarr [tileseg run options]" >&2; exit 2; }; run "$@" ;;
    all)
        shift; [[ $# -ge 2 ]] || { echo "usage: $0 all INPUT OUTPUT.zarr [tileseg run options]" >&2; exit 2; }
        trap stop EXIT
        start_scheduler
        start_workers >"$SCHEDULER_FILE.workers"
        WAIT_WORKERS=${WAIT_WORKERS:-$(cat "$SCHEDULER_FILE.workers")}; rm -f "$SCHEDULER_FILE.workers"
        run "$@" ;;
    *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
