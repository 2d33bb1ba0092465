"""train: one run's velocity network through `mmfm train` (mmfm.cli), which locks the run folder, runs one
process per GPU of the job (torchrun's agent; one agent per node through srun for a `nodes > 1` run), and
exits 128 + signal after a stop signal has been turned into a checkpoint.

The run folder keeps its checkpoints between attempts, so a failed, stopped or timed-out job resumes
from the latest one (`--fresh-if-changed`: a checkpoint written with other settings, besides those a
resumed run may change, makes the run start afresh).
"""

import faulthandler
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# Everything this job and its workers print goes to the job's log and is appended to RUN/train.log: Snakemake
# deletes the job's log before every attempt (a retry, a rerun beside a trainer orphaned by kill -9 of
# Snakemake), the run folder's log keeps every attempt.
run_dir = Path(snakemake.params.run_dir)  # noqa: F821 (Snakemake's object)
run_dir.mkdir(parents=True, exist_ok=True)
logs = [open(snakemake.log[0], "wb", buffering=0), open(run_dir / "train.log", "ab", buffering=0)]  # noqa: F821
read_end, write_end = os.pipe()
os.dup2(write_end, 1)  # the workers write here too
os.dup2(write_end, 2)
os.close(write_end)


def _tee() -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        for chunk in iter(lambda: pipe.read(1 << 16), b""):
            for f in logs:
                f.write(chunk)


tee = threading.Thread(target=_tee, daemon=True)
tee.start()
sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
faulthandler.enable(sys.stderr)


def _close_logs() -> None:
    """At exit: end the pipe (fds 1 and 2) so the tee writes out what is left."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    tee.join(timeout=10)


import atexit  # noqa: E402

atexit.register(_close_logs)

import yaml  # noqa: E402

import mmfm.config as mc  # noqa: E402
from mmfm.cli import main  # noqa: E402

sm = snakemake  # noqa: F821
if Path(sm.output.ema) != run_dir / "ema.safetensors":
    raise ValueError(f"{sm.output.ema}: the train rule's output must be the run folder's ema.safetensors")
settings = mc.with_gmm_files(sm.params.train, sm.input.get("gmm"), sm.input.get("cls_gmm"))
settings = mc.with_network_files(settings, sm.config, sm.wildcards.run, dict(sm.input.items()))  # runs: their exports
flags = mc.launch_flags(dict(sm.resources.items()), sm.threads, sm.config.get("allow_cpu_fallback", False))
with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=Path(sm.log[0]).parent, delete=False) as f:
    yaml.safe_dump(settings, f, sort_keys=False)  # the run's settings (mmfm train copies them to train.yaml)
argv = ["train", "--config", f.name, "--shards", *sm.input.shards, "--out", str(run_dir), "--fresh-if-changed",
        "--json", *flags]
print(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} mmfm " + " ".join(argv), flush=True)
try:
    code = main(argv)
finally:
    os.unlink(f.name)
if code:
    sys.exit(code)
if not Path(sm.output.ema).is_file():
    raise RuntimeError(f"{sm.output.ema}: training stopped before the last step (no EMA export)")
