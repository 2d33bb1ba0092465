"""The results page's figures (mmfm.figures), the grids' inputs and the toy's plot, on small synthetic inputs."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfm import figures, io
from mmfm.data import shards
from mmfm.encoders import load_tokenizer
from mmfm.encoders.normalization import LatentNorm
from mmfm.sample import to_uint8


def readable_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100
        return im.size


def write_metrics(path, steps, losses):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "grad_norm", "samples_per_s", "mfu"])
        for s, v in zip(steps, losses):
            w.writerow([s, v, 1e-4, 1.0, 100.0, ""])
    return path


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.arange(200) * 10
    out = {}
    for name, method, source, scale in (("base", "fm", "gaussian", 1.0), ("gmm", "fm", "gmm", 0.4),
                                        ("mode", None, "gmm", 0.3), ("flow", "gmflow", "gmm", 2.0)):
        loss = scale * (0.5 + np.exp(-steps / 500)) * np.exp(0.05 * rng.standard_normal(len(steps)))
        out[name] = {"metrics": write_metrics(tmp_path / name / "metrics.csv", steps, loss), "source": source,
                     "method": method}
    out["short"] = {"metrics": write_metrics(tmp_path / "short" / "metrics.csv", [0, 10, 20], [1.0, 0.9, 0.8]),
                    "source": "gaussian", "method": "fm"}
    out["missing"] = {"metrics": tmp_path / "nope" / "metrics.csv", "source": "gmm", "method": "fm"}
    out["empty"] = {"metrics": write_metrics(tmp_path / "empty" / "metrics.csv", [], []), "source": "gmm",
                    "method": "dmf"}
    return out


def test_run_colors_are_tab10_in_order_and_kept_per_name():
    names = [f"r{i}" for i in range(12)]
    colors = figures.run_colors(names)
    assert list(colors) == names and colors["r0"] == "#1f77b4" and colors["r1"] == "#ff7f0e"
    assert colors["r10"] == colors["r0"]  # tab10 cycles
    assert figures.run_colors(["b", "a"])["b"] == "#1f77b4"
    mixed = figures._colors(["x", "a", "y"], {"a": "#1f77b4"})
    assert mixed["a"] == "#1f77b4" and len(set(mixed.values())) == 3


def test_loss_curves_one_panel_per_method_and_source(runs, tmp_path):
    colors = figures.run_colors(list(runs))
    fig = figures.loss_figure(runs, colors)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["fm, gaussian source", "fm, gmm source", "gmflow, gmm source"]  # method None -> fm
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    labelled = {ax.get_title(): sorted(t.get_text() for t in ax.get_legend().get_texts()) for ax in fig.axes}
    assert labelled == {"fm, gaussian source": ["base", "short"], "fm, gmm source": ["gmm", "mode"],
                        "gmflow, gmm source": ["flow"]}  # missing and empty runs skipped
    gmm_ax = fig.axes[1]
    lines = {ln.get_label(): ln for ln in gmm_ax.get_lines() if not ln.get_label().startswith("_")}
    raw = [ln for ln in gmm_ax.get_lines() if ln.get_label().startswith("_")]
    assert len(raw) == 2  # 200 points each: raw faint below the trailing mean
    _, loss = figures.read_losses(runs["gmm"]["metrics"])
    w = round(0.02 * len(loss))
    want = np.array([loss[max(0, i - w + 1):i + 1].mean() for i in range(len(loss))])
    np.testing.assert_allclose(lines["gmm"].get_ydata(), want, rtol=1e-12)
    assert lines["gmm"].get_color() == colors["gmm"]
    short = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "short")
    np.testing.assert_allclose(short.get_ydata(), [1.0, 0.9, 0.8])  # <= 50 points: raw, not smoothed
    assert readable_png(figures.loss_curves(runs, tmp_path / "loss.png", colors=colors))[0] > 1500
    svg = figures.loss_curves(runs, tmp_path / "loss.svg")
    assert svg.read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="no run has losses"):
        figures.loss_curves({"m": runs["missing"], "e": runs["empty"]}, tmp_path / "none.png")
    with pytest.raises(ValueError, match=".png or .svg"):
        figures.loss_curves(runs, tmp_path / "loss.jpg")
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "none.png").exists()


def test_fd_over_training(tmp_path):
    curves = {"a": [[0, 300.0], [1000, 80.0], [2000, 30.0]], "b": [[0, 250.0], [1000, 20.0], [2000, 9.0]],
              "later": []}
    fig = figures.fd_training_figure(curves, floor=2.5, samples=1000, nfe=50)
    ax = fig.axes[0]
    assert ax.get_title() == "Fréchet distance over training: 1000 EMA samples, 50 euler steps"
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["a", "b"] and labels[2].startswith("floor: 1000 real samples vs the data")
    floor = next(ln for ln in ax.get_lines() if ln.get_label() == labels[2])
    assert list(floor.get_ydata()) == [2.5, 2.5] and floor.get_linestyle() == "--"
    assert ax.get_ylim()[0] < 2.5  # the floor is in view
    no_floor = figures.fd_training_figure(curves, floor=None, samples=None, nfe=None)
    assert no_floor.axes[0].get_title() == "Fréchet distance over training"
    assert len(no_floor.axes[0].get_lines()) == 2
    readable_png(figures.fd_over_training(curves, tmp_path / "fd.png", floor=2.5, samples=1000, nfe=50))
    with pytest.raises(ValueError):
        figures.fd_over_training({"later": []}, tmp_path / "x.png", floor=None, samples=None, nfe=None)


def test_fd_over_nfe_log_log_with_nfe_ticks(tmp_path):
    curves = {"a": [[4, 60.0], [8, 30.0], [16, 20.0], [50, 15.0]], "b": [[4, 20.0], [8, 12.0], [50, 9.0]], "c": []}
    fig = figures.fd_nfe_figure(curves, floor=2.0, samples=5000, target=15.0, sampler="heun")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and ax.xaxis._scale.base == 2
    assert list(ax.get_xticks()) == [4, 8, 16, 50]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "8", "16", "50"]
    assert len(ax.xaxis.get_minorticklocs()) == 0
    styles = {ln.get_label(): ln.get_linestyle() for ln in ax.get_lines()}
    assert styles["baseline's target (15)"] == ":"
    assert styles["floor: 5000 real samples vs the data (2)"] == "--"
    assert "heun" in ax.get_xlabel() and "5000 samples" in ax.get_title()
    readable_png(figures.fd_over_nfe(curves, tmp_path / "nfe.png", floor=2.0, samples=5000, target=15.0))


def test_em_log_likelihood_from_a_real_fit_and_with_reseeds(tmp_path):
    from mmfm.gmm.fit import fit_cls_gmm

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 0.5, (150, 2)), rng.normal(3, 0.5, (150, 2))]).astype(np.float32)
    np.save(tmp_path / "cls.npy", x)
    result, _ = fit_cls_gmm(tmp_path / "cls.npy", k=3, out=tmp_path / "cls.safetensors", max_iter=20, plot=False,
                            progress=False)
    report = figures.read_em_report(tmp_path / "cls.json")
    assert report["loglik"] == pytest.approx(result.loglik) and report["k"] == 3
    readable_png(figures.em_log_likelihood(tmp_path / "cls.json", tmp_path / "em.png"))

    ll = [-5.0, -4.0, -3.5, -3.6, -3.4, -3.39]
    side = {"k": 8, "settings": {"tol": 1e-3}, "fit": {"n_iter": 6, "converged": True, "loglik": ll,
            "final_loglik": -3.38, "reseeded": [{"iteration": 3, "components": [1, 5]}], "reseeded_total": 2,
            "collapsed": []}}  # the planner's stand-in writes collapsed as a list
    (tmp_path / "s.json").write_text(json.dumps(side))
    fig = figures.em_figure(figures.read_em_report(tmp_path / "s.json"))
    assert fig.get_suptitle() == "EM of the CLS GMM: K = 8, 6 iterations, converged, 0 collapsed components"
    marks = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("re-seeded")]
    assert len(marks) == 1 and "2 in 1 iterations" in marks[0].get_label()
    assert list(marks[0].get_xdata()) == [3] and list(marks[0].get_ydata()) == [-3.5]
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5, 6]
    decrease = next(ln for ln in fig.axes[1].get_lines() if ln.get_label().startswith("decrease"))
    assert list(decrease.get_xdata()) == [4]
    (tmp_path / "bare.json").write_text(json.dumps(side["fit"]))  # EMResult.report() itself
    assert figures.read_em_report(tmp_path / "bare.json")["reseeded_total"] == 2
    (tmp_path / "no.json").write_text(json.dumps({"k": 2}))
    with pytest.raises(ValueError, match="loglik"):
        figures.em_log_likelihood(tmp_path / "no.json", tmp_path / "no.png")


def test_weights_and_counts(tmp_path):
    k = 16
    counts = np.where(np.arange(k) == 5, 0, 100 + 10 * np.arange(k))  # one empty mode
    fig = figures.weights_figure(np.full(k, 3.0), counts)
    assert len(fig.axes) == 2
    w_ax, c_ax = fig.axes
    assert "K = 16" in w_ax.get_title() and "exp(H) = 16.0" in w_ax.get_title()
    assert w_ax.get_yscale() == "linear"
    assert "1 of 16 modes empty" in c_ax.get_title()
    assert [p.get_height() for p in w_ax.containers[0]] == pytest.approx([1 / k] * k)
    assert c_ax.get_yscale() == "linear"  # 250 / 100 < 10
    assert [p.get_height() for p in c_ax.containers[0]] == sorted(counts.tolist(), reverse=True)
    assert [t.get_text() for t in c_ax.get_legend().get_texts()][-1] == "empty modes (1)"
    skewed = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.04, 0.01])
    fig = figures.weights_figure(skewed[::-1], None, empty=3)
    assert len(fig.axes) == 1 and fig.axes[0].get_yscale() == "log"  # 0.5 / 0.01 > 10
    assert [p.get_height() for p in fig.axes[0].containers[0]] == pytest.approx(skewed / skewed.sum())
    fig = figures.weights_figure(np.ones(4), np.array([5, 0, 0, 7]))  # no sidecar count: the zeros
    assert "2 of 4 modes empty" in fig.axes[1].get_title()
    spread = figures.weights_figure(np.ones(3), np.array([1000, 50, 2]))
    assert spread.axes[1].get_yscale() == "log"
    rng = np.random.default_rng(0)
    big = rng.dirichlet(np.ones(2048))
    assert readable_png(figures.weights_and_counts(big, rng.multinomial(50_000, big), tmp_path / "w.png"))
    readable_png(figures.weights_and_counts(big, None, tmp_path / "w1.png"))
    with pytest.raises(ValueError, match="weights"):
        figures.weights_and_counts(np.array([1.0, -1.0]), None, tmp_path / "bad.png")


def pixels():
    return load_tokenizer("pixels", image_size=8, patch_size=2, pool=2)


def test_mode_means_images_are_the_heaviest_modes_decoded(tmp_path):
    tok = pixels()
    rng = np.random.default_rng(0)
    k = 12
    weights = rng.permutation(np.arange(1, k + 1, dtype=np.float64))
    weights[3] = weights[7] = 20.0  # a tie: the lower index first
    means = rng.normal(0, 0.6, (k, tok.num_tokens, tok.token_dim)).astype(np.float32)
    path = tmp_path / "spatial.safetensors"
    io.save_tensors(path, {"weights": weights / weights.sum(), "means": means,
                           "variances": np.full(k, 0.1, np.float32), "counts": np.arange(k)}, {"kind": "spatial-gmm"})
    images, modes, w = figures.mode_means_images(path, tok, n=5, batch_size=2)
    want = np.argsort(-weights, kind="stable")[:5]
    assert modes.tolist() == want.tolist() and modes[:2].tolist() == [3, 7]
    assert np.all(np.diff(w) <= 0) and w == pytest.approx(weights[want] / weights.sum())
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(images, to_uint8(tok.decode(torch.from_numpy(means[want]))))
    norm = LatentNorm(np.full((tok.num_tokens, tok.token_dim), 0.25), np.full((tok.num_tokens, tok.token_dim), 0.1))
    images, _, _ = figures.mode_means_images(path, tok, norm, n=3)
    assert np.array_equal(images, to_uint8(tok.decode(norm.denormalize(torch.from_numpy(means[want[:3]])))))
    images, modes, _ = figures.mode_means_images(path, tok, n=64)  # n > K: all K
    assert len(images) == k and sorted(modes.tolist()) == list(range(k))


def digit_shards(tmp_path, tok, sizes=(13, 9, 6)):
    """Shards of random images (originals) each followed by its horizontal mirror (``flip`` true), several row
    groups each; returns the paths and the originals' images and labels (image ``i`` has label ``i``)."""
    rng = np.random.default_rng(1)
    paths, images, start = [], [], 0
    for s, n in enumerate(sizes):
        ims = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        both = np.stack([ims, ims[:, :, ::-1]], axis=1).reshape(2 * n, 8, 8, 3)
        cls, tokens = tok.encode(torch.from_numpy(both).permute(0, 3, 1, 2).float() / 255)
        ids = np.repeat(np.arange(start, start + n), 2)
        p = tmp_path / f"shard-{s:04d}.parquet"
        shards.write_shard(p, {"image_id": ids, "label": ids.astype(np.int32), "flip": np.tile([False, True], n),
                               "cls": cls.numpy(), "tokens": tokens.numpy().astype(np.float32)},
                           {**tok.metadata(), "rows": 2 * n}, row_group_rows=4)
        paths.append(p)
        images.append(ims)
        start += n
    return paths, np.concatenate(images)


def test_data_images_draws_originals_only_reproducibly(tmp_path):
    tok = pixels()
    paths, originals = digit_shards(tmp_path, tok)
    images, labels = figures.data_images(paths, tok, n=10, seed=3)
    assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8 and len(set(labels.tolist())) == 10
    for im, label in zip(images, labels):  # never a mirror; the label is the row's
        assert np.array_equal(im, originals[label])
    again, labels2 = figures.data_images([str(p) for p in paths], tok, n=10, seed=3)
    assert np.array_equal(again, images) and np.array_equal(labels2, labels)
    _, labels3 = figures.data_images(paths, tok, n=10, seed=4)
    assert not np.array_equal(labels3, labels)
    every, all_labels = figures.data_images(paths, tok, n=64, seed=0)  # more than there are: all originals
    assert sorted(all_labels.tolist()) == list(range(len(originals)))
    assert all(np.array_equal(im, originals[lab]) for im, lab in zip(every, all_labels))
    assert all_labels.tolist() != sorted(all_labels.tolist())  # drawn order, not file order
    norm = LatentNorm(np.full((16, 12), 0.3), np.full((16, 12), 0.1))
    from mmfm.data.stream import read_shard

    got = read_shard(paths[0], ("image_id", "label", "flip", "cls", "tokens"))
    normed = tmp_path / "normed" / "shard-0000.parquet"
    normed.parent.mkdir()
    shards.write_shard(normed, {**{c: np.asarray(got[c]) for c in ("image_id", "label", "flip", "cls")},
                                "tokens": norm.normalize(torch.from_numpy(np.array(got["tokens"]))).numpy()},
                       tok.metadata(), row_group_rows=4)
    images, labels = figures.data_images([normed], tok, norm, n=5, seed=0)
    assert all(np.array_equal(im, originals[lab]) for im, lab in zip(images, labels))  # norm undone


def test_data_images_without_a_flip_column(tmp_path):
    tok = pixels()
    ims = np.random.default_rng(2).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    cls, tokens = tok.encode(torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255)
    p = tmp_path / "s.parquet"
    shards.write_shard(p, {"label": np.arange(7, dtype=np.int32), "cls": cls.numpy(), "tokens": tokens.numpy()},
                       tok.metadata(), row_group_rows=3)
    images, labels = figures.data_images([p], tok, n=4, seed=0)
    assert all(np.array_equal(im, ims[lab]) for im, lab in zip(images, labels))


def test_r10_plot_starts_at_zero_and_states_its_settings(tmp_path):
    from mmfm.toy.r10 import PAPER, ROWS, SETTINGS, R10Config, _plot, _plot_figure

    rows = [{"setting": s, "source": src, "coupling": c, "len": PAPER[(s, src, c)][0] * 1.02,
             "w2": PAPER[(s, src, c)][1] + 0.01, "w2_floor": 1.2 if s == "compact" else 1.5,
             "paper_len": PAPER[(s, src, c)][0], "paper_w2": PAPER[(s, src, c)][1]} for s in SETTINGS for src, c in ROWS]
    cfg = R10Config(iters=800, batch=256, n_eval=1000, steps=40, seed=7)
    fig = _plot_figure(rows, cfg)
    assert all(ax.get_ylim()[0] == 0 for ax in fig.axes)
    assert fig.axes[1].get_ylim()[1] >= max(r["w2"] for r in rows)
    title = fig.get_suptitle()
    for text in ("800 training iterations", "batch 256", "n_eval 1000", "40 midpoint ODE steps", "seed 7"):
        assert text in title
    values = {t.get_text() for t in fig.axes[1].texts}
    assert f"{rows[0]['w2']:.3f}" in values  # every bar carries its value
    _plot(rows, tmp_path / "r10.png", cfg)
    readable_png(tmp_path / "r10.png")


def test_fd_over_nfe_one_line_per_run_and_sampler(tmp_path):
    """summary.json's fd_over_nfe: a run's headline sampler solid, its further samplers dashed in the same
    colour, each labelled run (sampler); a run with only the figure's sampler is labelled by its name."""
    curves = {"base": {"euler": [[1, 60.0], [2, 30.0]]},
              "mode": {"euler": [[1, 12.0], [2, 7.0]], "heun": [[1, 9.0], [2, 6.8]]},
              "gm": {"gm-ode": [[1, 10.0], [2, 6.5]], "gm-sde": []}}
    ax = figures.fd_nfe_figure(curves, floor=None, samples=512, target=None, sampler="euler").axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"base", "mode (euler)", "mode (heun)", "gm (gm-ode)"}  # an empty curve is skipped
    assert lines["mode (euler)"].get_linestyle() == "-" and lines["mode (heun)"].get_linestyle() == "--"
    assert lines["mode (euler)"].get_color() == lines["mode (heun)"].get_color() != lines["base"].get_color()
    assert lines["gm (gm-ode)"].get_linestyle() == "-"
    assert "512 samples" in ax.get_title() and "euler unless" in ax.get_xlabel()
    readable_png(figures.fd_over_nfe(curves, tmp_path / "nfe.png", floor=1.0, samples=512, target=20.0))
