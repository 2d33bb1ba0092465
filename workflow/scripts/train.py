"""train: one run's velocity network through `mmfm train` (mmfm.cli), which locks the run folder, runs one
process per GPU of the job (torchrun's agent; one agent per node through srun for a `nodes > 1` run), and
exits 128 + signal after a stop signal has been turned into a checkpoint.

The run folder keeps its checkpoints between attempts, so a failed, stopped or timed-out job resumes
from the latest one (`--fresh-if-changed`: a checkpoint written with other settings, besides those a
resumed run may change, makes the run start afresh).
"""

import os
import sys
import tempfile
from pathlib import Path

log = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
os.dup2(log.fileno(), 1)  # the workers write here too
os.dup2(log.fileno(), 2)
sys.stdout = sys.stderr = log

import yaml  # noqa: E402

import mmfm.config as mc  # noqa: E402
from mmfm.cli import main  # noqa: E402

sm = snakemake  # noqa: F821
run_dir = Path(sm.params.run_dir)
if Path(sm.output.ema) != run_dir / "ema.safetensors":
    raise ValueError(f"{sm.output.ema}: the train rule's output must be the run folder's ema.safetensors")
settings = mc.with_gmm_files(sm.params.train, sm.input.get("gmm"), sm.input.get("cls_gmm"))
flags = mc.launch_flags(dict(sm.resources.items()), sm.threads, sm.config.get("allow_cpu_fallback", False))
with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=Path(sm.log[0]).parent, delete=False) as f:
    yaml.safe_dump(settings, f, sort_keys=False)  # the run's settings (mmfm train copies them to train.yaml)
argv = ["train", "--config", f.name, "--shards", *sm.input.shards, "--out", str(run_dir), "--fresh-if-changed",
        "--json", *flags]
print("mmfm " + " ".join(argv), flush=True)
try:
    code = main(argv)
finally:
    os.unlink(f.name)
if code:
    sys.exit(code)
if not Path(sm.output.ema).is_file():
    raise RuntimeError(f"{sm.output.ema}: training stopped before the last step (no EMA export)")
