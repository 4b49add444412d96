#!/usr/bin/env bash
# Launch train/pretrain.py with the deepspeed launcher; all arguments are Hydra overrides.
#
#   launch/deepspeed.sh train.max_steps=100                            # this node, one process per GPU
#   NPROC_PER_NODE=3 launch/deepspeed.sh parallel=pp3                  # this node, 3 processes (CPU too)
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node001 launch/deepspeed.sh +experiment=jetmoe_8b_96xh100
#
# With HOSTFILE the launcher starts every host's processes over ssh (pdsh); hosts need passwordless
# ssh and the same checkout path. Environment: HOSTFILE, NPROC_PER_NODE (local runs), MASTER_ADDR,
# MASTER_PORT (29500), PYTHON. The launcher appends --local_rank=N, which pretrain.py removes before
# Hydra parses.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
MASTER_PORT="${MASTER_PORT:-29500}"

args=(--master_port="$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    echo "launch/deepspeed.sh: HOSTFILE=$HOSTFILE does not exist; see launch/hostfile.example" >&2
    exit 2
  fi
  # each entry "host slots=N" (comments and blank lines aside): DeepSpeed would fail with a traceback
  lineno=0
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    entry="${line%%#*}"
    [ -n "${entry//[[:space:]]/}" ] || continue
    if ! [[ "$entry" =~ ^[[:space:]]*[A-Za-z0-9._-]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]]; then
      echo "launch/deepspeed.sh: $HOSTFILE:$lineno: '$line' is not 'HOST slots=N' (N a positive integer); see launch/hostfile.example" >&2
      exit 2
    fi
  done < "$HOSTFILE"
  args+=(--hostfile="$HOSTFILE")
  [ -z "${MASTER_ADDR:-}" ] || args+=(--master_addr="$MASTER_ADDR")
else
  # no hostfile: this node only (an empty path keeps the launcher from reading /job/hostfile)
  args+=(--hostfile=/dev/null --master_addr="${MASTER_ADDR:-127.0.0.1}")
  [ -z "${NPROC_PER_NODE:-}" ] || args+=(--num_gpus="$NPROC_PER_NODE")
fi

exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" "$ROOT/train/pretrain.py" "$@"
