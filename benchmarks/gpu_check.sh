#!/usr/bin/env bash
# The GPU checks of issue #4 in one command, for a lent GPU machine (see the device tool's README):
# install the wheels that benchmarks/gpu_wheels.sh fetched into .whl/ (carried along), then
#   1. tests/test_gpu.py (CUDA matches the CPU; bf16/fp16 agree with fp32),
#   2. benchmarks/gpu_benchmark.py (bare network in both memory orders vs segment(), voxels/s, fp32 bf16 fp16;
#      fp32 also with 4 and 8 blocks in flight on the GPU worker),
#   3. benchmarks/precision.py --device cuda (bf16 and fp16 against fp32: IoU on simulated tomograms, speed; last,
#      as it matters least),
# writing logs and results to $OUT (or ./gpu-out). Nothing is fetched; it fails fast without CUDA.
#
#   here:  bash benchmarks/gpu_wheels.sh
#   there: bash benchmarks/gpu_check.sh            (device run with carry [".whl"], timeout_s ~ 540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
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
status=0
timeout "${TEST_SECONDS:-180}" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" || status=1
timeout "${BENCH_SECONDS:-300}" "$PY" benchmarks/gpu_benchmark.py --size "${SIZE:-512}" --precision fp32 bf16 fp16 --blocks-in-flight 2 4 8 --out-dir "$OUT" \
    2>&1 | tee "$OUT/gpu_benchmark.log" || status=1
timeout "${PRECISION_SECONDS:-110}" "$PY" benchmarks/precision.py --device cuda --seeds 2 --rounds 2 --out-dir "$OUT" \
    2>&1 | tee "$OUT/precision.log" || status=1
exit $status
