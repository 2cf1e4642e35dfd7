#!/usr/bin/env bash
# Wheels of what tileseg needs that the lent GPU machine's Python (3.12, with PyTorch, numpy, scipy,
# click, safetensors, tqdm, pillow, pytest, hypothesis, ...) lacks, fetched HERE into .whl/ (git-ignored),
# so that benchmarks/gpu_check.sh can install them THERE, where nothing can be fetched. The versions
# are those of this checkout's tested environment (.venv), so the GPU run uses the same libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}  # the GPU machine's Python
NAMES="dask distributed zarr numcodecs mrcfile donfig google-crc32c partd locket tblib tornado zict"
pins=()
for name in $NAMES; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in $PY; install the project first (pip install -e '.[test]')" >&2; exit 2; }
    pins+=("$name==$version")
done
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
