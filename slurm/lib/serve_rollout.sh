#!/usr/bin/env bash
# One rollout server per srun task; started by sfpo_start_rollout in slurm/lib/launcher.sh, which
# exports everything read here. Server LOCAL on a node uses GPUs LOCAL*ROLLOUT_TP.. (SGLang's
# --base-gpu-id) and the port PORT_BASE + 1 + LOCAL (plus a per-node offset when emulated nodes
# share one address), and binds the node's address (ROLLOUT_BIND overrides, e.g. 0.0.0.0).
# The server process replaces this shell (exec), so step signals reach it directly. SGLang runs
# with ROLLOUT_PYTHON when set (the Docker image keeps SGLang in its own virtualenv).
set -euo pipefail

node=${SLURMD_NODENAME:?not an srun task}
local_id=${SLURM_LOCALID:?not an srun task}
: "${PORT_BASE:?}" "${ROLLOUT_SERVERS_PER_NODE:?}" "${ROLLOUT_BACKEND:?}" "${ROLLOUT_MODEL_PATH:?}"
: "${SFPO_PYTHON:=python3}" "${ROLLOUT_TP:=1}"

# Index of this node among the rollout nodes, and its address (from the batch script).
node_index=-1
i=0
for n in ${SFPO_ROLLOUT_NODES:?}; do
    if [ "$n" = "$node" ]; then node_index=$i; fi
    i=$((i + 1))
done
[ "$node_index" -ge 0 ] || { echo "node $node is not in SFPO_ROLLOUT_NODES=$SFPO_ROLLOUT_NODES" >&2; exit 1; }
addr=$node
for pair in ${SFPO_NODE_ADDRS:-}; do
    if [ "${pair%%=*}" = "$node" ]; then addr=${pair#*=}; fi
done

slot=0
if [ "${SFPO_SHARED_ADDR:-0}" = 1 ]; then slot=$node_index; fi
port=$((PORT_BASE + 1 + slot * ROLLOUT_SERVERS_PER_NODE + local_id))
bind=${ROLLOUT_BIND:-$addr}
read -r -a extra <<<"${ROLLOUT_EXTRA_ARGS:-}"

echo "[serve_rollout] $ROLLOUT_BACKEND server $local_id on $node ($bind:$port), model $ROLLOUT_MODEL_PATH"
case "$ROLLOUT_BACKEND" in
    cpu)
        exec "$SFPO_PYTHON" -m sfpo_megatron.cpu_server.server --model-path "$ROLLOUT_MODEL_PATH" \
            --host "$bind" --port "$port" "${extra[@]}" ;;
    sglang)
        mem=()
        if [ -n "${ROLLOUT_MEM_FRACTION:-}" ]; then mem=(--mem-fraction-static "$ROLLOUT_MEM_FRACTION"); fi
        # ROLLOUT_PYTHON: SGLang may live in its own environment (it pins its own torch).
        exec "${ROLLOUT_PYTHON:-$SFPO_PYTHON}" -m sglang.launch_server --model-path "$ROLLOUT_MODEL_PATH" \
            --host "$bind" --port "$port" --tp-size "$ROLLOUT_TP" \
            --base-gpu-id $((local_id * ROLLOUT_TP)) "${mem[@]}" "${extra[@]}" ;;
    *)
        echo "ROLLOUT_BACKEND must be sglang or cpu, got '$ROLLOUT_BACKEND'" >&2
        exit 1 ;;
esac
