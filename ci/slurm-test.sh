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
#    - the multi-node rules ($SLURM_TEST_NODES_RULES) ran as jobs of 2 tasks, whose srun step started
#      2 torchrun agents that met at the c10d rendezvous (every rank's result line: world size 2);
#    - nothing of the run is left in the SLURM queue;
#    - a rerun `snakemake -n` says "Nothing to be done" (no rerun triggers fire).
# 6. a stop signal during training: gmm-indep is extended to 150 steps, with no periodic checkpoint
#    before its end; once it passes step 40, its job's steps get SIGTERM (scancel --signal=TERM: what
#    --signal=TERM@lead sends); the job must fail with a checkpoint (the signal's: the only one between
#    step 20 and the end), Snakemake's retry must resume it from that step in a new SLURM job, and
#    metrics.csv must count every step once, 1..150.
# 5. always (trap): ci/slurm-down.sh, unless SLURM_TEST_KEEP_UP=1.
#
# Why these checks: without slurmdbd there is no sacct. squeue/scontrol keep finished jobs for
# MinJobAge (3600 s, set by ci/slurm-up.sh), long enough for this test. The plugin writes one log
# per sbatch submission (kept: slurm-keep-successful-logs in the CI profile), named by job id.
#
# Env: SLURM_TEST_TIMEOUT   seconds for the real run (default 1200); a hang fails, it does not stall
#      SLURM_TEST_CONFIG    config files (default "config.yaml ci/slurm-config.yaml")
#      SLURM_TEST_GPU_RULES rules that must get a GPU (default "train train_nodes sample"; a rule sample_<samplers>
#                           of runs with samplers of their own counts as sample)
#      SLURM_TEST_NODES_RULES rules whose jobs run one torchrun agent per task (default "train_nodes")
#      SLURM_TEST_SIGNAL=0   skip step 6 (the stop signal and Snakemake's retry)
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
export SLURM_TEST_GPU_RULES=${SLURM_TEST_GPU_RULES:-train train_nodes sample}
export SLURM_TEST_NODES_RULES=${SLURM_TEST_NODES_RULES:-train_nodes}
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
import json, os, re, subprocess, sys
from collections import defaultdict

gpu_rules = os.environ["SLURM_TEST_GPU_RULES"].split()


def stage(rule):
    """sample_euler_heun(_nodes) -> sample(_nodes), evaluate_euler_heun -> evaluate: the rules of runs with
    samplers of their own (mmfm.config.sampler_groups) are their stage's rule for these checks."""
    nodes = "_nodes" if rule.endswith("_nodes") else ""
    base = rule.removesuffix("_nodes")
    for name in ("sample", "evaluate"):
        if base.startswith(name + "_"):
            return name + nodes
    return rule
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
    if rule in os.environ["SLURM_TEST_NODES_RULES"].split():
        if f("NumTasks") != "2":
            errors.append(f"rule {rule}: SLURM job {sid} has NumTasks={f('NumTasks')}, expected 2 (one agent each)")
        wc = (re.search(r"wildcards_(\S+)", comment) or [None, ""])[1]
        try:
            ranks = [json.loads(x) for x in open(f"results/logs/train/{wc}.log") if x.startswith('{"step"')]
        except OSError:
            ranks = []
        if len(ranks) != 2 or {r.get("world_size") for r in ranks} != {2}:
            errors.append(f"rule {rule}: results/logs/train/{wc}.log has {len(ranks)} rank result(s) "
                          f"{[r.get('world_size') for r in ranks]}, expected 2 of world size 2")
    if stage(rule) in gpu_rules:
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
    kind = "local" if all(s == "local" for s in v) else ("GPU" if stage(r) in gpu_rules else "CPU")
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

# --- 6. a stop signal during training; Snakemake's retry resumes --------------------------------
t5=$(date +%s)
if [ "${SLURM_TEST_SIGNAL:-1}" = 1 ]; then
  RUN_DIR=results/runs/gmm-indep
  last_step() { tail -n 1 "$RUN_DIR/metrics.csv" 2>/dev/null | cut -d, -f1; }
  before=$(last_step)
  STEPS=150 SIGNAL_AT=40  # checkpoint_every above STEPS: the signal's checkpoint is the only one to resume from
  log "stop signal: gmm-indep extended from step $before to $STEPS; SIGTERM to its job once past step $SIGNAL_AT"
  # a --config replaces the profile's config list: repeat allow_cpu_fallback
  # shellcheck disable=SC2086
  timeout -k 15 "$TIMEOUT" snakemake --profile "$PROFILE" --configfile $CONFIG \
    --config "runs={gmm-indep: {train: {steps: $STEPS, checkpoint_every: 1000}}}" allow_cpu_fallback=true \
    > signal.log 2>&1 &
  smk=$!
  jid=""; deadline=$(( $(date +%s) + TIMEOUT ))
  while [ "$(date +%s)" -lt "$deadline" ] && kill -0 "$smk" 2>/dev/null; do
    step=$(last_step)
    if [ -n "$step" ] && [ "$step" != step ] && [ "$step" -ge "$SIGNAL_AT" ]; then
      jid=$(squeue -h -o "%i %k" | awk '$2 == "rule_train_wildcards_gmm-indep" {print $1}' | head -1)
      [ -n "$jid" ] && break
    fi
    sleep 1
  done
  [ -n "$jid" ] || { tail -n 40 signal.log; fail "the extended gmm-indep train job never passed step $SIGNAL_AT in SLURM"; }
  scancel --signal=TERM "$jid"
  log "sent SIGTERM to the steps of SLURM job $jid at step $(last_step)"
  set +e; wait "$smk"; sig_rc=$?; set -e
  [ "$sig_rc" = 0 ] || { tail -n 60 signal.log; fail "the run after the stop signal failed (rc $sig_rc; signal.log in $WORK)"; }
  state=$(scontrol show job "$jid" | grep -oE "JobState=[A-Z]+" || true)
  [ "$state" = JobState=FAILED ] || fail "the signalled job $jid ended $state, expected FAILED (exit 143 of the trainer)"
  grep -q "Trying to restart job" signal.log || fail "Snakemake did not retry the signalled train job (signal.log)"
  from=$(grep -oE "resuming from $RUN_DIR/step-[0-9]+" results/logs/train/gmm-indep.log | tail -1 | grep -oE "[0-9]+$" || true)
  [ -n "$from" ] && [ "$((10#$from))" -ge "$SIGNAL_AT" ] && [ "$((10#$from))" -lt "$STEPS" ] \
    || fail "the retried train job did not resume from the signal's checkpoint (results/logs/train/gmm-indep.log: '$from')"
  "$SMK_PY" - "$RUN_DIR/metrics.csv" "$STEPS" <<'PY' || fail "metrics.csv of the stopped and resumed run is wrong"
import csv, sys
steps = [int(r["step"]) for r in csv.DictReader(open(sys.argv[1]))]
first = steps[0]
assert steps == list(range(first, int(sys.argv[2]) + 1, first)), steps[:5] + ["..."] + steps[-5:]
print(f"[slurm-test] metrics.csv: steps {steps[0]}..{steps[-1]}, each once, in order")
PY
  log "stop signal: job $jid FAILED after its checkpoint at step $((10#$from)), the retry resumed from it, the run reached step $STEPS"
fi
t6=$(date +%s)

passed=1
log "PASS"
log "TIMING slurm_up=$((t1 - t0))s run=$((t2 - t1))s rerun_check=$((t4 - t3))s signal=$((t6 - t5))s total=$((t6 - t0))s"
