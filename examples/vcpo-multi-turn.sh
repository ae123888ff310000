#!/usr/bin/env bash
# Multi-turn tool use with asynchronous rollouts and VCPO: the VCPO paper's long-context,
# multi-turn setting (arXiv 2602.17616), where it uses rho_base 0.55 instead of 1.0.
#
# The policy solves math problems calling a Python interpreter (Qwen's
# <tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call> format, answered in
# <tool_response>...</tool_response>), up to MAX_TURNS turns and TOTAL_LEN response tokens. From
# the paper: asynchronous rollouts with VCPO's variance control and --ess-rho-base 0.55. The rest
# (model, data, turn and length limits, the SFPO paper's batch and optimizer settings from
# common.sh, VCPO's objective from common.sh's vcpo mode) are this project's choices, not settings
# recorded for the paper's run.
#
#   bash examples/prepare_data.sh                                      # once: the JSONL data
#   HF_DIR=/models/Qwen2.5-7B-Instruct bash examples/vcpo-multi-turn.sh vcpo        # GRPO + VCPO, async
#   HF_DIR=/models/Qwen2.5-7B-Instruct bash examples/vcpo-multi-turn.sh sfpo-vcpo   # SFPO + VCPO, async
#   HF_DIR=/models/Qwen2.5-7B-Instruct bash examples/vcpo-multi-turn.sh sync        # the synchronous control
#
# Two nodes of 8 GPUs (trainer on one, SGLang servers on the other). SBATCH_OPTS, DRY_RUN=1 as in
# common.sh; MAX_STALENESS (default 2), MAX_TURNS (default 4), TOTAL_LEN (default 8192).
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_NAME=qwen2.5-7b-instruct-tools
: "${HF_DIR:=${MODELS_DIR:-$SFPO_ROOT/models}/Qwen2.5-7B-Instruct}"
: "${MAX_TURNS:=4}"
: "${TOTAL_LEN:=8192}"
PROMPT_LEN=2048
RESPONSE_LEN=2048   # per turn; TOTAL_LEN bounds the whole trajectory, tool outputs included
SFPO_ALPHA=0.8     # the SFPO paper's alpha for its Qwen2.5 models
TRAIN_TP=2
ROLLOUT_TP=1
SYSTEM_PROMPT='You can run Python code: write <tool_call>{"name": "python", "arguments": {"code": "..."}}</tool_call> and its output comes back in <tool_response></tool_response>. Put the final answer in \boxed{}.'

mode=${1:-}
shift || true
case "$mode" in
    vcpo) algo=grpo ;;
    sfpo-vcpo | sync) algo=sfpo ;;
    *) echo "usage: bash $0 vcpo|sfpo-vcpo|sync [extra trainer flags]" >&2; exit 2 ;;
esac
eval_sets=()
for s in "${EVAL_SETS[@]}"; do eval_sets+=("$DATA_DIR/$s.jsonl"); done
check_inputs "$DATA_DIR/$TRAIN_SET.jsonl" "${eval_sets[@]}"
set_paper_flags "$algo"
set_eval_flags
TOOL_FLAGS=(--rollout-mode multi-turn --tool python --max-turns "$MAX_TURNS"
    --max-total-response-len "$TOTAL_LEN" --system-prompt "$SYSTEM_PROMPT")
async=()
if [ "$mode" != sync ]; then
    set_async_flags "$([ "$mode" = vcpo ] && echo vcpo || echo sfpo-vcpo)"
    async=("${ASYNC_FLAGS[@]}" --ess-rho-base 0.55)   # later flags win over ASYNC_FLAGS' 1.0
fi
run_dir=$RUNS_DIR/$MODEL_NAME-$mode
rollout_env=(ROLLOUT_TP="$ROLLOUT_TP" ROLLOUT_EXTRA_ARGS="--context-length $((PROMPT_LEN + TOTAL_LEN)) --dtype bfloat16")
job=$(submit HF_DIR="$HF_DIR" RUN_DIR="$run_dir" SAVE_INTERVAL=20 "${rollout_env[@]}" -- \
    -N 2 --job-name "$MODEL_NAME-$mode" "$SFPO_ROOT/slurm/rl_sfpo.sbatch" "${PAPER_FLAGS[@]}" "${async[@]}" \
    "${EVAL_FLAGS[@]}" "${TOOL_FLAGS[@]}" "$@")
echo "submitted $MODEL_NAME $mode training: job $job, run dir $run_dir"
