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
    grid = np.asarray(Image.open(save_grid(tmp_path / "g.png", images)))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert np.array_equal(grid[2:10, 2:10], images[0]) and np.array_equal(grid[12:20, 2:10], images[3])
    with pytest.raises(ValueError, match="uint8"):
        save_npz(tmp_path / "bad.npz", images.astype(np.float32))
    assert not (tmp_path / "bad.npz").exists()


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
