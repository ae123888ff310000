# shellcheck shell=bash disable=SC2034  # (variables set here are read by the job scripts)
# Shared launcher library of slurm/*.sbatch (sourced, never run). What it does for a job script:
#
#   sfpo_init_job      node list and addresses, MASTER_ADDR/MASTER_PORT and a port block derived from
#                      the job id, per-job log dir, network variables, and the traps (EXIT: stop every
#                      server step; TERM/USR1: forward TERM to the trainer step, then requeue)
#   sfpo_start_rollout NODES...   one srun step of rollout servers (SGLang or the CPU server) on
#                      those nodes; waits until every server answers /health; sets ROLLOUT_URLS
#   sfpo_run_main NAME SRUN_OPTS... -- CMD...   the main srun step (trainer, converter, evaluator)
#                      in the background; waits for it while staying responsive to signals
#   sfpo_finish RC     stops the servers; requeues when the main step was preempted (it exited 143
#                      after checkpointing, or this script was signalled); exits with RC otherwise
#
# Inputs are variables the job scripts set at their top (cluster-specific values live there, not
# here): SFPO_ROOT SFPO_PYTHON RUN_DIR GPUS_PER_NODE CONTAINER_IMAGE CONTAINER_RUNTIME
# CONTAINER_MOUNTS ROLLOUT_* and the NCCL/Gloo network variables.
#
# Preemption contract with the trainer: SIGTERM (or SIGUSR1) makes every rank finish its step, save
# a checkpoint to --save and exit with 143; restarted with the same command it resumes from the
# `latest_checkpointed_iteration.txt` under --save. The batch script delivers it to the rank
# processes themselves (their pids, recorded by slurm/lib/task.sh, killed by a small step on each
# node): srun turns a SIGTERM aimed at itself into SIGKILL for its tasks, and `scancel --signal`
# signals every process of the step, child processes (reward workers) included.

SFPO_PREEMPT_RC=143
SFPO_STEP_PIDS=()      # pids of the background srun commands, in start order
SFPO_STEP_NAMES=()     # their step names (srun -J), to find step ids with squeue
SFPO_MAIN_PID=""
SFPO_MAIN_NAME=""
SFPO_PREEMPTED=0
SFPO_REQUEUED=0

sfpo_log() { echo "[sfpo $(date +%H:%M:%S)] $*"; }
sfpo_die() { echo "[sfpo $(date +%H:%M:%S)] ERROR: $*" >&2; exit 1; }

# --- allocation --------------------------------------------------------------------------------

# Address of a node: Slurm's NodeAddr (`sinfo -o %o`); the node name when Slurm has none.
sfpo_node_addr() {
    local addr
    addr=$(sinfo -h -N -n "$1" -o %o 2>/dev/null | head -n 1 | tr -d '[:space:]')
    if [ -z "$addr" ] || [ "$addr" = "(null)" ]; then addr=$1; fi
    echo "$addr"
}

# "8", "gpu:8", "a100:8" or "gpu:a100:8" -> 8; empty -> empty
sfpo_gpu_count() { local v=${1:-}; echo "${v##*:}"; }

sfpo_init_job() {
    [ -n "${SLURM_JOB_ID:-}" ] || sfpo_die "not inside a Slurm job: submit this script with sbatch"
    : "${RUN_DIR:?RUN_DIR must be set by the job script}"
    mapfile -t SFPO_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    SFPO_NUM_NODES=${#SFPO_NODES[@]}
    [ "$SFPO_NUM_NODES" -ge 1 ] || sfpo_die "empty node list ($SLURM_JOB_NODELIST)"

    # Addresses of all nodes, passed to the steps (containers need no Slurm client for them).
    local n addrs=() distinct
    SFPO_NODE_ADDRS=""
    for n in "${SFPO_NODES[@]}"; do
        addrs+=("$(sfpo_node_addr "$n")")
        SFPO_NODE_ADDRS+="$n=${addrs[-1]} "
    done
    export SFPO_NODE_ADDRS
    # Emulated nodes (several slurmd on one host) share an address: give each node its own ports.
    distinct=$(printf '%s\n' "${addrs[@]}" | sort -u | wc -l)
    if [ "$distinct" -lt "$SFPO_NUM_NODES" ]; then SFPO_SHARED_ADDR=1; else SFPO_SHARED_ADDR=0; fi
    export SFPO_SHARED_ADDR

    # GPUs per node: the script's value, else what was asked (--gpus-per-node), else what Slurm
    # granted (an --exclusive job gets every GPU of its nodes); 0 = CPU-only run.
    if [ -z "${GPUS_PER_NODE:-}" ]; then
        GPUS_PER_NODE=$(sfpo_gpu_count "${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}")
    fi
    [[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || sfpo_die "GPUS_PER_NODE must be a number, got '$GPUS_PER_NODE'"
    : "${TASKS_PER_NODE:=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))}"
    export GPUS_PER_NODE TASKS_PER_NODE

    # Ports: a block of 32 per job id, so two jobs sharing a node do not collide.
    # offset 0 = torch.distributed rendezvous, offsets 1.. = rollout servers.
    : "${PORT_BASE:=$(( 20000 + (SLURM_JOB_ID % 1250) * 32 ))}"
    [[ "$PORT_BASE" =~ ^[0-9]+$ ]] && [ "$PORT_BASE" -ge 1024 ] && [ "$PORT_BASE" -le 65503 ] \
        || sfpo_die "PORT_BASE must be a port number in 1024..65503, got '$PORT_BASE'"
    : "${MASTER_PORT:=$PORT_BASE}"
    # The rendezvous runs on the first node; honour MASTER_ADDR when the caller set one.
    : "${MASTER_ADDR:=${addrs[0]}}"
    export PORT_BASE MASTER_ADDR MASTER_PORT

    SFPO_ATTEMPT=${SLURM_RESTART_COUNT:-0}
    : "${LOG_DIR:=$RUN_DIR/logs/${SLURM_JOB_ID}_${SFPO_ATTEMPT}}"
    mkdir -p "$LOG_DIR"
    export RUN_DIR LOG_DIR

    # Network variables: exported only when set, so NCCL/Gloo keep their own defaults otherwise.
    local v
    for v in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_NET_GDR_LEVEL \
        NCCL_DEBUG NCCL_CROSS_NIC NCCL_ALGO NCCL_PROTO UCX_NET_DEVICES; do
        if [ -n "${!v:-}" ]; then export "${v?}"; else unset "$v"; fi
    done
    export PYTHONPATH="$SFPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    : "${OMP_NUM_THREADS:=1}"
    export OMP_NUM_THREADS

    trap sfpo_cleanup EXIT
    trap 'sfpo_on_signal TERM' TERM
    trap 'sfpo_on_signal USR1' USR1

    sfpo_log "job $SLURM_JOB_ID attempt $SFPO_ATTEMPT on $SFPO_NUM_NODES node(s): ${SFPO_NODES[*]}"
    sfpo_log "addresses: $SFPO_NODE_ADDRS; MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    sfpo_log "GPUs per node: $GPUS_PER_NODE, tasks per node: $TASKS_PER_NODE"
    sfpo_log "run dir: $RUN_DIR; logs: $LOG_DIR"
}

# Comma-separated node list for srun -w.
sfpo_join() { local IFS=,; echo "$*"; }

# --- steps -------------------------------------------------------------------------------------

# Words to put between `srun [opts]` and the command so that it runs in the container.
sfpo_container_opts() {
    SFPO_SRUN_CONTAINER=()
    SFPO_CMD_PREFIX=()
    [ -n "${CONTAINER_IMAGE:-}" ] || return 0
    # The repo and the run dir must be visible at the same paths inside the container.
    local mounts="$SFPO_ROOT:$SFPO_ROOT,$RUN_DIR:$RUN_DIR${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
    case "${CONTAINER_RUNTIME:-pyxis}" in
        pyxis)
            # A named container is imported once per node and reused by every step of the job.
            SFPO_SRUN_CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-name="sfpo-$SLURM_JOB_ID"
                --container-mounts="$mounts" --container-workdir="$SFPO_ROOT" --no-container-mount-home) ;;
        apptainer | singularity)
            SFPO_CMD_PREFIX=("$CONTAINER_RUNTIME" exec --nv --bind "$mounts" --pwd "$SFPO_ROOT"
                "$CONTAINER_IMAGE") ;;
        *) sfpo_die "CONTAINER_RUNTIME must be pyxis, apptainer or singularity, got '$CONTAINER_RUNTIME'" ;;
    esac
}

# sfpo_srun_bg NAME SRUN_OPTS... -- CMD...: start a named step in the background.
sfpo_srun_bg() {
    local name=$1 opts=()
    shift
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
    [ "${1:-}" = "--" ] || sfpo_die "sfpo_srun_bg $name: missing -- before the command"
    shift
    sfpo_container_opts
    sfpo_log "step $name: srun ${opts[*]} ${SFPO_SRUN_CONTAINER[*]} ${SFPO_CMD_PREFIX[*]} $*"
    srun -J "$name" "${opts[@]}" "${SFPO_SRUN_CONTAINER[@]}" "${SFPO_CMD_PREFIX[@]}" "$@" &
    SFPO_STEP_PIDS+=("$!")
    SFPO_STEP_NAMES+=("$name")
    SFPO_LAST_PID=$!
}

# Step ids of this job whose step name is $1 (one per line).
sfpo_step_ids() {
    squeue -h -s -j "$SLURM_JOB_ID" -o '%i|%j' 2>/dev/null | awk -F'|' -v n="$1" '$2 == n {print $1}'
}

# sfpo_signal_step NAME SIGNAL: signal a step's tasks on every node (retries while it registers).
sfpo_signal_step() {
    local ids="" i
    for i in $(seq 20); do
        ids=$(sfpo_step_ids "$1")
        [ -n "$ids" ] && break
        sleep 0.5
    done
    [ -n "$ids" ] || { sfpo_log "no running step named $1 to signal"; return 1; }
    for i in $ids; do
        sfpo_log "sending SIG$2 to step $i ($1)"
        # scancel complains about the job's nodes that do not run this step: not an error.
        scancel --signal="$2" "$i" 2>/dev/null || true
    done
}

# Sleep that a trapped signal interrupts at once (bash runs traps only between commands).
sfpo_sleep() { sleep "$1" & wait $! || true; }

# --- rollout servers ---------------------------------------------------------------------------

# Port of server LOCAL on the NODE_INDEX-th node (same formula as serve_rollout.sh).
sfpo_rollout_port() {
    local node_index=$1 local_id=$2 slot=0
    [ "${SFPO_SHARED_ADDR:-0}" = 1 ] && slot=$node_index
    echo $(( PORT_BASE + 1 + slot * ROLLOUT_SERVERS_PER_NODE + local_id ))
}

sfpo_http_ok() {
    if command -v curl >/dev/null; then
        curl -sf -m 5 -o /dev/null "$1"
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" \
            >/dev/null 2>&1
    fi
}

# sfpo_start_rollout NODE...: servers on those nodes (one per ROLLOUT_TP GPUs, or one per node on
# CPU); returns once all are healthy, with their URLs in ROLLOUT_URLS (array).
sfpo_start_rollout() {
    local nodes=("$@")
    [ ${#nodes[@]} -ge 1 ] || sfpo_die "no rollout nodes"
    : "${ROLLOUT_BACKEND:?}" "${ROLLOUT_MODEL_PATH:?ROLLOUT_MODEL_PATH (HF dir the servers load) is not set}"
    case "$ROLLOUT_BACKEND" in sglang | cpu) ;; *)
        sfpo_die "ROLLOUT_BACKEND must be sglang or cpu, got '$ROLLOUT_BACKEND'" ;;
    esac
    [ -e "$ROLLOUT_MODEL_PATH/config.json" ] \
        || sfpo_die "ROLLOUT_MODEL_PATH=$ROLLOUT_MODEL_PATH has no config.json"
    : "${ROLLOUT_TP:=1}"
    if [ "$ROLLOUT_BACKEND" = cpu ]; then
        : "${ROLLOUT_SERVERS_PER_NODE:=1}"
    else
        [ "$GPUS_PER_NODE" -gt 0 ] || sfpo_die "ROLLOUT_BACKEND=sglang needs GPUs (GPUS_PER_NODE=0)"
        (( GPUS_PER_NODE % ROLLOUT_TP == 0 )) \
            || sfpo_die "ROLLOUT_TP=$ROLLOUT_TP does not divide GPUS_PER_NODE=$GPUS_PER_NODE"
        : "${ROLLOUT_SERVERS_PER_NODE:=$(( GPUS_PER_NODE / ROLLOUT_TP ))}"
    fi
    (( ROLLOUT_SERVERS_PER_NODE >= 1 && ROLLOUT_SERVERS_PER_NODE <= 31 )) \
        || sfpo_die "ROLLOUT_SERVERS_PER_NODE must be 1..31 (port block), got $ROLLOUT_SERVERS_PER_NODE"
    SFPO_ROLLOUT_NODES="${nodes[*]}"
    export ROLLOUT_BACKEND ROLLOUT_MODEL_PATH ROLLOUT_TP ROLLOUT_SERVERS_PER_NODE SFPO_ROLLOUT_NODES
    export ROLLOUT_EXTRA_ARGS="${ROLLOUT_EXTRA_ARGS:-}" ROLLOUT_BIND="${ROLLOUT_BIND:-}"

    ROLLOUT_URLS=()
    local i l host
    for i in "${!nodes[@]}"; do
        host=$(sfpo_node_addr "${nodes[$i]}")
        for (( l = 0; l < ROLLOUT_SERVERS_PER_NODE; l++ )); do
            ROLLOUT_URLS+=("http://$host:$(sfpo_rollout_port "$i" "$l")")
        done
    done
    # --overlap: colocated servers share nodes (and GPUs) with the trainer step.
    sfpo_srun_bg sfpo-rollout --overlap --nodes=${#nodes[@]} --nodelist="$(sfpo_join "${nodes[@]}")" \
        --ntasks-per-node="$ROLLOUT_SERVERS_PER_NODE" --kill-on-bad-exit=0 \
        --output="$LOG_DIR/rollout-%N-%t.log" -- bash "$SFPO_ROOT/slurm/lib/serve_rollout.sh"
    SFPO_ROLLOUT_PID=$SFPO_LAST_PID
    sfpo_log "waiting for ${#ROLLOUT_URLS[@]} rollout server(s): ${ROLLOUT_URLS[*]}"

    local deadline=$(( SECONDS + ${ROLLOUT_HEALTH_TIMEOUT:-1800} )) url pending
    while :; do
        pending=0
        for url in "${ROLLOUT_URLS[@]}"; do sfpo_http_ok "$url/health" || pending=1; done
        [ "$pending" = 0 ] && break
        # Preempted while the servers load: sfpo_run_main then skips the trainer and requeues.
        [ "$SFPO_PREEMPTED" = 1 ] && return 0
        if ! kill -0 "$SFPO_ROLLOUT_PID" 2>/dev/null; then
            tail -n 30 "$LOG_DIR"/rollout-*.log >&2 || true
            sfpo_die "rollout servers exited before becoming healthy (logs: $LOG_DIR/rollout-*.log)"
        fi
        [ "$SECONDS" -lt "$deadline" ] \
            || sfpo_die "rollout servers not healthy after ${ROLLOUT_HEALTH_TIMEOUT:-1800}s (logs: $LOG_DIR)"
        sfpo_sleep 2
    done
    sfpo_log "rollout servers healthy"
}

# --- main step, signals, shutdown --------------------------------------------------------------

# sfpo_run_main NAME SRUN_OPTS... -- CMD...: run the main step and wait; sets SFPO_MAIN_RC.
sfpo_run_main() {
    SFPO_MAIN_NAME=$1
    SFPO_MAIN_RC=0
    if [ "$SFPO_PREEMPTED" = 1 ]; then SFPO_MAIN_RC=$SFPO_PREEMPT_RC; return; fi
    local opts=()
    shift
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    export SFPO_PID_DIR=$LOG_DIR/pids/$SFPO_MAIN_NAME
    rm -rf "$SFPO_PID_DIR"
    sfpo_srun_bg "$SFPO_MAIN_NAME" "${opts[@]}" -- bash "$SFPO_ROOT/slurm/lib/task.sh" "$@"
    SFPO_MAIN_PID=$SFPO_LAST_PID
    while :; do
        while kill -0 "$SFPO_MAIN_PID" 2>/dev/null; do
            if [ -n "${SFPO_ROLLOUT_PID:-}" ] && ! kill -0 "$SFPO_ROLLOUT_PID" 2>/dev/null \
                && [ "$SFPO_PREEMPTED" = 0 ] && [ -z "${SFPO_ROLLOUT_DIED:-}" ]; then
                SFPO_ROLLOUT_DIED=1
                sfpo_log "rollout servers exited while $SFPO_MAIN_NAME runs: stopping it (logs: $LOG_DIR)"
                sfpo_signal_step "$SFPO_MAIN_NAME" KILL || true
            fi
            sfpo_sleep "${SFPO_POLL_SECONDS:-2}"
        done
        SFPO_MAIN_RC=0
        wait "$SFPO_MAIN_PID" || SFPO_MAIN_RC=$?
        # A signal can interrupt `wait` itself: only a reaped srun ends the loop.
        kill -0 "$SFPO_MAIN_PID" 2>/dev/null || break
    done
    SFPO_MAIN_PID=""
    sfpo_log "step $SFPO_MAIN_NAME exited with code $SFPO_MAIN_RC"
    if [ -n "${SFPO_ROLLOUT_DIED:-}" ] && [ "$SFPO_MAIN_RC" = 0 ]; then SFPO_MAIN_RC=1; fi
}

sfpo_on_signal() {
    # After our own `scontrol requeue`, Slurm signals this script too: nothing more to do.
    [ "$SFPO_REQUEUED" = 1 ] && return
    if [ "$SFPO_PREEMPTED" = 0 ]; then
        sfpo_log "received SIG$1: asking ${SFPO_MAIN_NAME:-the main step} to checkpoint and stop"
    fi
    SFPO_PREEMPTED=1
    if [ -n "$SFPO_MAIN_PID" ] && kill -0 "$SFPO_MAIN_PID" 2>/dev/null; then
        sfpo_signal_main TERM || sfpo_signal_step "$SFPO_MAIN_NAME" TERM || true
    fi
}

# sfpo_signal_main SIGNAL: signal the main step's task processes (not their children) on every node.
sfpo_signal_main() {
    sfpo_log "sending SIG$1 to the tasks of $SFPO_MAIN_NAME (pids in $SFPO_PID_DIR)"
    # shellcheck disable=SC2016  # expanded by the step's shell on each node
    srun --overlap -J sfpo-signal --nodes="$SFPO_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 \
        bash -c 'for f in "$0/$SLURMD_NODENAME"-*.pid; do [ -f "$f" ] && kill -"$1" "$(cat "$f")"; done; true' \
        "$SFPO_PID_DIR" "$1"
}

# Stop every step still running: SIGTERM, then SIGKILL after SFPO_STOP_GRACE seconds.
sfpo_stop_steps() {
    local i pid alive=() deadline
    for i in "${!SFPO_STEP_PIDS[@]}"; do
        pid=${SFPO_STEP_PIDS[$i]}
        if kill -0 "$pid" 2>/dev/null; then
            alive+=("$i")
            sfpo_signal_step "${SFPO_STEP_NAMES[$i]}" TERM || true
        fi
    done
    [ ${#alive[@]} -gt 0 ] || return 0
    deadline=$(( SECONDS + ${SFPO_STOP_GRACE:-30} ))
    for i in "${alive[@]}"; do
        pid=${SFPO_STEP_PIDS[$i]}
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            sfpo_signal_step "${SFPO_STEP_NAMES[$i]}" KILL || true
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    sfpo_log "stopped steps: $(for i in "${alive[@]}"; do printf '%s ' "${SFPO_STEP_NAMES[$i]}"; done)"
}

sfpo_cleanup() {
    local rc=$?
    trap - EXIT
    sfpo_stop_steps
    exit "$rc"
}

# Iteration named by a checkpoint tracker ("" when there is none).
sfpo_tracker() { cat "$1/latest_checkpointed_iteration.txt" 2>/dev/null || true; }

# Was the main step preempted? Yes when this script was signalled and the step did not finish, or
# when the step exited 143 after saving a checkpoint during this attempt (a TERM sent to the steps
# only, e.g. `scancel --signal=TERM JOB`). A 143 without a new checkpoint is a crash: srun's
# --kill-on-bad-exit terminates the other ranks with SIGTERM too.
sfpo_was_preempted() {
    local rc=$1
    [ "$rc" = 0 ] && return 1
    [ "$SFPO_PREEMPTED" = 1 ] && return 0
    [ "$rc" = "$SFPO_PREEMPT_RC" ] && [ -n "${SFPO_CKPT_DIR:-}" ] \
        && [ "$(sfpo_tracker "$SFPO_CKPT_DIR")" != "${SFPO_TRACKER_AT_START:-}" ]
}

# sfpo_finish RC: requeue a preempted job (its checkpoint is in place), else exit with RC.
sfpo_finish() {
    local rc=$1
    sfpo_stop_steps
    if sfpo_was_preempted "$rc"; then
        if [ "$SFPO_ATTEMPT" -ge "${MAX_REQUEUES:-20}" ]; then
            sfpo_die "preempted, but already requeued $SFPO_ATTEMPT times (MAX_REQUEUES=${MAX_REQUEUES:-20})"
        fi
        sfpo_log "preempted (exit code $rc): requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
        SFPO_REQUEUED=1
        scontrol requeue "$SLURM_JOB_ID" || sfpo_die "scontrol requeue $SLURM_JOB_ID failed"
        exit 0
    fi
    if [ "$rc" != 0 ]; then
        sfpo_log "failed with exit code $rc; logs in $LOG_DIR"
        local f
        for f in "$LOG_DIR"/*-0.log; do
            [ -f "$f" ] && { echo "--- last lines of $f"; tail -n 40 "$f"; }
        done
    fi
    exit "$rc"
}

# sfpo_checkpoints SAVE: note where this run checkpoints and what an earlier attempt left there.
sfpo_checkpoints() {
    SFPO_CKPT_DIR=$1
    SFPO_TRACKER_AT_START=$(sfpo_tracker "$1")
    if [ -n "$SFPO_TRACKER_AT_START" ]; then
        sfpo_log "resuming from $1 (iteration $SFPO_TRACKER_AT_START)"
    fi
}

# sfpo_load_flags SAVE [INIT] (pretraining): SFPO_LOAD_FLAGS resume
# from SAVE when an earlier attempt checkpointed there, else load INIT's weights only.
sfpo_load_flags() {
    local save=$1 init=${2:-}
    sfpo_checkpoints "$save"
    if [ -n "$SFPO_TRACKER_AT_START" ]; then
        SFPO_LOAD_FLAGS=(--load "$save")
    elif [ -n "$init" ]; then
        [ -e "$init" ] || sfpo_die "initial checkpoint $init does not exist"
        SFPO_LOAD_FLAGS=(--load "$init" --finetune)
    else
        SFPO_LOAD_FLAGS=()
    fi
}
