#!/usr/bin/env bash
# Turns the public datasets of the SFPO paper, once downloaded, into DATA_DIR/<name>.jsonl
# (tools/prepare_math_data.py; the SFPO reference prompt; no network access here).
#
# Download them first (any copy with the usual columns works), e.g. with huggingface-cli:
#   cd "$DOWNLOAD_DIR"
#   huggingface-cli download --repo-type dataset HuggingFaceH4/MATH-500 --local-dir MATH-500
#   huggingface-cli download --repo-type dataset math-ai/aime24 --local-dir aime24
#   huggingface-cli download --repo-type dataset MathArena/aime_2025 --local-dir aime25
#   huggingface-cli download --repo-type dataset AI-MO/aimo-validation-amc --local-dir amc
#   huggingface-cli download --repo-type dataset math-ai/minervamath --local-dir minerva
#   huggingface-cli download --repo-type dataset math-ai/olympiadbench --local-dir olympiadbench
#   huggingface-cli download --repo-type dataset DigitalLearningGmbH/MATH-lighteval --local-dir MATH-lighteval
#   huggingface-cli download --repo-type dataset BytedTsinghua-SIA/DAPO-Math-17k --local-dir DAPO-Math-17k  # optional
#
#   DOWNLOAD_DIR=/data/raw DATA_DIR=/data/math bash examples/prepare_data.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${DOWNLOAD_DIR:=$ROOT/data/raw}"
: "${DATA_DIR:=$ROOT/data/math}"
: "${PYTHON:=python3}"
: "${TEMPLATE:=sfpo}"

missing=()
# prep DATASET OUTPUT_NAME DOWNLOADED_DIR [extra prepare_math_data flags]
prep() {
    local dataset=$1 out=$2 src=$DOWNLOAD_DIR/$3
    shift 3
    if [ ! -e "$src" ]; then
        echo "skipping $out: $src not downloaded" >&2
        missing+=("$out")
        return
    fi
    "$PYTHON" "$ROOT/tools/prepare_math_data.py" --dataset "$dataset" --input "$src" \
        --output "$DATA_DIR/$out.jsonl" --template "$TEMPLATE" "$@"
}

prep math500 math500 MATH-500 --split test
prep aime24 aime24 aime24
prep aime25 aime25 aime25
prep amc amc amc
prep minerva minerva minerva
prep olympiadbench olympiadbench olympiadbench --split test
prep math math_train MATH-lighteval --split train
prep dapo dapo_math_17k DAPO-Math-17k

if [ ${#missing[@]} -gt 0 ]; then
    echo "not prepared (download them first): ${missing[*]}" >&2
    exit 1
fi
echo "prepared: $(ls "$DATA_DIR")"
