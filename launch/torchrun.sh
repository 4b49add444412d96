#!/usr/bin/env bash
# Launch train/pretrain.py with torchrun on this node; all arguments are Hydra overrides.
#
#   launch/torchrun.sh train.max_steps=100                          # one node, one process per GPU (else 1)
#   NPROC_PER_NODE=3 launch/torchrun.sh parallel=pp3                # 3 processes (e.g. CPU, gloo)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/torchrun.sh ...   # on node1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 launch/torchrun.sh ...   # on node2
#
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), NPROC_PER_NODE
# (GPUs on this node, else 1), RDZV_ID (rendezvous id shared by all nodes; default from the port),
# PYTHON (.venv/bin/python if present). Multi-node jobs meet through c10d rendezvous at
# MASTER_ADDR:MASTER_PORT, hosted by NODE_RANK 0; one node without MASTER_PORT runs standalone on a
# free port. SIGUSR1, SIGTERM and SIGINT are passed on to the training processes (they write a
# checkpoint and stop); the script then exits 0 and prints the command that resumes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

[ -z "${MASTER_PORT:-}" ] || MASTER_PORT_SET=1
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(gpu_count)"
  [ "$NPROC_PER_NODE" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=1
fi
RDZV_ID="${RDZV_ID:-jetmoe-$MASTER_PORT}"

for v in NNODES NODE_RANK MASTER_PORT NPROC_PER_NODE; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
    echo "launch/torchrun.sh: $v='${!v}' is not a number; set it to an integer" >&2
    exit 2
  fi
done
if [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "launch/torchrun.sh: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2
  exit 2
fi

if [ "$NODE_RANK" = 0 ]; then IS_HOST=1; else IS_HOST=0; fi
if [ "$NNODES" = 1 ] && [ -z "${MASTER_PORT_SET:-}" ]; then
  args=(--standalone --nproc-per-node="$NPROC_PER_NODE")  # one node, any free port
else
  args=(
    --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --node-rank="$NODE_RANK"
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID"
    --rdzv-conf="is_host=$IS_HOST"
  )
fi
args+=(--max-restarts=0)

# Stop signals go to the training processes only: each finishes its step, checkpoints and exits 0.
# torchrun runs in a session of its own (setsid), so a terminal's Ctrl-C reaches this shell alone, and
# with SIGUSR1 ignored (its default action would kill it); torchrun itself would turn SIGINT/SIGTERM into
# a SignalException traceback and exit 1. A second Ctrl-C is passed on too: the processes exit at once.
# Rank 0 reports a clean stop in JETMOE_STOP_FILE; this script then exits 0 with the resume command.
JETMOE_STOP_FILE="$(mktemp "${TMPDIR:-/tmp}/jetmoe-stop.XXXXXX")"
export JETMOE_STOP_FILE
trap 'rm -f "$JETMOE_STOP_FILE"' EXIT
SETSID=(); if command -v setsid >/dev/null 2>&1; then SETSID=(setsid); fi
( trap '' USR1; exec "${SETSID[@]}" "$PYTHON" -m torch.distributed.run "${args[@]}" "$ROOT/train/pretrain.py" "$@" ) &
agent=$!
# A signal is delivered once every training process of this node catches it (its SigCgt mask in /proc): one
# that came before the workers existed, or before their entry script set its handlers, is held, not lost.
pending=""
catches() {  # catches PID SIGNAL: the process has a handler for the signal
  local mask num
  mask="$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null)" || return 1
  num="$(kill -l "$2")"
  [ -n "$mask" ] && (( (16#$mask >> (num - 1)) & 1 ))
}
deliver() {
  [ -n "$pending" ] || return 0
  local pids pid
  pids="$(pgrep -P "$agent" 2>/dev/null || true)"
  [ "$(echo $pids | wc -w)" -ge "$NPROC_PER_NODE" ] || return 0
  for pid in $pids; do catches "$pid" "$pending" || return 0; done
  kill "-$pending" $pids 2>/dev/null || true
  pending=""
}
forward() {
  echo "[torchrun.sh] SIG$1: asking the training processes on $(hostname -s) to checkpoint and stop" >&2
  pending="$1"
  deliver
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM HUP
trap 'forward INT' INT

rc=0
while true; do
  if [ -n "$pending" ] && kill -0 "$agent" 2>/dev/null; then
    sleep 0.2
    deliver
    continue
  fi
  wait "$agent" && rc=0 || rc=$?
  kill -0 "$agent" 2>/dev/null || break  # wait was only interrupted by a trapped signal
done
if [ -s "$JETMOE_STOP_FILE" ] \
   && "$PYTHON" "$ROOT/launch/stopped.py" "$JETMOE_STOP_FILE" "${JETMOE_LAUNCHER:-launch/torchrun.sh}" "$@"; then
  exit 0
fi
exit "$rc"
