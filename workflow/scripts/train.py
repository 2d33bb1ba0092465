"""train: one run's velocity network (mmfm.train.loop.train); `gpu: N > 1` runs N processes via `mmfm train --nproc`.

The run folder keeps its checkpoints between attempts, so a failed or timed-out job resumes from the
latest one. When the latest checkpoint was written with other settings (besides those a resumed run
may change: steps, checkpoint and evaluation cadence), the run starts afresh and the stale
checkpoints are removed first.
"""

import shutil
import subprocess
import sys
from pathlib import Path

sys.stdout = sys.stderr = log = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)

import yaml  # noqa: E402

from mmfm.config import device, with_gmm_files  # noqa: E402
from mmfm.train.checkpoint import checkpoint_config, latest_checkpoint  # noqa: E402
from mmfm.train.config import TrainConfig  # noqa: E402

sm = snakemake  # noqa: F821
settings = with_gmm_files(sm.params.train, sm.input.get("gmm"), sm.input.get("cls_gmm"))
run_dir, gpus = Path(sm.params.run_dir), int(sm.resources.gpu)
if Path(sm.output.ema) != run_dir / "ema.safetensors":
    raise ValueError(f"{sm.output.ema}: the train rule's output must be the run folder's ema.safetensors")
run_dir.mkdir(parents=True, exist_ok=True)

# resume only checkpoints of these settings
cfg = TrainConfig.from_dict(settings)
latest = latest_checkpoint(run_dir)
if latest is not None:
    changed = sorted(cfg.changed_settings(checkpoint_config(latest)))
    if changed:
        print(f"{latest} was trained with other settings ({', '.join(changed)}): starting afresh")
        for p in run_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    else:
        print(f"resuming from {latest}")
(run_dir / "train.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # what this run was given

shards = list(sm.input.shards)
if gpus > 1:  # one process per GPU through torchrun's launcher (mmfm train --nproc)
    cmd = [sys.executable, "-m", "mmfm.cli", "train", "--config", str(run_dir / "train.yaml"), "--shards", *shards,
           "--out", str(run_dir), "--nproc", str(gpus), "--json"]
    print(" ".join(cmd))
    subprocess.run(cmd, stdout=log, stderr=log, check=True)
else:
    from mmfm.train.loop import train

    res = train(settings, shards, run_dir, resume=True, progress=True, device=device(gpus))
    print({k: str(v) for k, v in res.items() if k != "losses"})
if not Path(sm.output.ema).is_file():
    raise RuntimeError(f"{sm.output.ema}: training stopped before the last step (no EMA export)")
