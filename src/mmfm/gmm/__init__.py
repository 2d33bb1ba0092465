"""The GMM stage: the CLS mixture (diagonal EM on numpy / CuPy, k-means init through scikit-learn /
cuML), posteriors on torch, and per-mode spatial statistics as map-reduce; files in safetensors."""

from mmfm.gmm.em import DiagonalGMM, EMResult, fit_em, mean_log_likelihood
from mmfm.gmm.init import initialize

__all__ = ["DiagonalGMM", "EMResult", "fit_em", "initialize", "mean_log_likelihood"]
