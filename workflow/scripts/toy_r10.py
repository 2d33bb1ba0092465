"""toy_r10: the paper's R^10 Compact/Spread table (mmfm.toy.r10)."""

import faulthandler
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log

from mmfm.toy import r10  # noqa: E402

sm = snakemake  # noqa: F821
p = sm.params.toy_r10
cfg = r10.R10Config(seed=p["seed"], iters=p["iters"], batch=p["batch"], n_eval=p["n_eval"], steps=p["steps"])
rows = r10.run(cfg, progress=True)
r10.write_outputs(rows, cfg, Path(sm.output.json).parent)
print(r10.format_table(rows))
