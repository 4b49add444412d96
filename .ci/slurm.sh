#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this host (CI and local tests of launch/slurm.sbatch).
#
# Installs Debian's munge + slurmctld + slurmd + slurm-client when missing, writes slurm.conf under
# $SLURM_CI_DIR (default /tmp/jetmoe-slurm), links it to /etc/slurm/slurm.conf so sbatch/sinfo find
# it without environment, starts munged, slurmctld and slurmd, and waits until the node is idle.
# Idempotent: a second call with everything up only checks and returns. Needs root.
#
# --optional (what `make test` uses outside CI): where the cluster cannot be brought up (not root, no
# apt-get, the install or a daemon fails), say why on one line, write that reason to
# $SLURM_UNAVAILABLE_FILE when set, and exit 0; the Slurm tests then skip with that reason.
set -euo pipefail

DIR="${SLURM_CI_DIR:-/tmp/jetmoe-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
CPUS="$(nproc --all)"
OPTIONAL=0
[ "${1:-}" = "--optional" ] && OPTIONAL=1

log() { echo "[slurm.sh] $*"; }

# Stop: an error (exit 1), or with --optional the reason the Slurm tests will be skipped (exit 0).
unavailable() {
  if [ "$OPTIONAL" = 1 ]; then
    log "Slurm not started: $*"
    [ -n "${SLURM_UNAVAILABLE_FILE:-}" ] && printf '%s\n' "$*" > "$SLURM_UNAVAILABLE_FILE"
    exit 0
  fi
  echo "[slurm.sh] $*" >&2
  exit 1
}

usable() { sinfo -h -o %T 2>/dev/null | tr -d '*~#' | grep -qE '^(idle|mixed|allocated|completing)$'; }

if [ "$(id -u)" != 0 ]; then
  if [ "$OPTIONAL" = 1 ] && command -v sinfo >/dev/null && usable; then
    log "up: a running cluster answers (not root: nothing started)"
    exit 0
  fi
  unavailable "must run as root (installs packages, starts daemons); run 'sudo .ci/slurm.sh' or .ci/run"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || unavailable "Slurm and munge are not installed and there is no apt-get to install them"
  log "installing munge + slurm (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || unavailable "apt-get update failed (no network to the package mirror?)"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || unavailable "apt-get install slurmctld slurmd slurm-client munge failed"
fi

mkdir -p "$DIR/state" "$DIR/spool"

# The node line must match this host; rewrite only when something changed, so a running
# controller keeps a config identical to the one it read.
NEW_CONF="$(cat <<EOF
# Written by .ci/slurm.sh: a one-node cluster for tests.
ClusterName=jetmoe-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again once its old credential expired (default 120 s): tests requeue
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=300
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
)"
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
  printf '%s\n' "$NEW_CONF" > "$CONF"
  log "wrote $CONF (node $HOST, $CPUS CPUs)"
  # daemons this script started earlier read the old file: restart them
  for d in slurmd slurmctld; do
    if alive "$DIR/$d.pid"; then
      log "restarting $d for the new config"
      pid="$(cat "$DIR/$d.pid")"
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
fi
mkdir -p /etc/slurm
if [ "$(readlink -f /etc/slurm/slurm.conf 2>/dev/null || true)" != "$(readlink -f "$CONF")" ]; then
  if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    mv /etc/slurm/slurm.conf "/etc/slurm/slurm.conf.before-jetmoe-ci"
  fi
  ln -sf "$CONF" /etc/slurm/slurm.conf
fi
export SLURM_CONF="$CONF"

# munge: its daemon runs as the munge user, with its socket under /run/munge.
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- munged --force || true  # checked just below
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 || unavailable "munge does not work (see /var/log/munge/munged.log)"

if ! alive "$DIR/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld -f "$CONF" || unavailable "slurmctld did not start; see $DIR/slurmctld.log"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! alive "$DIR/slurmd.pid"; then
  log "starting slurmd"
  slurmd -f "$CONF" || unavailable "slurmd did not start; see $DIR/slurmd.log"
fi

state=""
for _ in $(seq 150); do
  state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)"
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
case "$state" in
  idle|mixed|allocated|completing) log "up: node $HOST is $state ($CPUS CPUs); SLURM_CONF=$CONF" ;;
  *)
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    unavailable "node $HOST not ready (state '$state'); see $DIR/slurmctld.log and $DIR/slurmd.log" ;;
esac
