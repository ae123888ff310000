#!/usr/bin/env bash
# Qwen2.5-Math-1.5B: SFPO vs GRPO with the SFPO paper's settings
# (arXiv 2510.04072), evaluated on MATH-500, AIME24, AIME25, AMC, Minerva and OlympiadBench (avg@4).
#
# GPUs: 8 x 80 GB (one node, colocated: the paper's setup). LAYOUT=disaggregated uses 2 nodes of 8
# (trainer on one, SGLang servers on the other). Trainer: TP=1 x DP=8; SGLang servers: TP=1.
# Paper (average of the six test sets): GRPO 38.35, SFPO 40.19.
#
#   bash examples/prepare_data.sh                     # once: the JSONL data under DATA_DIR
#   HF_DIR=/models/Qwen2.5-Math-1.5B bash examples/qwen2.5-math-1.5b.sh sfpo   # SFPO (alpha=0.8), then the final evaluation
#   HF_DIR=/models/Qwen2.5-Math-1.5B bash examples/qwen2.5-math-1.5b.sh grpo   # the GRPO baseline
#   HF_DIR=/models/Qwen2.5-Math-1.5B bash examples/qwen2.5-math-1.5b.sh eval   # the base model
#
# Add sbatch options with SBATCH_OPTS="-p PARTITION -A ACCOUNT"; DRY_RUN=1 prints the commands.
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_NAME=qwen2.5-math-1.5b
: "${HF_DIR:=${MODELS_DIR:-$SFPO_ROOT/models}/Qwen2.5-Math-1.5B}"
PROMPT_LEN=1536
RESPONSE_LEN=2560
SFPO_ALPHA=0.8
TRAIN_TP=1
ROLLOUT_TP=1

example_main "$@"
