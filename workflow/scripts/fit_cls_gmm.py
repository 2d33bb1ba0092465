"""fit_cls_gmm: the diagonal K-mode GMM of the shards' CLS descriptors (mmfm.gmm.fit.fit_cls_gmm)."""

import faulthandler
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (Snakemake's object)
faulthandler.enable(sys.stderr)  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback in the log

from mmfm.config import job_device  # noqa: E402
from mmfm.gmm.fit import fit_cls_gmm  # noqa: E402

sm = snakemake  # noqa: F821
g = sm.params.gmm
result, sidecar = fit_cls_gmm(
    list(sm.input.shards), g["k"], sm.output.gmm, init=g["init"], max_iter=g["max_iter"], tol=g["tol"],
    reg_covar=g["reg_covar"], seed=g["seed"], device=job_device(sm), dtype=g["precision"],
    init_sample=g["init_sample"], kmeans_iter=g["kmeans_iter"], rows=g["rows"], stream=g["stream"], plot=True,
    progress=True)
print(f"K = {g['k']}: {result.n_iter} iterations, converged {result.converged}, "
      f"mean log-likelihood {result.final_loglik:.6g}, backend {result.backend}")
