#!/usr/bin/env bash
# DeepSeek-R1-Distill-Qwen-1.5B: SFPO vs GRPO with the SFPO paper's settings
# (arXiv 2510.04072), evaluated on MATH-500, AIME24, AIME25, AMC, Minerva and OlympiadBench (avg@4).
#
# GPUs: 8 x 80 GB (one node, colocated: the paper's setup). LAYOUT=disaggregated uses 2 nodes of 8
# (trainer on one, SGLang servers on the other). Trainer: TP=1 x DP=8; SGLang servers: TP=1.
# Paper (average of the six test sets): GRPO 47.73, SFPO 50.53.
# Rollouts to reach GRPO's best accuracy: 4.93e4 (GRPO) vs 1.54e4 (SFPO); 32.8 h vs 12.5 h.
#
#   bash examples/prepare_data.sh                     # once: the JSONL data under DATA_DIR
#   HF_DIR=/models/DeepSeek-R1-Distill-Qwen-1.5B bash examples/deepseek-r1-distill-qwen-1.5b.sh sfpo   # SFPO (alpha=0.8), then the final evaluation
#   HF_DIR=/models/DeepSeek-R1-Distill-Qwen-1.5B bash examples/deepseek-r1-distill-qwen-1.5b.sh grpo   # the GRPO baseline
#   HF_DIR=/models/DeepSeek-R1-Distill-Qwen-1.5B bash examples/deepseek-r1-distill-qwen-1.5b.sh eval   # the base model
#
# Add sbatch options with SBATCH_OPTS="-p PARTITION -A ACCOUNT"; DRY_RUN=1 prints the commands.
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_NAME=deepseek-r1-distill-qwen-1.5b
: "${HF_DIR:=${MODELS_DIR:-$SFPO_ROOT/models}/DeepSeek-R1-Distill-Qwen-1.5B}"
PROMPT_LEN=2048
RESPONSE_LEN=6144
SFPO_ALPHA=0.8
TRAIN_TP=1
ROLLOUT_TP=1

example_main "$@"
