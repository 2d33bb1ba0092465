import re

import numpy as np
import pytest
import torch
from PIL import Image
from toyrun import tiny_sampler

from mmfm.encoders import PixelTokenizer
from mmfm.encoders.normalization import LatentNorm
from mmfm.flow.sources import GaussianMixtureSource, GaussianSource
from mmfm.sample import (decode_latents, draw_starts, merge_parts, sample_latents, save_grid, save_npz,
                         to_uint8)


def gmm(k=3, shape=(4, 2)):
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureSource(torch.tensor([0.6, 0.3, 0.1][:k], dtype=torch.float64),
                                 torch.randn(k, *shape, generator=g) * 3, torch.rand(k, generator=g) + 0.2)


class Recorder(torch.nn.Module):
    """A zero velocity field that remembers the labels it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(None if y is None else y.clone())
        return torch.zeros_like(x)


def gaussian_to_gaussian(m, s):
    """Exact marginal velocity of the independent linear path from N(0, I) to N(m, s^2 I):
    x_t = t m + sigma_t x0 with sigma_t^2 = (1 - t)^2 + t^2 s^2, so v = m + (x - t m) sigma_t' / sigma_t."""
    def v(x, t, **_):
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - t) ** 2 + t**2 * s**2
        return m + (x - t * m) * (t * s**2 - (1 - t)) / var
    return v


def test_the_set_does_not_depend_on_processes_or_batches():
    source = gmm()
    net = lambda x, t, y: torch.sin(x) * (1 + y.reshape(-1, 1, 1)) - t.reshape(-1, 1, 1)  # noqa: E731
    one = sample_latents(net, source, 11, seed=5, conditioning="mode", steps=6, batch_size=4)
    parts = [sample_latents(net, source, 11, seed=5, conditioning="mode", steps=6, batch_size=3, rank=r,
                            world_size=2) for r in range(2)]
    both = merge_parts(parts[::-1])
    assert torch.equal(both.index, torch.arange(11)) and torch.equal(both.modes, one.modes)
    torch.testing.assert_close(both.latents, one.latents, rtol=0, atol=1e-6)
    assert both.nfe == 6 * (2 + 2) and one.nfe == 6 * 3  # steps x batches of each process
    other = sample_latents(net, source, 11, seed=6, conditioning="mode", steps=6, batch_size=4)
    assert not torch.allclose(other.latents, one.latents)
    with pytest.raises(ValueError, match="exactly once"):
        merge_parts([parts[0], parts[0]])


def test_gaussian_to_gaussian_reaches_the_exact_target():
    m, s = 1.5, 0.4
    source = GaussianSource((3, 2))
    got = sample_latents(gaussian_to_gaussian(m, s), source, 6, seed=1, steps=40, method="dopri5")
    x0, _, _ = draw_starts(source, range(6), 1)
    torch.testing.assert_close(got.latents, m + s * x0, rtol=0, atol=1e-3)  # dopri5 at tol 1e-5
    assert got.modes is None and got.labels is None


def test_mode_conditioning_passes_each_samples_own_mode():
    source, net = gmm(), Recorder()
    got = sample_latents(net, source, 7, seed=3, conditioning="mode", steps=2, batch_size=7)
    x0, modes, _ = draw_starts(source, range(7), 3)
    assert torch.equal(got.modes, modes) and all(torch.equal(y, modes) for y in net.seen)
    assert torch.equal(got.latents, x0)  # zero velocity: the state stays at the source draw
    fixed = torch.tensor([2, 2, 1, 0, 2, 1, 0])
    got = sample_latents(Recorder(), source, 7, seed=3, conditioning="mode", modes=fixed, steps=1)
    assert torch.equal(got.modes, fixed)
    x0, _ = source.sample(1, modes=fixed[:1], generator=torch.Generator().manual_seed(0))
    assert x0.shape == (1, 4, 2)


def test_modes_follow_the_weights_and_labels_are_uniform():
    source = gmm()
    _, modes, labels = draw_starts(source, range(3000), 0, conditioning="class", num_classes=4)
    freq = np.bincount(modes.numpy(), minlength=3) / 3000
    assert np.all(np.abs(freq - [0.6, 0.3, 0.1]) < 4 * np.sqrt(np.array([0.24, 0.21, 0.09]) / 3000))
    counts = np.bincount(labels.numpy(), minlength=4)
    assert counts.sum() == 3000 and np.all(np.abs(counts / 3000 - 0.25) < 4 * np.sqrt(0.1875 / 3000))
    with pytest.raises(ValueError, match="needs a Gaussian-mixture"):
        draw_starts(GaussianSource((2,)), range(2), 0, conditioning="mode")


def test_decoded_pixels_round_trip_and_adm_files(tmp_path):
    tok = PixelTokenizer(image_size=8, patch_size=2, pool=2)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    _, tokens = tok.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    norm = LatentNorm(np.full((16, 12), 0.3), np.full((16, 12), 0.1))
    assert np.array_equal(decode_latents(tok, norm.normalize(tokens), norm, batch_size=2), images)
    assert np.array_equal(to_uint8(torch.tensor([[[[-0.2, 0.6 / 255, 1.7]]]] * 3).reshape(1, 3, 1, 3)),
                          np.array([[[[0, 0, 0], [1, 1, 1], [255, 255, 255]]]], np.uint8))
    labels = np.arange(5)
    with np.load(save_npz(tmp_path / "s.npz", images, labels), allow_pickle=False) as f:
        assert np.array_equal(f["arr_0"], images) and np.array_equal(f["arr_1"], labels)
    grid = np.asarray(Image.open(save_grid(tmp_path / "g.png", images, min_cell=8)))  # no enlargement
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert np.array_equal(grid[2:10, 2:10], images[0]) and np.array_equal(grid[12:20, 2:10], images[3])
    with pytest.raises(ValueError, match="uint8"):
        save_npz(tmp_path / "bad.npz", images.astype(np.float32))
    assert not (tmp_path / "bad.npz").exists()


def test_small_images_are_enlarged_in_the_grid_gutters_with_them(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    grid = np.asarray(Image.open(save_grid(tmp_path / "g.png", images)))  # 8 px -> 64 px cells, 16 px gutters
    f, cell = 8, 8 * 8 + 2 * 8
    assert grid.shape == (2 * cell + 2 * f, 3 * cell + 2 * f, 3)
    for i, im in enumerate(images):
        r, c = divmod(i, 3)
        top, left = 2 * f + r * cell, 2 * f + c * cell
        assert np.array_equal(grid[top:top + 64, left:left + 64], np.kron(im, np.ones((f, f, 1), np.uint8)))
        assert (grid[top - 2 * f:top, left:left + 64] == 255).all()  # the gutter above, scaled too
    assert (grid[2 * f + cell:, 2 * f + 2 * cell:] == 255).all()  # the empty sixth cell
    odd = np.random.default_rng(2).integers(0, 256, (2, 5, 3, 3), dtype=np.uint8)  # ceil(64 / 5) = 13
    grid = np.asarray(Image.open(save_grid(tmp_path / "o.png", odd)))
    assert grid.shape == (65 + 26 + 26, 2 * (39 + 26) + 26, 3)
    assert np.array_equal(grid[26:91, 26 + 65:26 + 65 + 39], odd[1].repeat(13, 0).repeat(13, 1))
    big = np.random.default_rng(3).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)  # ImageNet-size: as is
    grid = np.asarray(Image.open(save_grid(tmp_path / "b.png", big)))
    assert grid.shape == (68, 100, 3) and np.array_equal(grid[2:66, 2:98], big[0])


def test_sample_command_end_to_end(tmp_path, capsys):
    import json

    from mmfm.cli import main

    model, source = tiny_sampler(tmp_path)
    args = ["sample", "--model", str(model), "--source", str(source), "--n", "5",
            "--steps", "3", "--batch-size", "2", "--encoder", "pixels", "--image-size", "8", "--json"]
    assert main(args + ["--out", str(tmp_path / "a.npz"), "--grid", str(tmp_path / "a.png")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["conditioning"] == "mode" and line["image_shape"] == [8, 8, 3] and line["nfe_per_sample"] == 3
    assert main(args + ["--out", str(tmp_path / "b.npz"), "--batch-size", "5"]) == 0  # other batching
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["arr_0"].shape == (5, 8, 8, 3) and np.array_equal(a["arr_0"], b["arr_0"])
    assert (tmp_path / "a.png").is_file()
    # two processes (gloo, through torchrun): the same image set, merged in index order, no parts left
    assert main(args + ["--out", str(tmp_path / "two.npz"), "--nproc", "2"]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(a["arr_0"], two["arr_0"])
    assert sorted(p.name for p in tmp_path.glob("two.npz*")) == ["two.npz"]
    assert main(args[:-1] + ["--out", str(tmp_path / "c.npz"), "--source", "gaussian"]) == 2
    assert "needs a Gaussian-mixture" in capsys.readouterr().err


def test_network_precision_bf16_is_recorded_and_close_to_fp32(tmp_path, capsys):
    """``--network-precision bf16``: each network under bf16 autocast, its output and the ODE state float32;
    the set differs from fp32 by bf16 rounding only, and the .npz records the precision."""
    import json

    from mmfm.cli import main
    from mmfm.sample import NetworkPrecision

    model, source = tiny_sampler(tmp_path)
    args = ["sample", "--model", str(model), "--source", str(source), "--n", "4", "--steps", "3",
            "--batch-size", "4", "--encoder", "pixels", "--image-size", "8", "--json"]
    assert main(args + ["--out", str(tmp_path / "fp32.npz")]) == 0
    assert main(args + ["--out", str(tmp_path / "bf16.npz"), "--network-precision", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["precision"] == "bf16"
    with np.load(tmp_path / "fp32.npz") as a, np.load(tmp_path / "bf16.npz") as b:
        assert json.loads(str(a["meta"]))["precision"] == "fp32"
        meta = json.loads(str(b["meta"]))
        assert meta["precision"] == "bf16" and meta["steps"] == 3 and meta["nfe_per_sample"] == 3
        assert a["arr_0"].shape == b["arr_0"].shape

    from mmfm.models.ditdh import build_ditdh

    torch.manual_seed(0)
    net = build_ditdh("ditdh-tiny", in_channels=2, num_tokens=4)
    for p in net.parameters():  # away from the zero-initialized output layers
        p.data.add_(0.05 * torch.randn_like(p))
    runs = {p: sample_latents(NetworkPrecision(net, p), GaussianSource((4, 2)), 6, seed=1, steps=4).latents
            for p in ("fp32", "bf16")}
    assert runs["bf16"].dtype == torch.float32
    rel = float((runs["bf16"] - runs["fp32"]).norm() / runs["fp32"].norm())
    assert 0 < rel < 0.05  # bf16 rounding, nothing more

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t, **cond):
            out = torch.nn.functional.linear(x, torch.eye(x.shape[-1]))
            seen.append(out.dtype)
            return out

    x = torch.randn(2, 3, 4)
    out = NetworkPrecision(Probe(), "bf16")(x, torch.rand(2))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert NetworkPrecision(Probe(), "fp32")(x, torch.rand(2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision: expected one of"):
        NetworkPrecision(Probe(), "fp16")


# ------------------------------------------------------------------------------------------ self-describing exports


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """A tiny real run on ``pixels`` tokens (8 x 8 images, patch 2: 16 tokens of width 12), normalized, with a
    3-mode spatial GMM source: ``(root, shard, ema.safetensors, gmm, norm stats)``."""
    from mmfm import io
    from mmfm.data.encode import encode_folder
    from mmfm.encoders.normalization import load_norm_stats, save_norm_stats
    from mmfm.train.loop import train

    root = tmp_path_factory.mktemp("pixel-run")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    stats = root / "norm.safetensors"
    save_norm_stats(stats, rng.uniform(0.2, 0.5, (16, 12)), rng.uniform(-0.1, 0.1, (16, 12)), {})
    shard = root / "shards" / "shard-0.parquet"
    encode_folder(root / "images", shard, PixelTokenizer(image_size=8, patch_size=2), norm=load_norm_stats(stats),
                  dtype="float32", progress=False)
    gmm_file = root / "spatial.safetensors"
    g = torch.Generator().manual_seed(1)
    io.save_tensors(gmm_file, {"weights": np.array([0.5, 0.3, 0.2]),
                               "means": torch.randn(3, 16, 12, generator=g).numpy(),
                               "variances": np.full(3, 0.5, np.float32)}, {"kind": "spatial-gmm"})
    cfg = dict(model="mlp", model_overrides={"hidden": 32, "depth": 1}, source="gmm", gmm=str(gmm_file),
               global_batch=8, micro_batch_max=8, steps=2, checkpoint_every=2, log_every=1, buffer_rows=8, seed=0)
    res = train(cfg, root / "shards", root / "run", progress=False, device="cpu")
    return root, shard, res["ema"], gmm_file, stats


def test_the_export_records_the_shards_tokenizer_and_the_source(pixel_run):
    from mmfm.data import shards
    from mmfm.models.velocity import read_metadata, source_fingerprint

    root, shard, ema, gmm_file, stats = pixel_run
    meta, sh = read_metadata(ema), shards.read_metadata(shard)
    assert meta["tokenizer"] == {
        "name": sh["encoder"], "path": None, "revision": sh["revision"], "image_size": sh["input_size"],
        "grid": sh["grid"], "token_dim": sh["token_dim"], "patch_size": sh["patch_size"], "pool": sh["pool"],
        "precision": "fp32", "normalization": sh["normalization"], "decoder": "exact"}
    rec = meta["tokenizer"]
    assert (rec["name"], rec["grid"], rec["token_dim"], rec["patch_size"]) == ("pixels", [4, 4], 12, 2)
    assert meta["tokenizer"]["normalization"]["file"] == str(stats) and len(sh["normalization"]["sha256"]) == 16
    assert meta["source"] == {"kind": "gmm", "file": str(gmm_file), "shape": [3, 16, 12],
                              "bytes": gmm_file.stat().st_size, "sha256": source_fingerprint(gmm_file)["sha256"]}


def test_the_model_alone_samples_and_agreeing_flags_change_nothing(pixel_run, tmp_path, capsys):
    import json

    from mmfm.cli import main

    root, shard, ema, gmm_file, stats = pixel_run
    common = ["sample", "--model", str(ema), "--n", "3", "--steps", "2", "--json"]
    assert main(common + ["--out", str(tmp_path / "alone.npz")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["image_shape"] == [8, 8, 3]
    flags = ["--encoder", "pixels", "--patch-size", "2", "--image-size", "8", "--precision", "fp32",
             "--source", str(gmm_file), "--norm-stats", str(stats)]  # what workflow/scripts/sample.py passes
    assert main(common + flags + ["--out", str(tmp_path / "flags.npz")]) == 0
    with np.load(tmp_path / "alone.npz") as a, np.load(tmp_path / "flags.npz") as b:
        assert a["arr_0"].shape == (3, 8, 8, 3) and np.array_equal(a["arr_0"], b["arr_0"])
        assert json.loads(str(a["meta"]))["source"] == str(gmm_file)  # the recorded source was used
    # the statistics matter, so "alone" equal to "flags" means the recorded ones were undone
    from mmfm.encoders.normalization import load_norm_stats

    z = torch.randn(2, 16, 12)
    assert not np.array_equal(decode_latents(PixelTokenizer(), z, load_norm_stats(stats)),
                              decode_latents(PixelTokenizer(), z))


def _no_sampling(monkeypatch):
    """Record every call of the ODE sampler (none may happen when a check fails)."""
    import mmfm.sample as sample_module

    calls = []
    monkeypatch.setattr(sample_module, "sample_latents", lambda *a, **k: calls.append(1))
    return calls


@pytest.mark.parametrize("flags, names", [
    (["--encoder", "pixels", "--patch-size", "4"], ["the model takes (16, 12) tokens", "pixels (patch 4)",
                                                     "gives (4, 48)", "it records pixels (patch 2)"]),
    (["--source", "{other_gmm}"], ["{other_gmm}", "(K, N, D) = (3, 4, 48)", "takes (16, 12) tokens"]),
    (["--norm-stats", "{other_norm}"], ["{other_norm}", "normalization statistics", "norm.safetensors"]),
    (["--encoder", "dinov2"], ["dinov2 tokenizer needs its RAE decoder", "--decoder"]),
], ids=["patch", "gmm", "norm", "decoder"])
def test_a_mismatch_fails_before_any_ode_step_naming_the_file_and_both_shapes(pixel_run, tmp_path, capsys,
                                                                            monkeypatch, flags, names):
    from mmfm import io
    from mmfm.cli import main
    from mmfm.encoders.normalization import save_norm_stats

    root, shard, ema, gmm_file, stats = pixel_run
    other_gmm, other_norm = tmp_path / "other-gmm.safetensors", tmp_path / "other-norm.safetensors"
    io.save_tensors(other_gmm, {"weights": np.full(3, 1 / 3), "means": np.zeros((3, 4, 48), np.float32),
                                "variances": np.ones(3, np.float32)})
    save_norm_stats(other_norm, np.ones((16, 12)), None, {})
    subst = {"{other_gmm}": str(other_gmm), "{other_norm}": str(other_norm)}
    calls = _no_sampling(monkeypatch)
    args = ["sample", "--model", str(ema), "--out", str(tmp_path / "x.npz"), "--n", "2", "--steps", "2"]
    assert main(args + [subst.get(f, f) for f in flags]) == 2
    err = capsys.readouterr().err
    for name in [str(ema)] + [subst.get(n, n) for n in names]:
        assert name in err, (name, err)
    assert calls == [] and not (tmp_path / "x.npz").exists()


def test_a_tokenizer_of_the_right_shape_but_another_kind_is_refused(pixel_run, tmp_path, monkeypatch):
    from mmfm.sample import sample_run

    class Other(PixelTokenizer):
        name = "other"

    root, shard, ema, gmm_file, stats = pixel_run
    calls = _no_sampling(monkeypatch)
    with pytest.raises(ValueError, match=r"trained on pixels \(patch 2\) tokens, decoded with other: name 'pixels'"):
        sample_run(ema, tmp_path / "x.npz", Other(image_size=8, patch_size=2), n=2, steps=1)
    assert calls == []


def test_a_guide_of_other_inputs_is_refused_before_sampling(pixel_run, tmp_path, monkeypatch):
    from mmfm.sample import sample_run

    root, shard, ema, gmm_file, stats = pixel_run
    guide, _ = tiny_sampler(tmp_path)  # mode-conditional, no record
    calls = _no_sampling(monkeypatch)
    msg = f"{guide}: the guide must take the inputs of {ema} ('none', (16, 12)) (conditioning, tokens), it takes " \
          "('mode', (16, 12), 3)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        sample_run(ema, tmp_path / "x.npz", guide=guide, guidance_scale=1.5, n=2, steps=1)
    assert calls == []


def test_an_export_without_the_record_needs_the_flags(tmp_path, capsys, monkeypatch):
    from mmfm.cli import main
    from mmfm.models.velocity import read_metadata
    from mmfm.sample import resolve_source

    model, source = tiny_sampler(tmp_path)  # an imported release: no tokenizer, no source recorded
    assert "tokenizer" not in read_metadata(model)
    calls = _no_sampling(monkeypatch)
    assert main(["sample", "--model", str(model), "--source", str(source), "--out", str(tmp_path / "x.npz")]) == 2
    assert f"{model}: the export does not record its tokenizer" in capsys.readouterr().err and calls == []
    assert main(["sample", "--model", str(model), "--source", str(source), "--out", str(tmp_path / "x.npz"),
                 "--encoder", "pixels", "--patch-size", "4"]) == 2  # the shapes are checked all the same
    err = capsys.readouterr().err
    assert f"{model}: the model takes (16, 12) tokens, the tokenizer pixels (patch 4) gives (4, 48); pass --encoder" \
        in err and calls == []
    # older mmfm exports recorded the source's kind only
    old = {"conditioning": "none", "num_tokens": 16, "in_channels": 12, "num_classes": 0}
    assert resolve_source("m", {**old, "source": "gaussian"}) == resolve_source("m", old) == "gaussian"
    with pytest.raises(ValueError, match="m: trained with a GMM source, but the export does not name the file"):
        resolve_source("m", {**old, "source": "gmm"})
