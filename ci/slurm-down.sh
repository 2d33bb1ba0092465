#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by ci/slurm-up.sh. Idempotent: a no-op when it is
# already down. Only the PIDs that ci/slurm-up.sh recorded in $SLURM_RUN_DIR/pids are killed, and
# only while /proc/<pid>/comm still names the daemon (no PID reuse accidents); never by name.
# Jobs still pending or running are cancelled first. Always exits 0 unless a daemon survives SIGKILL.
#
# Env: SLURM_RUN_DIR (default /tmp/mmfm-slurm), as for ci/slurm-up.sh.
set -uo pipefail
RUN=${SLURM_RUN_DIR:-/tmp/mmfm-slurm}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
log() { echo "[slurm-down] $*"; }

ours() {  # ours <name>: print the pid if the daemon <name> we started is alive
  local pid
  pid=$(cat "$RUN/pids/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}

if [ ! -d "$RUN/pids" ] || [ -z "$(ls -A "$RUN/pids" 2>/dev/null)" ]; then
  log "nothing to stop (no pid files in $RUN/pids)"; exit 0
fi

# cancel what is still queued or running (it is our throwaway cluster), so that no job step
# (slurmstepd and the job's processes) outlives slurmd
if ours slurmctld >/dev/null; then
  jobs=$(timeout 10 squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs || true
    for i in $(seq 1 20); do
      [ -z "$(timeout 10 squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

rc=0
for name in slurmd slurmctld munged; do     # this order: clients first
  pid=$(ours "$name") || { $SUDO rm -f "$RUN/pids/$name.pid"; continue; }
  $SUDO kill "$pid" 2>/dev/null
  for i in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
  if [ -d "/proc/$pid" ]; then
    log "$name ($pid) ignored SIGTERM for 10 s, sending SIGKILL"
    $SUDO kill -9 "$pid" 2>/dev/null
    for i in $(seq 1 25); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
  fi
  if [ -d "/proc/$pid" ]; then log "ERROR: $name ($pid) still alive"; rc=1; continue; fi
  log "stopped $name ($pid)"
  $SUDO rm -f "$RUN/pids/$name.pid"
done
$SUDO rm -f "$RUN/pids/munged.external"   # a munged we did not start: left alone
exit $rc
