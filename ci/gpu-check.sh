#!/usr/bin/env bash
# The GPU checks that no CPU can make, for a machine with one CUDA GPU (CI has none; nothing here runs
# there). From the repository root, with the project's environment active (`pip install -e ".[gpu]"`
# for CuPy and cuML):
#
#   ci/gpu-check.sh [OUT]          (default OUT: results/gpu-check; each step's JSON goes there)
#
# 1. the CuPy EM against the numpy EM at 200k x 768 x 1024 (same start, 10 iterations): log-likelihood
#    and means agreement, seconds per iteration on each;
# 2. seconds per EM iteration at ImageNet scale, 1.28 M x 768 x 8192 (synthetic, 2 iterations);
# 3. `mmfm bench train --preset ditdh-xl` in bf16: samples/s, counted FLOPs, MFU, peak memory;
# 4. `mmfm train --nproc 1 --device cuda` (NCCL is not needed for one process; `--nproc 2` if the machine
#    has two GPUs) on the test toy, SIGUSR1 in the middle: exit 138, a checkpoint at the step reached,
#    and a resume that finishes.
# Every step runs under a time limit and the script goes on after a failure; the exit code is the
# number of failed steps. GPU_CHECK_STEPS picks steps (default "1 2 3 4"); GPU_CHECK_DEVICE=cpu runs
# step 4 on the CPU (a dry run of the script's plumbing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu-check}
STEPS=" ${GPU_CHECK_STEPS:-1 2 3 4} "
export GPU_CHECK_DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
failed=0
step() { echo "==== $1"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }
fail() { echo "FAILED: $1" >&2; failed=$((failed + 1)); }

want 1 && step "1. CuPy EM vs numpy EM, 200k x 768 x 1024" && { timeout 1800 python - "$OUT/em-agreement.json" <<'PY' || fail "EM agreement"
import json, sys, time
import numpy as np
from mmfm.gmm.em import fit_em
from mmfm.gmm.init import initialize
rng = np.random.default_rng(0)
centres = rng.normal(0, 3, (1024, 768)).astype(np.float32)
x = (centres[rng.integers(0, 1024, 200_000)] + rng.normal(0, 1, (200_000, 768))).astype(np.float32)
init = initialize(x, 1024, "from-data", seed=0)
out = {}
for device in ("cuda", "cpu"):
    t0 = time.perf_counter()
    r = fit_em(x, init, max_iter=10, tol=0.0, device=device)
    out[device] = {"seconds_per_iter": r.seconds_per_iter, "final_loglik": r.final_loglik, "backend": r.backend,
                   "wall_s": time.perf_counter() - t0, "means": r.gmm.means}
rel = np.abs(out["cuda"]["means"] - out["cpu"]["means"]).max() / np.abs(out["cpu"]["means"]).max()
res = {"n": 200_000, "d": 768, "k": 1024, "iters": 10, "means_max_rel_diff": float(rel),
       "loglik_rel_diff": abs(out["cuda"]["final_loglik"] - out["cpu"]["final_loglik"]) / abs(out["cpu"]["final_loglik"]),
       **{f"{d}_{k}": v for d in out for k, v in out[d].items() if k != "means"},
       "cpu_over_cuda": out["cpu"]["seconds_per_iter"] / out["cuda"]["seconds_per_iter"]}
json.dump(res, open(sys.argv[1], "w"))
print(json.dumps(res))
assert res["cuda_backend"] == "cupy" and res["loglik_rel_diff"] < 1e-5, res
PY
}

want 2 && { step "2. EM seconds per iteration at 1.28M x 768 x 8192"
timeout 3600 mmfm bench gmm --imagenet-scale --device cuda --iters 2 --json | tail -1 | tee "$OUT/em-imagenet.json" \
  || fail "EM at ImageNet scale"; }

want 3 && { step "3. mmfm bench train --preset ditdh-xl (bf16)"
timeout 1800 mmfm bench train --preset ditdh-xl --batch 32 --steps 10 --json | tail -1 | tee "$OUT/bench-train-xl.json" \
  || fail "bench train XL"; }

want 4 && { step "4. mmfm train on CUDA, SIGUSR1 in the middle, resume"
timeout 1800 bash -c '
  set -euo pipefail
  work=$(mktemp -d); trap "rm -rf $work" EXIT
  nproc=$(python -c "import torch; print(max(1, min(2, torch.cuda.device_count())))")
  PYTHONPATH=tests python -c "
import sys, yaml; from pathlib import Path; import toyrun
root, _ = toyrun.make_toy(Path(sys.argv[1]))
Path(sys.argv[1], \"run.yaml\").write_text(yaml.safe_dump(toyrun.config(root, \"mode\", steps=2000, checkpoint_every=10000)))
" "$work"
  args=(train --config "$work/run.yaml" --shards "$work/shards" --out "$work/run" --device "$GPU_CHECK_DEVICE" --nproc "$nproc" --json)
  mmfm "${args[@]}" > "$work/first.log" 2>&1 & pid=$!
  until [ -f "$work/run/metrics.csv" ] && [ "$(wc -l < "$work/run/metrics.csv")" -gt 20 ]; do
    kill -0 $pid 2>/dev/null || { cat "$work/first.log"; exit 1; }; sleep 0.5; done
  kill -USR1 $pid; set +e; wait $pid; rc=$?; set -e
  ls "$work/run"; grep -E "interrupted|received" "$work/first.log" || true
  [ "$rc" = 138 ] || { echo "exit $rc, expected 138"; tail -30 "$work/first.log"; exit 1; }
  sed -i "s/steps: 2000/steps: 200/" "$work/run.yaml"
  stopped=$(ls -d "$work"/run/step-* | tail -1)
  mmfm "${args[@]}" | tail -1 | tee /dev/stderr | grep -q "\"resumed_from\": \"$stopped\"" || [ "${stopped##*-}" -ge 200 ]
  echo "{\"nproc\": $nproc, \"exit_code\": $rc, \"checkpoint\": \"$(basename "$stopped")\"}"
' | tail -1 | tee "$OUT/train-signal.json" || fail "train on CUDA with SIGUSR1"; }

echo "==== $failed step(s) failed; JSON in $OUT"
exit "$failed"
