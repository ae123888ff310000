#!/usr/bin/env bash
# Qwen3-4B-Base: SFPO vs GRPO with the SFPO paper's settings
# (arXiv 2510.04072), evaluated on MATH-500, AIME24, AIME25, AMC, Minerva and OlympiadBench (avg@4).
#
# GPUs: 8 x 80 GB (one node, colocated: the paper's setup). LAYOUT=disaggregated uses 2 nodes of 8
# (trainer on one, SGLang servers on the other). Trainer: TP=2 x DP=4; SGLang servers: TP=1.
# Paper (average of the six test sets): GRPO 43.99, SFPO 45.59.
# Rollouts to reach GRPO's best accuracy: 4.48e4 (GRPO) vs 1.28e4 (SFPO); 13.7 h vs 5.2 h.
#
#   bash examples/prepare_data.sh                     # once: the JSONL data under DATA_DIR
#   HF_DIR=/models/Qwen3-4B-Base bash examples/qwen3-4b-base.sh sfpo   # SFPO (alpha=0.9), then the final evaluation
#   HF_DIR=/models/Qwen3-4B-Base bash examples/qwen3-4b-base.sh grpo   # the GRPO baseline
#   HF_DIR=/models/Qwen3-4B-Base bash examples/qwen3-4b-base.sh eval   # the base model
#
# Add sbatch options with SBATCH_OPTS="-p PARTITION -A ACCOUNT"; DRY_RUN=1 prints the commands.
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_NAME=qwen3-4b-base
: "${HF_DIR:=${MODELS_DIR:-$SFPO_ROOT/models}/Qwen3-4B-Base}"
PROMPT_LEN=2048
RESPONSE_LEN=6144
SFPO_ALPHA=0.9
TRAIN_TP=2
ROLLOUT_TP=1

example_main "$@"
