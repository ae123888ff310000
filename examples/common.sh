# shellcheck shell=bash
# Shared by the per-model example scripts (sourced): the SFPO paper's settings (arXiv 2510.04072,
# reference scripts) and the submission of RL training + final evaluation to Slurm.
#
# Each model script sets MODEL_NAME, HF_DIR, RESPONSE_LEN, PROMPT_LEN, SFPO_ALPHA, the trainer
# layout (TRAIN_TP) and ROLLOUT_TP, then calls `example_main "$@"`:
#
#   bash examples/<model>.sh sfpo [extra trainer flags]   # SFPO run, then evaluation of its checkpoint
#   bash examples/<model>.sh grpo [extra trainer flags]   # the GRPO baseline (same settings, no SFPO)
#   bash examples/<model>.sh eval [extra eval flags]      # the base model on the six test sets
#   bash examples/<model>.sh vcpo [extra trainer flags]   # GRPO with asynchronous rollouts + VCPO
#   bash examples/<model>.sh sfpo-vcpo [...]              # SFPO with asynchronous rollouts + VCPO
#
# The two asynchronous modes need their own rollout GPUs (LAYOUT=disaggregated is forced) and use
# MAX_STALENESS (default 2) and VCPO's objective (arXiv 2602.17616): sequence-level truncated IS
# (threshold 8), sqrt ESS learning-rate scaling, no entropy bonus, seq-mean-token-mean, weight decay
# 0.1. `vcpo` runs it as VCPO's reference does: no PPO clip and one optimizer step per rollout
# batch. `sfpo-vcpo` keeps the PPO clip (0.2): SFPO's K+1 passes of several mini-batch steps each
# would otherwise have no trust region (`rl` refuses --no-ppo-clip with more than one optimizer
# step per rollout batch unless --allow-unclipped-multi-step).
#
# Environment: DATA_DIR (prepared JSONL, see examples/prepare_data.sh), RUNS_DIR, LAYOUT
# (colocated: the paper's one node of 8 GPUs; disaggregated: 1 trainer node + 1 rollout node),
# SBATCH_OPTS (e.g. "-p gpu -A myproj"), DRY_RUN=1 (print the sbatch commands, submit nothing).
# Cluster values (container image, NCCL interfaces, ...) are the variables at the top of slurm/*.sbatch.

EXAMPLES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SFPO_ROOT=$(cd "$EXAMPLES_DIR/.." && pwd)
: "${DATA_DIR:=$SFPO_ROOT/data/math}"
: "${RUNS_DIR:=$SFPO_ROOT/runs}"
: "${LAYOUT:=colocated}"
: "${SBATCH_OPTS:=}"
: "${DRY_RUN:=0}"
: "${TRAIN_SET:=math_train}"   # MATH train split (the reference's); or dapo_math_17k

# The six test sets of the paper, evaluated avg@4 at temperature 1.0, top_p 0.7.
EVAL_SETS=(math500 aime24 aime25 amc minerva olympiadbench)

# EVAL_FLAGS: the six test sets, avg@4 at temperature 1.0, top_p 0.7 (the reference's validation),
# scored by the reference's scorer (math-reference: last \boxed{} only, 0.1 for a boxed wrong
# answer in training, < 0.95 counts 0 in evaluation) in training and evaluation alike.
set_eval_flags() {
    local name
    EVAL_FLAGS=(--eval-prompt-data)
    for name in "${EVAL_SETS[@]}"; do EVAL_FLAGS+=("$name=$DATA_DIR/$name.jsonl"); done
    EVAL_FLAGS+=(--n-samples-per-eval-prompt 4 --eval-temperature 1.0 --eval-top-p 0.7
        --eval-max-response-len "$RESPONSE_LEN" --reward-fn math-reference)
}

# PAPER_FLAGS for ALGO (sfpo | grpo). Both: AdamW LR 1e-6 constant, weight decay 0.01, grad clip
# 1.0, 256 prompts x 8 samples per step, PPO mini-batch 64 prompts (4 optimizer steps per pass),
# clip 0.2, entropy coefficient 0.001, no KL, temperature 1.0, 400 steps, validation every 5 steps.
# SFPO adds K=3 fast passes, the reposition alpha and the entropy z-score switch-off (window 30,
# threshold 1.0).
set_paper_flags() {
    local algo=$1
    PAPER_FLAGS=(
        --algorithm "$algo"
        --num-rollouts 400 --rollout-batch-size 256 --n-samples-per-prompt 8 --num-steps-per-rollout 4
        --rollout-max-response-len "$RESPONSE_LEN" --rollout-temperature 1.0 --rollout-top-p 1.0
        --lr 1e-6 --lr-decay-style constant --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.999
        --clip-grad 1.0 --eps-clip 0.2 --entropy-coef 0.001 --kl-coef 0.0 --loss-agg-mode token-mean
        --prompt-data "$DATA_DIR/$TRAIN_SET.jsonl"
        --micro-batch-size 1 --bf16
        --use-distributed-optimizer --recompute-activations --tensor-model-parallel-size "$TRAIN_TP"
        --eval-interval 5
    )
    if [ "$algo" = sfpo ]; then
        PAPER_FLAGS+=(--sfpo-inner-steps 3 --sfpo-alpha "$SFPO_ALPHA" --sfpo-zscore-window 30
            --sfpo-zscore-threshold 1.0)
    fi
}

# submit NAME ENV_ASSIGNMENTS... -- SBATCH_ARGS...: prints the job id (DRYRUN<n> in a dry run).
DRY_COUNT=0
submit() {
    local envs=() args=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    args=("$@")
    local opts=()
    read -r -a opts <<<"$SBATCH_OPTS"
    if [ "$DRY_RUN" = 1 ]; then
        DRY_COUNT=$((DRY_COUNT + 1))
        printf 'DRY RUN:' >&2
        printf ' %q' env "${envs[@]}" sbatch --parsable "${opts[@]}" "${args[@]}" >&2
        printf '\n' >&2
        echo "DRYRUN$DRY_COUNT"
    else
        env "${envs[@]}" sbatch --parsable "${opts[@]}" "${args[@]}" | cut -d';' -f1
    fi
}

check_inputs() {
    local f missing=0
    [ -f "$HF_DIR/config.json" ] || { echo "HF_DIR=$HF_DIR has no config.json (download $MODEL_NAME there)" >&2; missing=1; }
    for f in "$@"; do
        [ -f "$f" ] || { echo "missing $f: run examples/prepare_data.sh" >&2; missing=1; }
    done
    if [ "$missing" = 1 ] && [ "$DRY_RUN" != 1 ]; then exit 1; fi
}

# ASYNC_FLAGS for MODE (vcpo | sfpo-vcpo): asynchronous rollouts with VCPO's settings (on top of
# PAPER_FLAGS; later flags win).
set_async_flags() {
    local mode=$1
    ASYNC_FLAGS=(--async-rollout --max-staleness "${MAX_STALENESS:-2}" --vcpo --tis-threshold 8
        --ess-lr-scaling sqrt --ess-rho-base 1.0 --entropy-coef 0.0
        --loss-agg-mode seq-mean-token-mean --weight-decay 0.1)
    if [ "$mode" = vcpo ]; then
        # VCPO's reference: no PPO clip, one optimizer step per rollout batch (the whole batch is
        # the mini-batch). VCPO's samples per prompt and mini-batch size are not among the
        # settings recorded for its reference, so they are not set here: the batch stays the SFPO
        # paper's 256 prompts x 8 samples.
        ASYNC_FLAGS+=(--no-ppo-clip --num-steps-per-rollout 1)
    fi
}

example_main() {
    local mode=${1:-}
    shift || true
    local algo=$mode async=()
    if [ "$mode" = vcpo ] || [ "$mode" = sfpo-vcpo ]; then
        LAYOUT=disaggregated  # generation overlaps training: the servers need their own GPUs
        algo=$([ "$mode" = vcpo ] && echo grpo || echo sfpo)
        set_async_flags "$mode"
        async=("${ASYNC_FLAGS[@]}")
    fi
    local run_dir script nodes job s rollout_env=() eval_sets=()
    for s in "${EVAL_SETS[@]}"; do eval_sets+=("$DATA_DIR/$s.jsonl"); done
    # SGLang on the servers: bf16 and a context that fits prompt + response.
    rollout_env=(ROLLOUT_TP="$ROLLOUT_TP" ROLLOUT_EXTRA_ARGS="--context-length $((PROMPT_LEN + RESPONSE_LEN)) --dtype bfloat16")
    case "$LAYOUT" in
        colocated) script=$SFPO_ROOT/slurm/rl_sfpo_colocated.sbatch; nodes=1 ;;
        disaggregated) script=$SFPO_ROOT/slurm/rl_sfpo.sbatch; nodes=2 ;;
        *) echo "LAYOUT must be colocated or disaggregated, got '$LAYOUT'" >&2; exit 2 ;;
    esac
    case "$mode" in
        sfpo | grpo | vcpo | sfpo-vcpo)
            check_inputs "$DATA_DIR/$TRAIN_SET.jsonl" "${eval_sets[@]}"
            run_dir=$RUNS_DIR/$MODEL_NAME-$mode
            set_paper_flags "$algo"
            set_eval_flags
            job=$(submit HF_DIR="$HF_DIR" RUN_DIR="$run_dir" SAVE_INTERVAL=20 "${rollout_env[@]}" -- \
                -N "$nodes" --job-name "$MODEL_NAME-$mode" "$script" "${PAPER_FLAGS[@]}" "${async[@]}" \
                "${EVAL_FLAGS[@]}" "$@")
            echo "submitted $MODEL_NAME $mode training: job $job, run dir $run_dir"
            job=$(submit HF_DIR="$HF_DIR" CKPT="$run_dir/checkpoints" RUN_DIR="$run_dir/eval_final" \
                EVAL_TASKS="$TRAIN_TP" "${rollout_env[@]}" -- \
                -N 1 --job-name "$MODEL_NAME-$mode-eval" --dependency=afterok:"$job" \
                "$SFPO_ROOT/slurm/eval.sbatch" "${EVAL_FLAGS[@]}" --tensor-model-parallel-size "$TRAIN_TP" --bf16)
            echo "submitted its final evaluation: job $job (starts when training has succeeded)"
            ;;
        eval)
            check_inputs "${eval_sets[@]}"
            run_dir=$RUNS_DIR/$MODEL_NAME-base-eval
            set_eval_flags
            job=$(submit HF_DIR="$HF_DIR" RUN_DIR="$run_dir" EVAL_TASKS="$TRAIN_TP" "${rollout_env[@]}" -- \
                -N 1 --job-name "$MODEL_NAME-base-eval" "$SFPO_ROOT/slurm/eval.sbatch" "${EVAL_FLAGS[@]}" \
                --tensor-model-parallel-size "$TRAIN_TP" --bf16 "$@")
            echo "submitted $MODEL_NAME base-model evaluation: job $job, results in $run_dir"
            ;;
        *)
            echo "usage: bash $0 sfpo|grpo|vcpo|sfpo-vcpo|eval [extra flags]" >&2
            exit 2 ;;
    esac
}
