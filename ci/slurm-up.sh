#!/usr/bin/env bash
# Bring up a single-node SLURM "cluster" (munge + slurmctld + slurmd) for the SLURM CI test.
#
# Meant for a fresh, throwaway Debian/Ubuntu machine where we are root (or have sudo) and
# there is no real SLURM: it installs slurm-wlm + munge with apt (skipped when already
# installed), writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf for this machine's
# hostname, CPU count and memory, with FAKE_GPUS fake GPUs (gres/gpu backed by /dev/null,
# /dev/zero, ...), and starts the daemons directly (no systemd), their PIDs in pid files.
#
# Idempotent: if the cluster this script started is still up and the node answers, it does
# nothing. A half-up cluster (a daemon died) is stopped with ci/slurm-down.sh and restarted.
# Every fresh start wipes the job state (job ids restart at 1).
#
# It refuses to overwrite an /etc/slurm/slurm.conf it did not write (a real cluster's config)
# unless SLURM_CI_FORCE=1.
#
# Env: FAKE_GPUS      number of fake GPUs, 0..4 (default 2)
#      SLURM_RUN_DIR  state, spool, logs, pid files (default /tmp/mmfm-slurm)
#      SLURM_CI_FORCE 1: overwrite a foreign /etc/slurm/slurm.conf
# Stop with ci/slurm-down.sh (same SLURM_RUN_DIR).
set -euo pipefail

FAKE_GPUS=${FAKE_GPUS:-2}
RUN=${SLURM_RUN_DIR:-/tmp/mmfm-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
MARKER="# written by mmfm ci/slurm-up.sh"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
t0=$(date +%s)

log() { echo "[slurm-up] $*"; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }
case "$FAKE_GPUS" in [0-4]) ;; *) die "FAKE_GPUS must be 0..4, got '$FAKE_GPUS'";; esac

# PIDs of the daemons we started are copied to $RUN/pids/<name>.pid; ci/slurm-down.sh only
# kills those (after checking /proc/<pid>/comm), never anything by name.
alive() {  # alive <name>: the daemon <name> we started is running
  local f="$RUN/pids/$1.pid" pid
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}
node_state() { timeout 5 sinfo -h -N -o %T 2>/dev/null | head -1 || true; }

# --- 0. already up? -------------------------------------------------------------------------
if alive slurmctld && alive slurmd && { alive munged || [ -e "$RUN/pids/munged.external" ]; }; then
  st=$(node_state)
  case "$st" in
    idle|mixed|allocated|completing)
      log "already up (node $st), nothing to do"; exit 0;;
  esac
  log "daemons alive but node state is '$st': restarting"
fi
if [ -d "$RUN/pids" ] && [ -n "$(ls -A "$RUN/pids" 2>/dev/null)" ]; then
  log "stopping a half-up cluster first"
  SLURM_RUN_DIR="$RUN" "$HERE/slurm-down.sh"
fi

# --- 1. packages ----------------------------------------------------------------------------
# slurm-wlm pulls slurmctld, slurmd and slurm-client (sbatch, squeue, scontrol, sacct).
need=""
for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/squeue /usr/sbin/munged /usr/bin/munge; do
  [ -x "$b" ] || need=1
done
if [ -n "$need" ]; then
  command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get"
  log "installing slurm-wlm munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
else
  log "slurm-wlm and munge already installed"
fi

# --- 2. config ------------------------------------------------------------------------------
if [ -e /etc/slurm/slurm.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf \
   && [ "${SLURM_CI_FORCE:-0}" != 1 ]; then
  die "/etc/slurm/slurm.conf exists and was not written by this script (a real cluster?); set SLURM_CI_FORCE=1 to overwrite it"
fi
HOST=$(hostname -s)
[ -n "$HOST" ] || die "empty hostname"
NCPU=$(nproc --all)
MEM_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
# a cgroup v2 memory limit smaller than MemTotal (containers)
if [ -r /sys/fs/cgroup/memory.max ]; then
  lim=$(cat /sys/fs/cgroup/memory.max)
  [ "$lim" != max ] && [ "$((lim / 1024))" -lt "$MEM_KB" ] && MEM_KB=$((lim / 1024))
fi
MEM_MB=$(( MEM_KB / 1024 * 80 / 100 ))   # <= what slurmd detects, or the node is drained

$SUDO mkdir -p "$RUN"/{spool,log,pids} /etc/slurm
$SUDO rm -rf "$RUN/state"; $SUDO mkdir -p "$RUN/state"   # no stale jobs, ids restart at 1
$SUDO rm -f "$RUN"/pids/*

$SUDO mkdir -p "$RUN/jobenv"; $SUDO chmod 1777 "$RUN/jobenv"; $SUDO rm -f "$RUN"/jobenv/*
$SUDO tee "$RUN/task-prolog.sh" >/dev/null <<PROLOG
#!/bin/sh
# TaskProlog of the CI cluster: record the GPUs SLURM gave this task (stdout would go to slurmstepd)
echo "job=\$SLURM_JOB_ID step=\${SLURM_STEP_ID:-} CUDA_VISIBLE_DEVICES=\${CUDA_VISIBLE_DEVICES:-} SLURM_JOB_GPUS=\${SLURM_JOB_GPUS:-} SLURM_STEP_GPUS=\${SLURM_STEP_GPUS:-}" \\
  > "$RUN/jobenv/\$SLURM_JOB_ID.\${SLURM_STEP_ID:-batch}" 2>/dev/null
exit 0
PROLOG
$SUDO chmod 755 "$RUN/task-prolog.sh"

GRES_TYPES=""; GRES_NODE=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:$FAKE_GPUS"
  devs=(/dev/null /dev/zero /dev/full /dev/urandom)
  { echo "$MARKER"
    echo "AutoDetect=off"
    for i in $(seq 0 $((FAKE_GPUS - 1))); do echo "NodeName=$HOST Name=gpu File=${devs[$i]}"; done
  } | $SUDO tee /etc/slurm/gres.conf >/dev/null
else
  $SUDO rm -f /etc/slurm/gres.conf
fi

$SUDO tee /etc/slurm/slurm.conf >/dev/null <<CONF
$MARKER
# Single-node CI cluster: $HOST, $NCPU CPUs, ${MEM_MB} MB, $FAKE_GPUS fake GPUs. No accounting (no slurmdbd):
# sacct does not work here, so the snakemake profile must use slurm-status-command: squeue.
ClusterName=mmfmci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$RUN/log/slurmctld.log
SlurmdLogFile=$RUN/log/slurmd.log
# finished jobs stay visible to squeue / scontrol for 1 h: the plugin's squeue status check needs
# MinJobAge >= 3 x slurm-init-seconds-before-status-checks, and ci/slurm-test.sh inspects every job
MinJobAge=3600
# without it a job with no --mem gets the whole node's memory, and jobs serialize
DefMemPerCPU=1000
# impossible requests (cpus/mem/gpus/time) fail at sbatch time instead of PENDING forever
EnforcePartLimits=ALL
$GRES_TYPES
# every task (the batch script and each srun step) records the GPUs SLURM gave it in
# $RUN/jobenv/<jobid>.<step>, which ci/slurm-test.sh checks for the GPU rules (without slurmdbd
# the jobs' TRES do not list gres/gpu)
TaskProlog=$RUN/task-prolog.sh
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

# --- 3. daemons (they fork; PIDs from their pid files) --------------------------------------
wait_pidfile() {  # wait_pidfile <file> <name>: copy the daemon's pid into $RUN/pids/<name>.pid
  local i pid
  for i in $(seq 1 50); do
    pid=$(cat "$1" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
      echo "$pid" | $SUDO tee "$RUN/pids/$2.pid" >/dev/null; log "$2 pid $pid"; return 0
    fi
    sleep 0.2
  done
  die "$2 did not start (no live pid in $1); logs in $RUN/log"
}

[ -s /etc/munge/munge.key ] || $SUDO mungekey --create   # Debian's postinst normally creates it
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  # a munged we did not start (e.g. systemd's): use it, and leave it alone in slurm-down.sh
  log "munge already running (not ours), using it"
  $SUDO touch "$RUN/pids/munged.external"
else
  $SUDO mkdir -p /run/munge && $SUDO chown munge:munge /run/munge
  $SUDO rm -f /run/munge/munged.pid
  $SUDO runuser -u munge -- /usr/sbin/munged
  wait_pidfile /run/munge/munged.pid munged
  munge -n | unmunge >/dev/null || die "munge does not work"
fi
$SUDO rm -f "$RUN/slurmctld.pid" "$RUN/slurmd.pid"
$SUDO /usr/sbin/slurmctld
wait_pidfile "$RUN/slurmctld.pid" slurmctld
$SUDO /usr/sbin/slurmd -N "$HOST"
wait_pidfile "$RUN/slurmd.pid" slurmd

# --- 4. wait for the node, smoke test -------------------------------------------------------
st=""; deadline=$(( $(date +%s) + 60 ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  alive slurmctld || { tail -n 20 "$RUN/log/slurmctld.log" >&2; die "slurmctld died; log: $RUN/log/slurmctld.log"; }
  alive slurmd || { tail -n 20 "$RUN/log/slurmd.log" >&2; die "slurmd died; log: $RUN/log/slurmd.log"; }
  st=$(node_state)
  [ "$st" = idle ] && break
  sleep 1
done
if [ "$st" != idle ]; then
  sinfo -N -l || true; tail -n 30 "$RUN/log/slurmctld.log" "$RUN/log/slurmd.log" || true
  die "node not idle after 60 s (state '$st')"
fi
timeout 60 srun -N1 -n1 -t 1 true || die "smoke test 'srun true' failed"
if [ "$FAKE_GPUS" -gt 0 ]; then
  cvd=$(timeout 60 srun -N1 -n1 -t 1 --gpus=1 printenv CUDA_VISIBLE_DEVICES) \
    || die "smoke test 'srun --gpus=1' failed"
  [ "$cvd" = 0 ] || die "srun --gpus=1 gave CUDA_VISIBLE_DEVICES='$cvd', expected 0"
fi
sinfo -N -o "%N %T %c %m %G"
log "up in $(( $(date +%s) - t0 )) s: $(sinfo -V), node $HOST, $NCPU CPUs, $MEM_MB MB, gpu:$FAKE_GPUS (run dir $RUN)"
