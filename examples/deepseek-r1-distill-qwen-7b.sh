#!/usr/bin/env bash
# DeepSeek-R1-Distill-Qwen-7B: SFPO vs GRPO with the SFPO paper's settings
# (arXiv 2510.04072), evaluated on MATH-500, AIME24, AIME25, AMC, Minerva and OlympiadBench (avg@4).
#
# GPUs: 8 x 80 GB (one node, colocated: the paper's setup). LAYOUT=disaggregated uses 2 nodes of 8
# (trainer on one, SGLang servers on the other). Trainer: TP=4 x DP=2; SGLang servers: TP=2.
# Paper (average of the six test sets): GRPO 60.47, SFPO 63.04.
# Rollouts to reach GRPO's best accuracy: 4.74e4 (GRPO) vs 0.96e4 (SFPO); 45.3 h vs 10.8 h.
#
#   bash examples/prepare_data.sh                     # once: the JSONL data under DATA_DIR
#   HF_DIR=/models/DeepSeek-R1-Distill-Qwen-7B bash examples/deepseek-r1-distill-qwen-7b.sh sfpo   # SFPO (alpha=0.8), then the final evaluation
#   HF_DIR=/models/DeepSeek-R1-Distill-Qwen-7B bash examples/deepseek-r1-distill-qwen-7b.sh grpo   # the GRPO baseline
#   HF_DIR=/models/DeepSeek-R1-Distill-Qwen-7B bash examples/deepseek-r1-distill-qwen-7b.sh eval   # the base model
#
# Add sbatch options with SBATCH_OPTS="-p PARTITION -A ACCOUNT"; DRY_RUN=1 prints the commands.
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_NAME=deepseek-r1-distill-qwen-7b
: "${HF_DIR:=${MODELS_DIR:-$SFPO_ROOT/models}/DeepSeek-R1-Distill-Qwen-7B}"
PROMPT_LEN=2048
RESPONSE_LEN=6144
SFPO_ALPHA=0.8
TRAIN_TP=4
ROLLOUT_TP=2

example_main "$@"
