"""The paper's R^10 experiment: Compact and Spread targets, three source/coupling settings, Len and W2^2.

No toy code was released, so the targets are our design (docs/method.md §4 gives the intent). Theorem 3.1
is stated for "a uniform mixture of affine-translated unimodal densities", so each target is

    q = (1/m) sum_k Law(a_k + A_k xi),    xi ~ U([-sqrt(3), sqrt(3)]^10)  (zero mean, unit covariance)

with ``m = 8`` centres ``a_k = r u_k`` on the signed axes ``u_k in {+-e_1, ..., +-e_4}`` and
``A_k = R_k diag(s_k)``: a fixed random rotation ``R_k`` and per-axis scales ``s_k`` drawn uniformly in
``[s_lo, s_hi]``. The component density is unimodal but neither Gaussian (a rotated box) nor
axis-aligned, so a diagonal GMM fitted by EM is a good but imperfect source and some within-mode
transport remains. *Compact* puts the centres at ``r = 1`` (neighbouring modes overlap), *Spread* at
``r = 2.5`` (well separated); both use the same shapes.

Settings: Gaussian source / independent coupling; GMM source (sklearn EM with ``m`` diagonal
components on target samples) / independent; GMM / mode coupling (``k ~ r(. | x1)``, the posterior of
the fitted GMM at the data point itself, then ``x0 ~ N(mu_k, Sigma_k)``). Each trains the same MLP
velocity field with the linear flow-matching loss on fresh draws at every step.

Metrics, from ``n_eval`` source samples integrated by the midpoint rule on a uniform grid:
- **Len** = ``E int_0^1 ||v(x_t, t)|| dt``, the mean polygonal length of the learned trajectories;
- **W2^2** between the ODE endpoints and ``n_eval`` fresh target samples, exact (POT ``emd2``);
- **W2^2 floor**: the same estimator between two independent target samples of that size -- in 10-D the
  empirical W2^2 is dominated by this finite-sample bias, so rows should be read relative to it.
All rows use the same target samples and seeds (common random numbers), so differences are not noise
of the estimator.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ot
import torch
from sklearn.mixture import GaussianMixture

from mmfm import _checks, io
from mmfm.flow import (
    GaussianMixtureSource,
    GaussianSource,
    IndependentCoupling,
    LinearPath,
    ModeCoupling,
    solve_ode,
    time_grid,
    velocity_loss,
)
from mmfm.models import VelocityMLP
from mmfm.progress import progress

DIM = 10

#: The paper's table (docs/method.md §4), keyed by (setting, source, coupling): (Len, W2^2).
PAPER = {
    ("compact", "gaussian", "independent"): (1.88, 1.252),
    ("compact", "gmm", "independent"): (1.82, 1.251),
    ("compact", "gmm", "mode"): (1.67, 1.248),
    ("spread", "gaussian", "independent"): (2.35, 1.582),
    ("spread", "gmm", "independent"): (2.30, 1.631),
    ("spread", "gmm", "mode"): (2.00, 1.556),
}
SETTINGS = ("compact", "spread")
ROWS = (("gaussian", "independent"), ("gmm", "independent"), ("gmm", "mode"))


@dataclass
class R10Config:
    """Everything that defines a run; the defaults finish in a few minutes on 2 CPU cores."""

    seed: int = 0
    modes: int = 8
    radius: dict = field(default_factory=lambda: {"compact": 1.0, "spread": 2.5})
    scale_range: tuple[float, float] = (0.25, 0.6)
    gmm_samples: int = 20_000
    iters: int = 3000
    batch: int = 512
    lr: float = 2e-3
    hidden: int = 256
    depth: int = 3
    n_eval: int = 3000
    steps: int = 100

    def __post_init__(self):
        for name in ("modes", "gmm_samples", "iters", "batch", "hidden", "depth", "n_eval", "steps"):
            _checks.integer(name, getattr(self, name))
        if self.modes > 2 * DIM:
            raise ValueError(f"modes: at most {2 * DIM} centres on the signed axes of R^{DIM}, got {self.modes}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: expected 0 < lo <= hi, got {self.scale_range}")
        if set(self.radius) != set(SETTINGS) or any(not r > 0 for r in self.radius.values()):
            raise ValueError(f"radius: expected positive radii for {SETTINGS}, got {self.radius}")


class MixtureTarget:
    """``q = (1/m) sum_k Law(a_k + A_k xi)`` with ``xi`` uniform on the unit-variance box (see module doc)."""

    def __init__(self, radius: float, cfg: R10Config):
        g = torch.Generator().manual_seed(cfg.seed + 12345)  # the shapes are shared by both settings
        m = cfg.modes
        axes = torch.arange(m) // 2
        signs = 1.0 - 2.0 * (torch.arange(m) % 2)
        self.centres = torch.zeros(m, DIM)
        self.centres[torch.arange(m), axes] = radius * signs
        lo, hi = cfg.scale_range
        scales = lo + (hi - lo) * torch.rand(m, DIM, generator=g)
        rotations = torch.linalg.qr(torch.randn(m, DIM, DIM, generator=g)).Q
        self.maps = rotations * scales[:, None, :]  # A_k = R_k diag(s_k): (m, DIM, DIM)
        self.m = m

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randint(self.m, (n,), generator=generator)
        xi = (2 * torch.rand(n, DIM, generator=generator) - 1) * math.sqrt(3.0)
        return self.centres[k] + torch.einsum("nij,nj->ni", self.maps[k], xi), k


def fit_gmm(samples: torch.Tensor, modes: int, seed: int) -> GaussianMixtureSource:
    """EM with ``modes`` diagonal components (scikit-learn), as a source."""
    gm = GaussianMixture(modes, covariance_type="diag", n_init=3, random_state=seed)
    gm.fit(samples.double().numpy())
    return GaussianMixtureSource(
        torch.from_numpy(gm.weights_ / gm.weights_.sum()).float(),
        torch.from_numpy(gm.means_).float(),
        torch.from_numpy(gm.covariances_).float(),
    )


def train_velocity(coupling, target: MixtureTarget, cfg: R10Config, seed: int, desc: str) -> VelocityMLP:
    """Linear flow matching, ``t ~ U(0, 1)``, AdamW with cosine decay, fresh data every step."""
    torch.manual_seed(seed)
    model = VelocityMLP(DIM, cfg.hidden, cfg.depth)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iters, eta_min=cfg.lr * 0.01)
    g = torch.Generator().manual_seed(seed)
    path = LinearPath()
    for _ in progress(range(cfg.iters), desc=desc, leave=False, mininterval=1.0):
        x1, _ = target.sample(cfg.batch, g)
        x0, x1, _ = coupling(x1, generator=g)
        t = torch.rand(cfg.batch, generator=g)
        xt, u = path.sample(x0, x1, t)
        loss = velocity_loss(model(xt, t), u)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def w2_squared(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact squared 2-Wasserstein distance between two equal-size empirical measures (POT)."""
    cost = torch.cdist(a.double(), b.double()).pow(2).numpy()
    w = np.full(len(a), 1.0 / len(a))
    return float(ot.emd2(w, w, cost, numItermax=10_000_000))


@torch.no_grad()
def evaluate(model: VelocityMLP, source, target_eval: torch.Tensor, cfg: R10Config, seed: int) -> dict:
    """Len and W2^2 of the learned flow from ``n_eval`` source samples."""
    g = torch.Generator().manual_seed(seed)
    x0, _ = source.sample(cfg.n_eval, generator=g)
    result = solve_ode(model, x0, time_grid(cfg.steps, dtype=torch.float32), "midpoint", path_length=True)
    return {"len": float(result.path_length.mean()), "w2": w2_squared(result.x, target_eval)}


def run(cfg: R10Config | None = None, progress: bool = True) -> list[dict]:
    """All six rows of the table, with the paper's numbers beside ours."""
    cfg = cfg or R10Config()
    rows = []
    for si, setting in enumerate(SETTINGS):
        target = MixtureTarget(cfg.radius[setting], cfg)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + si)
        fit_data, _ = target.sample(cfg.gmm_samples, g)
        target_eval, _ = target.sample(cfg.n_eval, g)
        floor = w2_squared(target.sample(cfg.n_eval, g)[0], target_eval)
        gmm = fit_gmm(fit_data, cfg.modes, cfg.seed)
        for source_name, coupling_name in ROWS:
            t0 = time.perf_counter()
            source = GaussianSource((DIM,)) if source_name == "gaussian" else gmm
            coupling = ModeCoupling(gmm, assignment="soft") if coupling_name == "mode" else IndependentCoupling(source)
            desc = f"{setting} {source_name}/{coupling_name}"
            model = train_velocity(coupling, target, cfg, seed=cfg.seed * 1000 + 7 * si + 1, desc=desc)
            metrics = evaluate(model, source, target_eval, cfg, seed=cfg.seed * 1000 + si + 500)
            paper_len, paper_w2 = PAPER[(setting, source_name, coupling_name)]
            rows.append({
                "setting": setting, "source": source_name, "coupling": coupling_name,
                "len": round(metrics["len"], 4), "w2": round(metrics["w2"], 4), "w2_floor": round(floor, 4),
                "paper_len": paper_len, "paper_w2": paper_w2, "seconds": round(time.perf_counter() - t0, 1),
            })
            if progress:
                print(f"{desc:28s} Len {metrics['len']:.3f}  W2^2 {metrics['w2']:.4f}  (floor {floor:.4f})", flush=True)
    return rows


def claims(rows: list[dict]) -> dict:
    """The paper's qualitative claims, checked per setting (the issue's acceptance criteria)."""
    out = {}
    for setting in SETTINGS:
        r = {(x["source"], x["coupling"]): x for x in rows if x["setting"] == setting}
        gi, mi, mm = r[("gaussian", "independent")], r[("gmm", "independent")], r[("gmm", "mode")]
        out[setting] = {
            "len_mode_below_gmm_indep": mm["len"] < mi["len"],
            "len_mode_below_gauss_indep": mm["len"] < gi["len"],
            "len_reduction_vs_gauss_indep": round(1 - mm["len"] / gi["len"], 4),
            "w2_mode_within_0.02_of_gauss_indep": mm["w2"] <= gi["w2"] + 0.02,
        }
        out[setting]["holds"] = (out[setting]["len_mode_below_gmm_indep"] and out[setting]["len_mode_below_gauss_indep"]
                                 and out[setting]["len_reduction_vs_gauss_indep"] >= 0.10
                                 and out[setting]["w2_mode_within_0.02_of_gauss_indep"])
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'setting':8s} {'source':8s} {'coupling':11s} {'Len':>7s} {'paper':>6s}   {'W2^2':>7s} {'floor':>7s} {'paper':>6s}"
    lines = [head, "-" * len(head)]
    for x in rows:
        lines.append(f"{x['setting']:8s} {x['source']:8s} {x['coupling']:11s} {x['len']:7.3f} {x['paper_len']:6.2f}"
                     f"   {x['w2']:7.4f} {x['w2_floor']:7.4f} {x['paper_w2']:6.3f}")
    return "\n".join(lines)


def write_outputs(rows: list[dict], cfg: R10Config, out_dir: Path) -> dict[str, Path]:
    """``r10.json`` (rows, claims, config), ``r10.csv`` and ``r10.png``, each written whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "r10.json", "csv": out_dir / "r10.csv", "png": out_dir / "r10.png"}
    payload = {"rows": rows, "claims": claims(rows), "config": asdict(cfg)}
    io.write_json(paths["json"], payload)
    with io.atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, paths["png"], cfg)
    return paths


def _settings_line(cfg: R10Config | dict | None) -> str:
    """The settings that produced a figure, in one line (``cfg``: the run's config or ``r10.json``'s)."""
    if cfg is None:
        return ""
    c = asdict(cfg) if isinstance(cfg, R10Config) else dict(cfg)
    get = lambda k: c.get(k, "?")  # noqa: E731
    return (f"{get('iters')} training iterations, batch {get('batch')}, n_eval {get('n_eval')}, "
            f"{get('steps')} midpoint ODE steps, GMM fit on {get('gmm_samples')} samples, "
            f"MLP {get('hidden')} x {get('depth')}, seed {get('seed')}")


def _plot(rows: list[dict], path: Path, cfg: R10Config | dict | None = None) -> None:
    """``r10.png``: :func:`_plot_figure`, written atomically."""
    fig = _plot_figure(rows, cfg)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def _plot_figure(rows: list[dict], cfg: R10Config | dict | None = None):
    """Len (left) and W2^2 (right) per row as bars, ours beside the paper's marks; both y axes start at zero
    (the W2^2 differences are small next to the estimator's floor, so every bar carries its value); the
    settings of ``cfg`` under the title. A :class:`matplotlib.figure.Figure` (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    labels = [f"{s}/{c}" for s, c in ROWS]
    x = np.arange(len(ROWS))
    colors = ("#4c72b0", "#dd8452")
    for ax, (key, paper_key, title, fmt) in zip(axes, (("len", "paper_len", "Len (mean path length) ↓", "{:.3f}"),
                                                       ("w2", "paper_w2", "W2² of ODE endpoints to the target ↓",
                                                        "{:.3f}"))):
        for j, setting in enumerate(SETTINGS):
            sub = [r for r in rows if r["setting"] == setting]
            pos = x + (j - 0.5) * 0.38
            bars = ax.bar(pos, [r[key] for r in sub], 0.36, label=f"{setting} (ours)", color=colors[j])
            ax.bar_label(bars, [fmt.format(r[key]) for r in sub], label_type="center", fontsize=8, color="white",
                         rotation=90)
            ax.scatter(pos, [r[paper_key] for r in sub], marker="_", s=300, color="k", linewidths=2,
                       zorder=3, label="paper" if j == 0 else None)
            if key == "w2":
                floor = sub[0]["w2_floor"]
                ax.axhline(floor, color=colors[j], ls=":", lw=1.3, label=f"{setting} floor ({floor:.3f})")
        ax.set_xticks(x, labels, fontsize=9)
        ax.set_xlabel("source / coupling")
        ax.set_ylim(bottom=0, top=1.12 * max(max(r[key], r[paper_key]) for r in rows))
        ax.set_title(title)
    axes[0].set_ylabel("E ∫‖v(x_t, t)‖ dt")
    axes[1].set_ylabel("W2² (exact OT, n_eval points each)")
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=5, fontsize=9, frameon=False)
    settings = _settings_line(cfg)
    fig.suptitle("R^10 toy: GMM source + mode coupling shortens the flow" + (f"\n{settings}" if settings else ""),
                 fontsize=11)
    return fig
