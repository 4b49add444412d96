#!/usr/bin/env bash
# The wheelhouse the GPU check (bench/gpu.py) installs from on a machine with torch but no package registry.
#
#   bench/gpu_wheels.sh                         # .whl/: what the GPU machine's image lacks, for CPython 3.12
#   bench/gpu_wheels.sh --python-version 3.11 --bare-venv --out /tmp/wh   # everything but torch, for a bare venv
#
# What goes in: bench/wheels/device.txt (the image lacks these), plus bench/wheels/image.txt with --bare-venv
# (the image has these; a bare venv does not). Binary wheels are fetched for the target Python and manylinux
# x86_64 (pip's --python-version/--platform/--only-binary); the sdist-only packages (deepspeed, antlr4) are built
# into pure wheels here, with this machine's torch (deepspeed's setup imports it; its CUDA ops are built at run
# time, never here: DS_BUILD_OPS=0). Each package appears once. Fails when the folder exceeds 64 MiB (what the
# device tool carries).
#
# On the device (one line; the folder travels with `carry: [".whl"]`):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 bench/gpu.py --out $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
PYTHON_VERSION=3.12
OUT=.whl
BARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYTHON_VERSION="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --bare-venv) BARE=1; shift ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (use --python-version X.Y, --out DIR, --bare-venv)" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_wheels.sh: $PY has no torch; run 'make setup' first (deepspeed's wheel is built with it)" >&2
  exit 1
fi

SDIST_ONLY="deepspeed antlr4-python3-runtime"
PLATFORMS=(manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64
           manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64)
lists=(bench/wheels/device.txt)
[ "$BARE" = 1 ] && lists+=(bench/wheels/image.txt)

mkdir -p "$OUT"
pins=$(grep -hv '^\s*#' "${lists[@]}" | sed '/^\s*$/d')
binary=() built=()
for pin in $pins; do
  name="${pin%%==*}"
  if [[ " $SDIST_ONLY " == *" $name "* ]]; then built+=("$pin"); else binary+=("$pin"); fi
done

platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
echo "gpu_wheels.sh: ${#binary[@]} binary wheels for CPython $PYTHON_VERSION, ${#built[@]} built here -> $OUT"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  "${platform_args[@]}" -d "$OUT" "${binary[@]}"
for pin in "${built[@]}"; do
  name="${pin%%==*}" version="${pin##*==}"
  if ! ls "$OUT"/"${name//-/_}"-"$version"-py3-none-any.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$pin"
  fi
done

size=$(du -sm "$OUT" | cut -f1)
count=$(ls "$OUT"/*.whl | wc -l)
echo "gpu_wheels.sh: $count wheels, ${size} MiB in $OUT"
if [ "$size" -ge 64 ]; then
  echo "gpu_wheels.sh: $OUT is ${size} MiB, over the device tool's 64 MiB; drop what the image has" >&2
  exit 1
fi
