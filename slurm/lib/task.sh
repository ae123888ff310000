#!/usr/bin/env bash
# One task of a job script's main step (trainer, converter, evaluator): records the task's pid, then
# becomes the command (exec keeps the pid). On preemption the batch script signals these pids only
# (sfpo_signal_main in launcher.sh): `scancel --signal` would hit every process of the step,
# including the trainer's reward workers, which must keep running until the checkpoint is written.
set -euo pipefail
: "${SFPO_PID_DIR:?set by sfpo_run_main}"
mkdir -p "$SFPO_PID_DIR"
echo $$ >"$SFPO_PID_DIR/${SLURMD_NODENAME:?not an srun task}-${SLURM_LOCALID:?}.pid"
exec "$@"
