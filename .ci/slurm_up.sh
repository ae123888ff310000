#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the tests of slurm/*.sbatch.
#
#   bash .ci/slurm_up.sh        # idempotent: installs, starts, waits until n1 and n2 are idle
#   export SLURM_CONF=/tmp/sfpo-slurm/slurm.conf   # (the last line printed) for sinfo/sbatch/...
#   bash .ci/slurm_down.sh
#
# Debian's slurmctld/slurmd/slurm-client/munge are installed with apt-get when missing (needs root).
# munged runs as user munge; slurmctld and two slurmd (`slurmd -N n1`, `-N n2`) emulate nodes n1
# and n2 on localhost (NodeHostname = this host, NodeAddr 127.0.0.1, one slurmd port each). Every
# file (config, state, spool, logs, pid files) lives in $SFPO_SLURM_DIR, nothing in /etc/slurm.
# Each node advertises two fake GPUs (gres backed by plain files) so the scripts' GPU directives
# are accepted; jobs see SLURM_GPUS_ON_NODE but no CUDA device.
set -euo pipefail

DIR=${SFPO_SLURM_DIR:-/tmp/sfpo-slurm}
CTLD_PORT=${SFPO_SLURM_CTLD_PORT:-16817}
SLURMD_PORTS=${SFPO_SLURMD_PORTS:-17001,17002}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

say() { echo "[slurm_up] $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@";
    else say "need root for: $*"; exit 1; fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=0 tool
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing=1
    done
    [ "$missing" -eq 0 ] && return
    say "installing slurmctld slurmd slurm-client munge with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        as_root runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    as_root mkdir -p /run/munge
    as_root chown munge:munge /run/munge
    as_root runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged.started-by-us"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    say "munged did not come up"; exit 1
}

write_config() {
    local host hw
    host=$(hostname -s)
    # Node hardware as slurmd sees it ("CPUs=2 Boards=1 ... RealMemory=N"), minus the node name.
    hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool"
    : >"$DIR/gpu0"
    : >"$DIR/gpu1"
    cat >"$CONF.tmp" <<EOF
# Written by .ci/slurm_up.sh: two emulated nodes on $(hostname -s).
ClusterName=sfpo
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=30
GresTypes=gpu
NodeName=n[1-2] NodeHostname=${host} NodeAddr=127.0.0.1 Port=${SLURMD_PORTS} ${hw} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    # Both emulated nodes share this file; plain files stand in for /dev/nvidia*.
    echo "Name=gpu File=$DIR/gpu[0-1]" >"$DIR/gres.conf"
    mv "$CONF.tmp" "$CONF"
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 1
    [ "$(echo "$states" | grep -c -E '^n[12] idle$')" -eq 2 ]
}

main() {
    mkdir -p "$DIR"
    install_packages
    start_munge
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd-n1.pid" && alive "$DIR/slurmd-n2.pid" \
        && [ -f "$CONF" ] && scontrol ping >/dev/null 2>&1; then
        say "already running ($CONF)"
    else
        if ! alive "$DIR/slurmctld.pid"; then
            write_config
            # -i: ignore state from an earlier run (job ids restart at 1).
            slurmctld -i
        fi
        for n in n1 n2; do
            alive "$DIR/slurmd-$n.pid" || slurmd -N "$n"
        done
    fi
    for _ in $(seq 300); do
        if nodes_idle; then
            echo "SLURM_CONF=$CONF"
            return
        fi
        sleep 0.2
    done
    say "nodes did not become idle:"
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

main "$@"
