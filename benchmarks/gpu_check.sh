#!/usr/bin/env bash
# The GPU checks of issue #4 in one command, for a lent GPU machine (see the device tool's README):
# install the wheels that benchmarks/gpu_wheels.sh fetched into .whl/ (carried along), then
#   1. tests/test_gpu.py (CUDA matches the CPU; tf32/bf16/fp16 agree with fp32),
#   2. benchmarks/gpu_benchmark.py (bare network vs segment(), voxels/s, fp32 tf32 bf16 fp16; for fp32 also the
#      other memory order, cudnn.benchmark on, cudnn.deterministic off, and 4 blocks in flight on the GPU worker),
#   3. benchmarks/precision.py --device cuda (tf32, bf16 and fp16 against fp32: IoU on simulated tomograms, speed;
#      last, as it matters least),
# writing logs and results to $OUT (or ./gpu-out): 8 files, the most a device run brings back. Each step has
# its own time limit, together about 500 s of a 540 s run; the benchmarks save their tables as they go, so a
# step cut short keeps what it measured. Nothing is fetched; it fails fast without CUDA.
#
#   here:  bash benchmarks/gpu_wheels.sh
#   there: bash benchmarks/gpu_check.sh            (device run with carry [".whl"], timeout_s ~ 540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# a lent machine's MemTotal can start far below its memory, and the embedded Dask worker would pause
# (silently: tileseg quiets Dask's warnings) at 80 % of a limit taken from it
export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE=False
PY=${PY:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import tilesegment.pipeline, tilesegment.executor, tilesegment.zarr_io, tilesegment.mrc" 2>&1 | tee "$OUT/env.log" || exit 3
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); sys.exit(0 if torch.cuda.is_available() else 4)" \
    2>&1 | tee -a "$OUT/env.log" || exit 4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/env.log"
{ grep -E 'MemTotal|MemAvailable' /proc/meminfo; echo "cpus $(nproc)"; } 2>&1 | tee -a "$OUT/env.log"
status=0
timeout "${TEST_SECONDS:-110}" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" || status=1
timeout "${BENCH_SECONDS:-240}" "$PY" benchmarks/gpu_benchmark.py --size "${SIZE:-512}" --precision fp32 tf32 bf16 fp16 --blocks-in-flight 2 4 --out-dir "$OUT" \
    2>&1 | tee "$OUT/gpu_benchmark.log" || status=1
timeout "${PRECISION_SECONDS:-130}" "$PY" benchmarks/precision.py --device cuda --seeds 1 --rounds 1 --out-dir "$OUT" \
    2>&1 | tee "$OUT/precision.log" || status=1
exit $status
