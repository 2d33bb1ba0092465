"""spatial_gmm: the partials of all shard groups -> the spatial GMM (mmfm.gmm.spatial.spatial_reduce, the reduce)."""

import faulthandler
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log

from mmfm.gmm.spatial import spatial_reduce  # noqa: E402

sm = snakemake  # noqa: F821
s = sm.params.spatial
print(spatial_reduce(list(sm.input.partials), sm.output.gmm, weights=s["weights"], min_variance=s["min_variance"],
                     block_modes=s["block_modes"], progress=True))
