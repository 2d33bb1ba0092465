"""spatial_stats: per-mode float64 sums of a group of shards' token grids (mmfm.gmm.spatial.spatial_stats, the map)."""

import faulthandler
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log

from mmfm.config import job_device  # noqa: E402
from mmfm.gmm.spatial import spatial_stats  # noqa: E402

sm = snakemake  # noqa: F821
s = sm.params.spatial
print(spatial_stats(list(sm.input.shards), sm.input.cls_gmm, sm.output[0], flip=s["flip"], rows_from=s["rows_from"],
                    covariance=s["covariance"], rows=s["rows"], device=job_device(sm), progress=True))
