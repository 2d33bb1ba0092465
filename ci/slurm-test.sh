#!/usr/bin/env bash
# CI test: the demo workflow through a real single-node SLURM cluster.
#
#   ci/slurm-test.sh            (from anywhere; snakemake + snakemake-executor-plugin-slurm on PATH,
#                                i.e. the project's virtual environment activated)
#
# 1. ci/slurm-up.sh (installs slurm-wlm + munge if needed; a no-op when the cluster is already up)
# 2. copies the repository (tracked + untracked, not ignored files; no results/, no .snakemake/)
#    to a fresh folder, so that no earlier output is reused and the working tree is not touched
# 3. snakemake -n with profiles/slurm-ci (the plan), then the real run under a hard time limit:
#      timeout -k 15 $SLURM_TEST_TIMEOUT snakemake --profile profiles/slurm-ci \
#          --configfile config.yaml ci/slurm-config.yaml
# 4. checks (any failure: exit 1):
#    - the run exits 0, within the time limit;
#    - every job that is not a localrule was submitted with sbatch: its "submitted with SLURM jobid"
#      line in the run log, its log file .snakemake/slurm_logs/rule_<rule>/.../<jobid>.log, and
#      slurmctld's own record (scontrol show job: COMPLETED, ExitCode 0:0, job name = the run's
#      SLURM run ID, comment rule_<rule>_...); every rule of the dry-run plan ran;
#    - the GPU rules ($SLURM_TEST_GPU_RULES) ran and got a fake GPU: scontrol's JOB_GRES=gpu:N, and
#      the rule's srun step saw SLURM_STEP_GPUS / CUDA_VISIBLE_DEVICES (written by the cluster's
#      TaskProlog to $SLURM_RUN_DIR/jobenv/<jobid>.<step>); the other rules got no GPU;
#    - nothing of the run is left in the SLURM queue;
#    - a rerun `snakemake -n` says "Nothing to be done" (no rerun triggers fire).
# 5. always (trap): ci/slurm-down.sh, unless SLURM_TEST_KEEP_UP=1.
#
# Why these checks: without slurmdbd there is no sacct. squeue/scontrol keep finished jobs for
# MinJobAge (3600 s, set by ci/slurm-up.sh), long enough for this test. The plugin writes one log
# per sbatch submission (kept: slurm-keep-successful-logs in the CI profile), named by job id.
#
# Env: SLURM_TEST_TIMEOUT   seconds for the real run (default 1200); a hang fails, it does not stall
#      SLURM_TEST_CONFIG    config files (default "config.yaml ci/slurm-config.yaml")
#      SLURM_TEST_GPU_RULES rules that must get a GPU (default "train sample")
#      SLURM_TEST_WORKDIR   where the copy runs (default: a new /tmp/mmfm-slurm-test.XXXXXX);
#                           removed after a pass, kept after a failure
#      SLURM_TEST_KEEP_UP=1 leave the cluster up afterwards
#      SLURM_RUN_DIR, FAKE_GPUS: passed to ci/slurm-up.sh / ci/slurm-down.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export SLURM_RUN_DIR=${SLURM_RUN_DIR:-/tmp/mmfm-slurm}
TIMEOUT=${SLURM_TEST_TIMEOUT:-1200}
CONFIG=${SLURM_TEST_CONFIG:-config.yaml ci/slurm-config.yaml}
export SLURM_TEST_GPU_RULES=${SLURM_TEST_GPU_RULES:-train sample}
PROFILE=profiles/slurm-ci

log() { echo "[slurm-test] $*"; }
fail() { echo "[slurm-test] FAIL: $*" >&2; exit 1; }

command -v snakemake >/dev/null || fail "snakemake is not on PATH (activate the project's venv)"
SMK_PY=$(head -1 "$(command -v snakemake)" | sed 's/^#!//')   # the python snakemake runs on
[ -x "$SMK_PY" ] || SMK_PY=python3                               # (e.g. "#!/usr/bin/env python3")
"$SMK_PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
  || fail "snakemake-executor-plugin-slurm is not installed next to $(command -v snakemake)"

WORK=${SLURM_TEST_WORKDIR:-$(mktemp -d /tmp/mmfm-slurm-test.XXXXXX)}
passed=0
cleanup() {
  rc=$?
  set +e
  if [ "${SLURM_TEST_KEEP_UP:-0}" != 1 ]; then "$HERE/slurm-down.sh"; fi
  if [ "$passed" = 1 ] && [ -z "${SLURM_TEST_WORKDIR:-}" ]; then rm -rf "$WORK"
  elif [ "$passed" != 1 ]; then log "work folder kept for inspection: $WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. cluster -------------------------------------------------------------------------------
t0=$(date +%s)
"$HERE/slurm-up.sh"
t1=$(date +%s)

# --- 2. a clean copy of the repository --------------------------------------------------------
mkdir -p "$WORK"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
    | tar -C "$REPO" --null -T - -cf - | tar -C "$WORK" -xf -
else
  tar -C "$REPO" --exclude=./.venv --exclude=./results --exclude=./.snakemake --exclude=./.git -cf - . \
    | tar -C "$WORK" -xf -
fi
rm -rf "$WORK/results" "$WORK/.snakemake"
cd "$WORK"
for f in $CONFIG; do [ -f "$f" ] || fail "config file $f missing in the repository"; done
log "running in $WORK"

# --- 3. plan, then the real run ---------------------------------------------------------------
# shellcheck disable=SC2086
snakemake -n --profile "$PROFILE" --configfile $CONFIG > dry.log 2>&1 \
  || { tail -n 40 dry.log; fail "dry run failed (dry.log)"; }
log "dry run: $(grep -cE '^(rule|localrule|checkpoint) ' dry.log) jobs planned"

log "real run, hard limit ${TIMEOUT} s"
set +e
# shellcheck disable=SC2086
timeout -k 15 "$TIMEOUT" snakemake --profile "$PROFILE" --configfile $CONFIG 2>&1 | tee run.log
run_rc=${PIPESTATUS[0]}
set -e
t2=$(date +%s)
if [ "$run_rc" = 124 ] || [ "$run_rc" = 137 ]; then
  snakemake --unlock --configfile $CONFIG >/dev/null 2>&1 || true
  squeue -o "%i %j %T %R %k" || true
  fail "the SLURM run did not finish within ${TIMEOUT} s (timeout rc $run_rc): a hang"
fi
[ "$run_rc" = 0 ] || fail "the SLURM run failed (snakemake rc $run_rc; run.log, .snakemake/slurm_logs/ in $WORK)"

# --- 4. checks --------------------------------------------------------------------------------
"$SMK_PY" - <<'PY'
import os, re, subprocess, sys
from collections import defaultdict

gpu_rules = os.environ["SLURM_TEST_GPU_RULES"].split()
jobenv = os.path.join(os.environ["SLURM_RUN_DIR"], "jobenv")
run = open("run.log").read()
dry = open("dry.log").read()
errors = []

m = re.search(r"^SLURM run ID: (\S+)", run, re.M)
run_id = m.group(1) if m else None
if not run_id:
    errors.append("no 'SLURM run ID' in run.log: was the slurm executor used?")
submitted = {int(a): (int(b), p) for a, b, p in re.findall(
    r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.", run)}
finished = {int(a): r for a, r in re.findall(r"Finished jobid: (\d+) \(Rule: (\S+)\)", run)}
local_rules = set(re.findall(r"^localrule (\S+):", run, re.M))
planned = set(re.findall(r"^(?:rule|checkpoint) (\S+):", dry, re.M))

def scontrol(jid):
    out = subprocess.run(["scontrol", "-d", "show", "job", str(jid)], capture_output=True, text=True, timeout=30)
    return out.stdout if out.returncode == 0 else ""

per_rule = defaultdict(list)
runtimes = defaultdict(list)
for jobid, rule in sorted(finished.items()):
    if rule in local_rules and jobid not in submitted:
        per_rule[rule].append("local")
        continue
    if jobid not in submitted:
        errors.append(f"job {jobid} (rule {rule}) finished but was never submitted to SLURM")
        continue
    sid, path = submitted[jobid]
    per_rule[rule].append(sid)
    if not (os.path.isfile(path) and os.path.basename(path) == f"{sid}.log" and f"/rule_{rule}/" in path):
        errors.append(f"rule {rule}: SLURM log {path} missing or misplaced")
    info = scontrol(sid)
    if not info:
        errors.append(f"rule {rule}: scontrol does not know SLURM job {sid}")
        continue
    f = lambda key: (re.search(rf"\b{key}=(\S*)", info) or [None, None])[1]
    runtimes[rule].append(f("RunTime") or "?")
    if f("JobState") != "COMPLETED" or f("ExitCode") != "0:0":
        errors.append(f"rule {rule}: SLURM job {sid} JobState={f('JobState')} ExitCode={f('ExitCode')}")
    if run_id and f("JobName") != run_id:
        errors.append(f"rule {rule}: SLURM job {sid} name {f('JobName')} != run ID {run_id}")
    comment = f("Comment") or ""  # rule_<rule>, or rule_<rule>_wildcards_<values>
    if comment != f"rule_{rule}" and not comment.startswith(f"rule_{rule}_wildcards_"):
        errors.append(f"rule {rule}: SLURM job {sid} comment {f('Comment')}")
    gres = f("JOB_GRES") or "(null)"
    try:
        step = open(os.path.join(jobenv, f"{sid}.0")).read()
    except OSError:
        step = ""
    step_gpus = (re.search(r"SLURM_STEP_GPUS=(\S*)", step) or [None, ""])[1]
    cvd = (re.search(r"CUDA_VISIBLE_DEVICES=(\S*)", step) or [None, ""])[1]
    if rule in gpu_rules:
        if not re.fullmatch(r"gpu(:\w+)?:[1-9]\d*", gres):
            errors.append(f"GPU rule {rule}: SLURM job {sid} has JOB_GRES={gres}, no GPU allocated")
        if not step or not step_gpus or not cvd:
            errors.append(f"GPU rule {rule}: SLURM job {sid}: the rule's srun step saw no GPU ({step.strip() or 'no jobenv record'})")
    else:
        if gres != "(null)" or step_gpus:
            errors.append(f"CPU rule {rule}: SLURM job {sid} got a GPU (JOB_GRES={gres}, SLURM_STEP_GPUS={step_gpus})")

for r in sorted(planned - set(per_rule)):
    errors.append(f"rule {r} was planned by the dry run but never ran")
for r in gpu_rules:
    if not any(s != "local" for s in per_rule.get(r, [])):
        errors.append(f"GPU rule {r} did not run as a SLURM job (not in the demo's DAG?)")
if run_id:
    left = subprocess.run(["squeue", "-h", "-n", run_id, "-t", "PD,R,CG,CF,S", "-o", "%i %T"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    if left:
        errors.append(f"jobs of the run still in the queue: {left}")

n_slurm = sum(1 for v in per_rule.values() for s in v if s != "local")
print(f"[slurm-test] {n_slurm} SLURM jobs, {len(finished) - n_slurm} local jobs (run {run_id}):")
for r, v in sorted(per_rule.items()):
    kind = "local" if all(s == "local" for s in v) else ("GPU" if r in gpu_rules else "CPU")
    ids = ",".join(str(s) for s in v if s != "local") or "-"
    rts = ",".join(t[3:] if t.startswith("00:") else t for t in runtimes.get(r, [])) or "-"
    print(f"[slurm-test]   {r:16s} {kind:5s} {len(v):3d} job(s)  SLURM ids {ids}  run times {rts}")
if errors:
    for e in errors:
        print(f"[slurm-test] FAIL: {e}", file=sys.stderr)
    sys.exit(1)
PY

# --- 5. rerun is a no-op --------------------------------------------------------------------
t3=$(date +%s)
# shellcheck disable=SC2086
timeout -k 5 300 snakemake -n --profile "$PROFILE" --configfile $CONFIG > rerun.log 2>&1 \
  || { tail -n 40 rerun.log; fail "rerun dry run failed"; }
t4=$(date +%s)
if ! grep -q "Nothing to be done" rerun.log; then
  grep -E "^(rule|reason:|\s+reason:)" rerun.log | head -40 || true
  fail "a rerun would execute jobs again (rerun.log): outputs or rerun triggers changed during the run"
fi
log "rerun dry run: nothing to be done"

passed=1
log "PASS"
log "TIMING slurm_up=$((t1 - t0))s run=$((t2 - t1))s rerun_check=$((t4 - t3))s total=$((t4 - t0))s"
