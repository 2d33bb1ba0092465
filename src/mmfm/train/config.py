"""A typed view of one run's training configuration (docs/design.md §5; defaults from docs/method.md §2.3-2.4).

Built from a plain dict (one ``runs.<name>`` entry of ``config.yaml``, flattened) with
:meth:`TrainConfig.from_dict`; an unknown key, a wrong type or a value out of range is a ``ValueError``
that names the key. Keys (defaults in brackets):

- batch: ``global_batch`` [1024] (fixed by the config, never by the number of ranks),
  ``micro_batch_max`` [64] (the largest per-rank forward pass), ``steps`` [1000] optimizer updates;
- learning rate (:class:`~mmfm.train.schedule.LRSchedule`, in steps): ``lr`` [2e-4], ``final_lr`` [lr],
  ``initial_lr`` [lr], ``initial_steps`` [0], ``decay_start`` [0], ``decay_end`` [0];
- AdamW: ``betas`` [(0.9, 0.95)], ``weight_decay`` [0.0], ``eps`` [1e-8]; ``grad_clip`` [1.0] (0 = off);
- EMA (:class:`~mmfm.train.schedule.EMASchedule`): ``ema_decay`` [0.9995], ``ema_initial_decay``
  [ema_decay], ``ema_initial_steps`` [0];
- time (paper convention, t = 0 source): ``time_dist`` [``logit_normal``] or ``uniform``, ``time_mu`` [0],
  ``time_sigma`` [1], ``time_interval`` [(0.001, 1.0)] (RAE's ``[0, 1 - 1/1000]``), ``time_shift``
  [``"auto"``: ``sqrt(N * D / 4096)``, at least 1] or a number;
- source: ``source`` [``gaussian``] or ``gmm`` with ``gmm`` (the spatial GMM file, ``(K, N, D)`` means);
  ``cls_gmm`` (the CLS GMM file) gives the modes of mode coupling;
- ``coupling`` [``independent``], ``mode-soft``, ``mode-hard`` (docs/method.md §3.4) or ``ot`` (minibatch OT);
- ``conditioning`` [``none``], ``class`` (``num_classes``, ``class_dropout_prob`` [0.0]) or ``mode``;
- model: ``model`` [``ditdh-tiny``], a DiTDH preset or ``mlp``; ``model_overrides`` [{}] (keyword
  arguments of ``build_ditdh`` / ``VelocityMLP``);
- data: ``shuffle`` [True], ``buffer_rows`` [4096];
- ``method`` [``fm``] or ``gmflow`` (docs/gmflow.md: a Gaussian-mixture velocity head, ``model`` a DiTDH
  preset) with ``gm_components`` [8] ``J``, ``gm_groups`` [None: ``D / 16`` when 16 divides the token width
  ``D``, else ``D / 4``, else ``D``] channel groups per token, ``gm_trans_ratio`` [0.5] (``lambda``; 1 is the
  plain NLL), ``gm_loss_scale`` [2.0], ``gm_logstd_hidden`` [1024], ``gm_logstd_layers`` [2],
  ``gm_mean_init_noise`` [0.1] (symmetry breaking), ``gm_init`` [None] (an ``ema.safetensors`` of a velocity
  run to replicate into the head) and ``gm_allow_approx`` [False] (a GMM source without mode conditioning,
  where the Gaussian-kernel identities hold only given the drawn mode);
- ``method: dmf`` (Decoupled MeanFlow, docs/dmf.md: a flow map ``U(x, t, r)`` fine-tuned from a velocity run,
  ``model`` a DiTDH preset) with ``dmf_init`` [None] (the ``ema.safetensors`` of the velocity run it starts
  from; None trains the flow map from scratch), ``dmf_depth`` [None: 5/7 of the preset's depth, 20 of
  DiTDH-XL's 28] encoder blocks on ``t``, the rest and the DDT head on ``r``; ``dmf_derivative`` [``jvp``] or
  ``fd`` (a central difference of step ``dmf_fd_eps`` [1e-3]); the MeanFlow branch's proposals ``dmf_time_t``
  [(-0.4, 1.0)] and ``dmf_time_r`` [(1.2, 1.0)] (logit-normal ``(mean, std)`` in this convention, t = min,
  r = max), shifted by ``dmf_proposal_shift`` [``"auto"``: the run's time shift] (the flow-matching branch
  draws its times like any run: ``time_*``); ``dmf_loss_c`` [0.01] of the robust log loss; the training-time
  guidance ``dmf_guidance`` [``none``], ``ag-mg`` or ``ag-distill`` with the autoguide ``dmf_guide`` [None]
  (a velocity ``ema.safetensors``) at ``dmf_guidance_scale`` [1.5] over ``dmf_guidance_interval``
  [(0.3, 1.0)];
- ``method: dfm`` (Decomposable Flow Matching, docs/dfm.md: stage-wise flows on the Laplacian pyramid of the token
  grid, ``model`` a DiTDH preset at patch size 1) with ``dfm_stages`` [2] (the grid side must be divisible by
  ``2^(S-1)``), ``dfm_stage_weights`` [None: ``[0.9, 0.1]`` for 2 stages; required for more] the current stage's
  probabilities, ``dfm_stage_draw`` [``batch``] (one current stage per batch, the peer's) or ``sample``,
  ``dfm_early_logit_mu`` [2.0] (earlier stages' ``logit(tau) ~ N(mu, 1)``: near data), ``dfm_stage_shift``
  [``"auto"``: ``max(1, sqrt(N_s D / 4096))`` per stage] or a number, and ``dfm_source`` [``decompose``] (the
  pyramid of the source sample), ``bands`` (each stage ``X_s(mu_k) + sigma_k n_s``, independent noise per stage)
  or ``independent`` (the peer's N(0, I) per stage; Gaussian source only, where it equals ``bands``);
- ``seed`` [0], ``checkpoint_every`` [1000], ``keep_last`` [2], ``log_every`` [10],
  ``precision`` [``fp32``] or ``bf16`` (autocast on CUDA only), ``source_precision`` [``fp32``], ``fp16`` or
  ``bf16`` (how the spatial GMM means are held on the device; samples are drawn in fp32), ``compile`` [False],
  ``tensorboard`` [True] (events in ``out_dir`` beside ``metrics.csv``, so ``tensorboard --logdir results/runs`` names each run by its folder);
- adaptive per-mode loss weighting (docs/method.md §3.7; GMM source only): ``adaptive_weighting`` [False],
  ``adaptive_decay`` [0.9995], ``adaptive_warmup_steps`` [78] optimizer steps (the release counts 2,500
  per-rank micro-batches: ``floor(2500 / A)`` steps at its accumulation ``A``, 78 at 32, 312 at 8, 1250 at 2;
  :func:`~mmfm.train.weighting.warmup_steps_from_micro_batches`), ``adaptive_gamma`` [2.0],
  ``adaptive_clamp`` [(0.3, 3.0)] (see :mod:`mmfm.train.weighting`);
- evaluation: ``eval_every`` [0: off] steps, the Fréchet distance of ``eval_samples`` [512] EMA
  samples (``eval_steps`` [20] Euler steps) to the first ``eval_rows`` [4096] data rows, in ``fd.csv``;
- ``data_fingerprint`` [None]: set by ``mmfm train``, not by hand -- the fingerprint of the shards and GMM files
  the run trains on (:func:`mmfm.data.fingerprint.inputs_fingerprint`), so a run whose data changed is not
  resumed (a checkpoint that predates the key resumes as before).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mmfm.flow.dfm import DFM_SOURCES, STAGE_DRAWS, check_weights, default_weights
from mmfm.flow.flowmap import DMF_DERIVATIVES
from mmfm.models.ditdh import PRESETS

SOURCES = ("gaussian", "gmm")
COUPLINGS = ("independent", "mode-soft", "mode-hard", "ot")
CONDITIONINGS = ("none", "class", "mode")
PRECISIONS = ("fp32", "bf16")
SOURCE_PRECISIONS = ("fp32", "fp16", "bf16")
TIME_DISTS = ("logit_normal", "uniform")
METHODS = ("fm", "gmflow", "dmf", "dfm")
#: DMF's training-time guidance here: the autoguided ones (MM-FM's runs have no null label for the peer's ``mg``)
DMF_GUIDANCES = ("none", "ag-mg", "ag-distill")
MODELS = tuple(PRESETS) + ("mlp",)


@dataclass(frozen=True)
class TrainConfig:
    """One run's training settings; see the module docstring for every key."""

    global_batch: int = 1024
    micro_batch_max: int = 64
    steps: int = 1000
    lr: float = 2e-4
    final_lr: float | None = None
    initial_lr: float | None = None
    initial_steps: int = 0
    decay_start: int = 0
    decay_end: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    ema_initial_decay: float | None = None
    ema_initial_steps: int = 0
    time_dist: str = "logit_normal"
    time_mu: float = 0.0
    time_sigma: float = 1.0
    time_interval: tuple[float, float] = (1e-3, 1.0)
    time_shift: float | str = "auto"
    source: str = "gaussian"
    gmm: str | None = None
    cls_gmm: str | None = None
    coupling: str = "independent"
    conditioning: str = "none"
    num_classes: int = 0
    class_dropout_prob: float = 0.0
    model: str = "ditdh-tiny"
    model_overrides: dict = field(default_factory=dict)
    shuffle: bool = True
    buffer_rows: int = 4096
    method: str = "fm"
    gm_components: int = 8
    gm_groups: int | None = None
    gm_trans_ratio: float = 0.5
    gm_loss_scale: float = 2.0
    gm_logstd_hidden: int = 1024
    gm_logstd_layers: int = 2
    gm_mean_init_noise: float = 0.1
    gm_init: str | None = None
    gm_allow_approx: bool = False
    dmf_init: str | None = None
    dmf_depth: int | None = None
    dmf_derivative: str = "jvp"
    dmf_fd_eps: float = 1e-3
    dmf_time_t: tuple[float, float] = (-0.4, 1.0)
    dmf_time_r: tuple[float, float] = (1.2, 1.0)
    dmf_proposal_shift: float | str = "auto"
    dmf_loss_c: float = 0.01
    dmf_guidance: str = "none"
    dmf_guide: str | None = None
    dmf_guidance_scale: float = 1.5
    dmf_guidance_interval: tuple[float, float] = (0.3, 1.0)
    dfm_stages: int = 2
    dfm_stage_weights: tuple[float, ...] | None = None
    dfm_stage_draw: str = "batch"
    dfm_early_logit_mu: float = 2.0
    dfm_stage_shift: float | str = "auto"
    dfm_source: str = "decompose"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_last: int = 2
    log_every: int = 10
    precision: str = "fp32"
    source_precision: str = "fp32"
    compile: bool = False
    adaptive_weighting: bool = False
    adaptive_decay: float = 0.9995
    adaptive_warmup_steps: int = 78
    adaptive_gamma: float = 2.0
    adaptive_clamp: tuple[float, float] = (0.3, 3.0)
    tensorboard: bool = True
    eval_every: int = 0
    eval_samples: int = 512
    eval_steps: int = 20
    eval_rows: int = 4096
    data_fingerprint: str | None = None

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any] | "TrainConfig") -> "TrainConfig":
        """Validate and build; unknown keys are refused (a typo must not silently fall back to a default)."""
        if isinstance(d, TrainConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"train config: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown key(s) {unknown}; known keys are {sorted(known)}")
        kw = dict(d)
        for key in PAIRS:
            if key in kw:
                v = kw[key]
                if not (isinstance(v, (list, tuple)) and len(v) == 2):
                    raise ValueError(f"{key}: expected a pair of numbers, got {v!r}")
                kw[key] = tuple(v)
        if kw.get("dfm_stage_weights") is not None:
            if not isinstance(kw["dfm_stage_weights"], (list, tuple)):
                raise ValueError(f"dfm_stage_weights: expected a list of probabilities, got {kw['dfm_stage_weights']!r}")
            kw["dfm_stage_weights"] = tuple(kw["dfm_stage_weights"])
        if "model_overrides" in kw:
            if not isinstance(kw["model_overrides"], dict):
                raise ValueError(f"model_overrides: expected a mapping, got {kw['model_overrides']!r}")
            kw["model_overrides"] = dict(kw["model_overrides"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists), the inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        for key in PAIRS:
            out[key] = list(out[key])
        if out["dfm_stage_weights"] is not None:
            out["dfm_stage_weights"] = list(out["dfm_stage_weights"])
        return out

    def __post_init__(self):
        ints = dict(global_batch=1, micro_batch_max=1, steps=0, initial_steps=0, decay_start=0, decay_end=0,
                    ema_initial_steps=0, num_classes=0, buffer_rows=0, seed=0, checkpoint_every=1,
                    keep_last=1, log_every=1, adaptive_warmup_steps=0, eval_every=0, eval_samples=2, eval_steps=1,
                    eval_rows=2, gm_components=1, gm_logstd_hidden=1, gm_logstd_layers=1)
        for key, lo in ints.items():
            v = getattr(self, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise ValueError(f"{key}: expected an integer >= {lo}, got {v!r}")
        for key in ("lr", "final_lr", "initial_lr", "weight_decay", "eps", "grad_clip", "ema_decay",
                    "ema_initial_decay", "time_mu", "time_sigma", "class_dropout_prob", "adaptive_decay",
                    "adaptive_gamma", "gm_trans_ratio", "gm_loss_scale", "gm_mean_init_noise"):
            v = getattr(self, key)
            if v is None and key in ("final_lr", "initial_lr", "ema_initial_decay"):
                continue
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"{key}: expected a finite number, got {v!r}")
        for key in ("lr", "eps", "time_sigma"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: expected a positive number, got {getattr(self, key)!r}")
        for key in ("final_lr", "initial_lr", "weight_decay", "grad_clip"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key}: expected a number >= 0, got {getattr(self, key)!r}")
        for key in ("ema_decay", "ema_initial_decay", "adaptive_decay"):
            v = getattr(self, key)
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"{key}: expected a decay in [0, 1], got {v!r}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob: expected a value in [0, 1), got {self.class_dropout_prob!r}")
        if not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        lo, hi = self.time_interval
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 <= lo < hi <= 1):
            raise ValueError(f"time_interval: expected 0 <= lo < hi <= 1, got {self.time_interval!r}")
        if self.time_shift != "auto" and not (isinstance(self.time_shift, (int, float))
                                              and not isinstance(self.time_shift, bool)
                                              and math.isfinite(self.time_shift) and self.time_shift > 0):
            raise ValueError(f"time_shift: expected 'auto' or a positive number, got {self.time_shift!r}")
        for key, choices in (("time_dist", TIME_DISTS), ("source", SOURCES), ("coupling", COUPLINGS),
                             ("conditioning", CONDITIONINGS), ("precision", PRECISIONS), ("model", MODELS),
                             ("source_precision", SOURCE_PRECISIONS), ("method", METHODS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}: expected one of {list(choices)}, got {getattr(self, key)!r}")
        lo_w, hi_w = self.adaptive_clamp
        if not (isinstance(lo_w, (int, float)) and isinstance(hi_w, (int, float)) and 0 < lo_w <= 1 <= hi_w):
            raise ValueError(f"adaptive_clamp: expected 0 < lo <= 1 <= hi, got {self.adaptive_clamp!r}")
        if self.adaptive_weighting and self.source != "gmm":
            raise ValueError("adaptive_weighting: per-mode weights need source 'gmm' (the modes of the noise)")
        for key in ("shuffle", "compile", "adaptive_weighting", "tensorboard", "gm_allow_approx"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}: expected true or false, got {getattr(self, key)!r}")
        for key in ("gmm", "cls_gmm", "gm_init"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{key}: expected a file path, got {v!r}")
        # combinations
        if self.source == "gmm" and not self.gmm:
            raise ValueError("gmm: source 'gmm' needs the spatial GMM file (key gmm)")
        if self.source == "gaussian" and self.gmm:
            raise ValueError("gmm: a GMM file is given but source is 'gaussian'; set source: gmm or drop gmm")
        if self.coupling.startswith("mode"):
            if self.source != "gmm":
                raise ValueError(f"coupling: {self.coupling!r} needs source 'gmm' (noise from the data's mode)")
            if not self.cls_gmm:
                raise ValueError(f"cls_gmm: coupling {self.coupling!r} needs the CLS GMM file (its posterior "
                                 "over each image's CLS token picks the mode)")
        if self.conditioning == "mode" and self.source != "gmm":
            raise ValueError("conditioning: 'mode' needs source 'gmm' (the mode the noise is drawn from)")
        if self.conditioning == "class" and self.num_classes < 1:
            raise ValueError("num_classes: conditioning 'class' needs num_classes >= 1")
        if self.conditioning != "class" and self.class_dropout_prob > 0:
            raise ValueError("class_dropout_prob: only class conditioning has a null label")
        if self.model == "mlp" and self.conditioning != "none":
            raise ValueError("model: the 'mlp' velocity is unconditional; use a DiTDH preset for conditioning")
        if self.method == "gmflow":
            self._check_gmflow()
        if self.method == "dmf":
            self._check_dmf()
        if self.method == "dfm":
            self._check_dfm()
        if not 0 <= self.initial_steps <= self.decay_start <= self.decay_end:
            raise ValueError("initial_steps, decay_start, decay_end: expected 0 <= initial_steps <= decay_start "
                             f"<= decay_end, got {self.initial_steps}, {self.decay_start}, {self.decay_end}")

    def _check_gmflow(self) -> None:
        """GMFlow's combination rules (docs/gmflow.md §6): the transition loss, the GM-ODE sub-steps and
        GM-SDE rely on the Gaussian kernel ``q(x_t | x1, k) = N(t x1 + (1 - t) mu_k, (1 - t)^2 sigma_k^2 I)``."""
        if self.model == "mlp":
            raise ValueError("model: method 'gmflow' needs a DiTDH preset (its GM head); 'mlp' has none")
        if not 0 < self.gm_trans_ratio <= 1:
            raise ValueError(f"gm_trans_ratio: expected a value in (0, 1], got {self.gm_trans_ratio!r}")
        if self.gm_loss_scale <= 0 or self.gm_mean_init_noise < 0:
            key = "gm_loss_scale" if self.gm_loss_scale <= 0 else "gm_mean_init_noise"
            raise ValueError(f"{key}: expected a positive number (>= 0 for the noise), got {getattr(self, key)!r}")
        if self.gm_groups is not None and not (isinstance(self.gm_groups, int) and not isinstance(self.gm_groups, bool)
                                               and self.gm_groups >= 1):
            raise ValueError(f"gm_groups: expected a positive integer (or null), got {self.gm_groups!r}")
        if self.coupling == "ot":
            raise ValueError("coupling: 'ot' cannot be used with method 'gmflow': minibatch OT pairs each x0 with "
                             "an x1 (x0 depends on x1), so the Gaussian kernel q(x_t | x1) that GMFlow's transition "
                             "loss, GM-ODE sub-steps and GM-SDE rely on does not hold; use independent or mode "
                             "coupling")
        if self.source == "gmm" and self.conditioning != "mode" and not self.gm_allow_approx:
            raise ValueError(f"gm_allow_approx: a GMM source with conditioning {self.conditioning!r} is approximate "
                             "for GMFlow (the network's mixture is marginal over the modes, the kernel is Gaussian "
                             "only given the mode); use conditioning: mode (exact), or set gm_allow_approx: true")

    def _check_dmf(self) -> None:
        """Decoupled MeanFlow's keys (docs/dmf.md §4)."""
        if self.model == "mlp":
            raise ValueError("model: method 'dmf' needs a DiTDH preset (its blocks are split between t and r); "
                             "'mlp' has no blocks")
        depth = PRESETS[self.model]["depth"] if "depth" not in self.model_overrides else self.model_overrides["depth"]
        if self.dmf_depth is not None and not (isinstance(self.dmf_depth, int) and not isinstance(self.dmf_depth, bool)
                                               and 1 <= self.dmf_depth <= depth):
            raise ValueError(f"dmf_depth: expected an integer in [1, {depth}] (the encoder blocks of {self.model} "
                             f"that see t; the rest and the DDT head see r), got {self.dmf_depth!r}")
        for key, choices in (("dmf_derivative", DMF_DERIVATIVES), ("dmf_guidance", DMF_GUIDANCES)):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}: expected one of {list(choices)}, got {getattr(self, key)!r}")
        for key in ("dmf_fd_eps", "dmf_loss_c", "dmf_guidance_scale"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"{key}: expected a positive number, got {v!r}")
        if self.dmf_fd_eps >= 0.1:
            raise ValueError(f"dmf_fd_eps: expected a small step (< 0.1), got {self.dmf_fd_eps!r}")
        for key in ("dmf_time_t", "dmf_time_r"):
            mu, sd = getattr(self, key)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (mu, sd)) \
                    or sd <= 0:
                raise ValueError(f"{key}: expected [mean, std] of logit(t) with std > 0, got {list(getattr(self, key))}")
        shift = self.dmf_proposal_shift
        if shift != "auto" and not (isinstance(shift, (int, float)) and not isinstance(shift, bool)
                                    and math.isfinite(shift) and shift > 0):
            raise ValueError(f"dmf_proposal_shift: expected 'auto' or a positive number, got {shift!r}")
        lo, hi = self.dmf_guidance_interval
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 <= lo < hi <= 1):
            raise ValueError(f"dmf_guidance_interval: expected 0 <= lo < hi <= 1, got {list(self.dmf_guidance_interval)}")
        for key in ("dmf_init", "dmf_guide"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{key}: expected a file path, got {v!r}")
        if self.dmf_guidance == "ag-distill" and not self.dmf_init:
            raise ValueError("dmf_init: dmf_guidance 'ag-distill' distils the init network's autoguided velocity; "
                             "give dmf_init")
        if self.dmf_guidance_scale < 1 and self.dmf_guidance == "ag-mg":
            raise ValueError(f"dmf_guidance_scale: ag-mg bakes in autoguidance at a scale >= 1 (omega = 1 - 1/w), "
                             f"got {self.dmf_guidance_scale!r}")

    def _check_dfm(self) -> None:
        """Decomposable Flow Matching's keys (docs/dfm.md §3); the grid's stage limit is checked with the tokens
        (:meth:`dfm_pyramid`, and before any job by ``mmfm check``)."""
        if self.model == "mlp":
            raise ValueError("model: method 'dfm' needs a DiTDH preset (per-stage embeddings and output layers); "
                             "'mlp' has none")
        if int(self.model_overrides.get("patch_size", 1)) != 1:
            raise ValueError("model_overrides.patch_size: method 'dfm' needs patch size 1 (each stage is upsampled "
                             "to the token grid)")
        if not (isinstance(self.dfm_stages, int) and not isinstance(self.dfm_stages, bool) and self.dfm_stages >= 1):
            raise ValueError(f"dfm_stages: expected an integer >= 1, got {self.dfm_stages!r}")
        self.dfm_weights()
        for key, choices in (("dfm_stage_draw", STAGE_DRAWS), ("dfm_source", DFM_SOURCES)):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}: expected one of {list(choices)}, got {getattr(self, key)!r}")
        mu = self.dfm_early_logit_mu
        if not (isinstance(mu, (int, float)) and not isinstance(mu, bool) and math.isfinite(mu)):
            raise ValueError(f"dfm_early_logit_mu: expected a finite number, got {mu!r}")
        shift = self.dfm_stage_shift
        if shift != "auto" and not (isinstance(shift, (int, float)) and not isinstance(shift, bool)
                                    and math.isfinite(shift) and shift > 0):
            raise ValueError(f"dfm_stage_shift: expected 'auto' or a positive number, got {shift!r}")
        if self.eval_every > 0 and self.eval_steps < self.dfm_stages:
            raise ValueError(f"eval_steps: dfm-euler gives each of the {self.dfm_stages} stages at least one step; "
                             f"eval_steps must be >= {self.dfm_stages}, got {self.eval_steps}")
        if self.dfm_source == "independent" and self.source != "gaussian":
            raise ValueError("dfm_source: 'independent' is the peer's N(0, I) noise per stage, for source 'gaussian'; "
                             "a GMM source uses 'bands' (its mode's mean and variance per stage) or 'decompose'")

    def dfm_weights(self) -> list[float]:
        """``dfm_stage_weights``, or the default for ``dfm_stages`` (``[0.9, 0.1]`` for 2, ``[1]`` for 1)."""
        weights = self.dfm_stage_weights if self.dfm_stage_weights is not None else default_weights(self.dfm_stages)
        if weights is None:
            raise ValueError(f"dfm_stage_weights: {self.dfm_stages} stages need their probabilities (the peer's "
                             "default [0.9, 0.1] is for 2)")
        return check_weights(list(weights), self.dfm_stages)

    def dfm_pyramid(self, num_tokens: int):
        """The run's :class:`~mmfm.flow.pyramid.LaplacianPyramid` over ``num_tokens`` tokens."""
        from mmfm.flow.pyramid import LaplacianPyramid

        return LaplacianPyramid(self.dfm_stages, num_tokens)

    def dfm_stage_shifts(self, num_tokens: int, token_dim: int) -> list[float]:
        """Each stage's time shift (:func:`mmfm.flow.dfm.stage_shifts`)."""
        from mmfm.flow.dfm import stage_shifts

        return stage_shifts(self.dfm_pyramid(num_tokens), token_dim, self.dfm_stage_shift)

    def dmf_depth_of(self) -> int:
        """``dmf_depth``, or its default: 5/7 of the encoder's depth (DMF's 20 of 28), at least 1."""
        if self.dmf_depth is not None:
            return self.dmf_depth
        depth = int(self.model_overrides.get("depth", PRESETS[self.model]["depth"]))
        return max(1, round(depth * 5 / 7))

    def proposal_shift(self, dim: int) -> float:
        """The MeanFlow proposals' shift: ``dmf_proposal_shift``, or the run's time shift (``auto``)."""
        return self.shift(dim) if self.dmf_proposal_shift == "auto" else float(self.dmf_proposal_shift)

    def gm_groups_for(self, token_dim: int) -> int:
        """``gm_groups``, or its default for tokens of width ``D``: cells of 16 channels when 16 divides ``D``
        (48 for DINOv2-B), else of 4 (3 for the demo's 12), else one cell per token."""
        if self.gm_groups is not None:
            if token_dim % self.gm_groups:
                raise ValueError(f"gm_groups: {self.gm_groups} does not divide the token width {token_dim}")
            return self.gm_groups
        return next(token_dim // c for c in (16, 4, 1) if token_dim % c == 0)

    # ------------------------------------------------------------------------------------------
    def lr_schedule(self):
        from mmfm.train.schedule import LRSchedule

        final = self.lr if self.final_lr is None else self.final_lr
        initial = self.lr if self.initial_lr is None else self.initial_lr
        return LRSchedule(self.lr, final, initial, self.initial_steps, self.decay_start, self.decay_end)

    def ema_schedule(self):
        from mmfm.train.schedule import EMASchedule

        initial = self.ema_decay if self.ema_initial_decay is None else self.ema_initial_decay
        return EMASchedule(self.ema_decay, initial, self.ema_initial_steps)

    def changed_settings(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{key: (saved value, this value)}`` for the settings that differ from a checkpoint's ``saved``
        config and that a resumed run may not change (all but :data:`RESUMABLE_CHANGES`)."""
        mine = self.to_dict()
        if "data_fingerprint" not in saved or mine["data_fingerprint"] is None:  # an older checkpoint: unknown
            mine.pop("data_fingerprint")
        # a key the checkpoint predates had its default then (the GMFlow keys, say)
        defaults = TrainConfig().to_dict()
        was = {k: saved.get(k, defaults.get(k)) for k in mine}
        return {k: (was[k], v) for k, v in mine.items() if k not in RESUMABLE_CHANGES and was[k] != v}

    def shift(self, dim: int) -> float:
        """The time shift for latents of ``dim = N * D`` scalars: the number, or ``max(1, sqrt(dim / 4096))``."""
        if self.time_shift == "auto":
            from mmfm.flow.time import shift_factor

            return max(1.0, shift_factor(dim))
        return float(self.time_shift)


#: Keys given as pairs (lists in YAML / JSON).
PAIRS = ("betas", "time_interval", "adaptive_clamp", "dmf_time_t", "dmf_time_r", "dmf_guidance_interval")

#: Keys that may change between a run and its resumption (they do not change what was trained so far).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "log_every", "compile", "tensorboard", "eval_every",
                     "eval_samples", "eval_steps", "eval_rows")
