#!/usr/bin/env bash
# Stops what .ci/slurm_up.sh started (idempotent): both slurmd, slurmctld, and munged if it was
# started by slurm_up.sh. Logs and state stay in $SFPO_SLURM_DIR for inspection.
set -euo pipefail

DIR=${SFPO_SLURM_DIR:-/tmp/sfpo-slurm}

stop_pidfile() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# slurmd first: each stops the job steps it runs; then the controller.
stop_pidfile "$DIR/slurmd-n1.pid" &
stop_pidfile "$DIR/slurmd-n2.pid" &
wait
stop_pidfile "$DIR/slurmctld.pid"

if [ -f "$DIR/munged.started-by-us" ]; then
    if [ -f /run/munge/munged.pid ]; then
        stop_pidfile /run/munge/munged.pid
    fi
    rm -f "$DIR/munged.started-by-us"
fi
echo "[slurm_down] stopped (logs in $DIR/log)" >&2
