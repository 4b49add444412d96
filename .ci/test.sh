#!/usr/bin/env bash
# `make test`: bring up what the tests need, run pytest, and end with a line naming anything skipped.
#
# Outside CI the one-node Slurm cluster is started when this machine allows it (root + apt-get,
# .ci/slurm.sh --optional); otherwise the Slurm tests skip with the reason, and the last line says so.
# Under CI (CI=true) Slurm is required: .ci/slurm.sh must succeed and the Slurm tests fail, not skip.
# Idempotent: a running cluster is reused. Usage: PY=.venv/bin/python .ci/test.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

notes="$(mktemp -d)"
trap 'rm -rf "$notes"' EXIT
if [ "${CI:-}" = true ]; then
  bash .ci/slurm.sh || exit 1
else
  SLURM_UNAVAILABLE_FILE="$notes/slurm" bash .ci/slurm.sh --optional \
    || printf '%s\n' ".ci/slurm.sh failed (see above)" > "$notes/slurm"
  if [ -s "$notes/slurm" ]; then
    export JETMOE_SLURM_UNAVAILABLE="$(cat "$notes/slurm")"
  fi
fi

export JETMOE_TEST_NOTES="$notes/skipped"
"$PY" -m pytest -p tests.helpers.skip_notes -q "$@"
rc=$?
if [ -s "$notes/skipped" ]; then
  echo "make test: $(cat "$notes/skipped")"
fi
exit $rc
