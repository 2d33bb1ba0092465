"""The FID path through the real loading code, with randomly initialized FID-Inception weights.

The weights file has the exact keys and shapes of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
and sits in a temporary ``$TORCH_HOME/hub/checkpoints``; every way to reach the network raises.
"""

import math
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import inception as pfi
from pytorch_fid.fid_score import get_activations

from mmfm.data.images import center_crop_arr
from mmfm.metrics import inception as I
from mmfm.metrics.frechet import load_stats

# the network's fixed cost is the 299 x 299 resize: keep to a few small images
H, W = 30, 40


def _random_fid_weights(seed=0) -> dict:
    """The skeleton's state dict, re-drawn so that activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    state = I.fid_inception_skeleton().state_dict()
    for key, t in state.items():
        if not t.is_floating_point():
            continue
        if t.ndim == 4:  # conv: He normal
            t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / t[0].numel()))
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            t.copy_(1.0 + 0.2 * torch.rand(t.shape, generator=g))
        else:  # BN shifts, running means, fc
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """``(torch_home, state)``: the random weights saved where torch.hub would cache pytorch-fid's file."""
    home = tmp_path_factory.mktemp("torch_home")
    state = _random_fid_weights()
    path = home / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return home, state


def _no_network(*args, **kwargs):
    raise AssertionError("the network was touched")


@pytest.fixture
def offline(weights, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(weights[0]))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", _no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    return weights


@pytest.fixture(scope="module")
def model(weights):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(weights[0]))
        return I.load_inception()


def images(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def test_loads_the_cached_file_without_the_network(offline):
    home, state = offline
    assert I.default_weights_path() == home / "hub" / "checkpoints" / I.FID_WEIGHTS_FILE
    model = I.load_inception()
    assert isinstance(model, pfi.InceptionV3) and not model.training
    assert torch.equal(model.blocks[3][2].branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    assert torch.equal(model.blocks[0][0].bn.running_var, state["Conv2d_1a_3x3.bn.running_var"])
    # every tensor of the file except the unused classifier is in the model, unchanged
    loaded = sorted(t.sum().item() for t in model.state_dict().values())
    saved = sorted(t.sum().item() for k, t in state.items() if not k.startswith("fc."))
    assert loaded == saved


def test_explicit_path_and_the_error_when_the_file_is_absent(offline, tmp_path, monkeypatch):
    home, state = offline
    elsewhere = tmp_path / "weights.pth"
    shutil.copy(I.default_weights_path(), elsewhere)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    expected = tmp_path / "empty" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(ValueError, match=rf"{expected}: FID Inception weights not found\. Download https://github"):
        I.load_inception()
    model = I.load_inception(weights=elsewhere)
    assert torch.equal(model.blocks[2][0].branch1x1.conv.weight, state["Mixed_5b.branch1x1.conv.weight"])
    with pytest.raises(ValueError, match="missing.pth: FID Inception weights not found"):
        I.load_inception(weights=tmp_path / "missing.pth")


def test_wrong_or_pickled_weights_files_are_named_errors(offline, tmp_path):
    _, state = offline
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, partial)
    with pytest.raises(ValueError, match=r"partial\.pth: not pytorch-fid's FID Inception state dict"):
        I.load_inception(weights=partial)
    pickled = tmp_path / "pickled.pth"
    torch.save({"state": state["fc.bias"], "extra": I.FeatureStats(2)}, pickled)
    with pytest.raises(ValueError, match=r"pickled\.pth: cannot read a state dict with torch\.load\(weights_only=True\)"):
        I.load_inception(weights=pickled)


def test_features_equal_pytorch_fids_own_network_and_pipeline(offline, model, tmp_path, monkeypatch):
    """pytorch-fid's InceptionV3 finds the same cached file by itself; its get_activations reads PNGs."""
    x = images(4)
    files = []
    for i, img in enumerate(x):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(files[-1])
    cached = Path(offline[0]) / "hub" / "checkpoints" / I.FID_WEIGHTS_FILE

    def from_temp_cache(url, *args, **kwargs):  # pytorch-fid asks for its URL; only the temp cache answers
        assert url == I.FID_WEIGHTS_URL
        return torch.load(cached, map_location="cpu", weights_only=True)

    monkeypatch.setattr(pfi, "load_state_dict_from_url", from_temp_cache)
    theirs = get_activations(files, pfi.InceptionV3([3]), batch_size=4, device="cpu", num_workers=0)
    ours = I.inception_features(x, model, batch_size=4, progress=False)
    assert ours.shape == (4, 2048) and ours.dtype == np.float64
    assert ours.std() > 1e-3  # the random network is not degenerate
    np.testing.assert_array_equal(ours, theirs)


def test_features_are_deterministic_and_take_both_layouts(model):
    x = images(4, seed=1)
    a = I.inception_features(x, model, batch_size=4, progress=False)
    b = I.inception_features(torch.from_numpy(x), model, batch_size=4, progress=False)
    as_float = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    c = I.inception_features(as_float, model, batch_size=4, progress=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    d = I.inception_features(x, model, batch_size=3, progress=False)  # batches of 3 + 1
    np.testing.assert_allclose(d, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    assert np.abs(a[0] - a[1]).max() > 1e-3 * np.abs(a).max()  # different images, different features


def test_bad_image_arrays_are_errors(model):
    with pytest.raises(ValueError, match=r"images: expected uint8 \(N, H, W, 3\) or float \(N, 3, H, W\)"):
        I.inception_features(np.zeros((2, 3, H, W), np.uint8), model, progress=False)
    with pytest.raises(ValueError, match=r"images: expected float values in \[0, 1\], found range \[-1.0, 255.0\]"):
        I.inception_features(np.linspace(-1.0, 255.0, 2 * 3 * H * W).reshape(2, 3, H, W), model, progress=False)


def _folder(root, n=6):
    """n PNGs of 40 x 30 in nested folders, plus files that are not images."""
    x = images(n, seed=2)
    for i, img in enumerate(x):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(x[0]).save(root / ".hidden" / "skip.png")
    return x


def test_ref_stats_from_folder_and_fid_of_the_same_images(model, tmp_path, monkeypatch):
    x = _folder(tmp_path / "imgs")
    out = I.ref_stats_from_folder(tmp_path / "imgs", tmp_path / "ref.npz", size=32, model=model, batch_size=6,
                                  progress=False)
    assert out["n"] == 6 and out["path"] == tmp_path / "ref.npz"
    ref = load_stats(tmp_path / "ref.npz")
    assert np.array_equal(ref.mu, out["mu"]) and np.array_equal(ref.sigma, out["sigma"])
    assert ref.meta["n"] == 6 and ref.meta["size"] == 32
    assert ref.sigma.shape == (2048, 2048) and np.trace(ref.sigma) > 0
    crops = np.stack([center_crop_arr(Image.fromarray(img), 32) for img in x])

    # the same crops as an array, an ADM .npz (streamed) and an .npy reach frechet_distance with the
    # statistics of the folder: the folder path is center_crop_arr + the network
    calls = []
    monkeypatch.setattr(I, "frechet_distance", lambda *a: calls.append(a) or 123.0)
    np.savez_compressed(tmp_path / "samples.npz", arr_0=crops, labels=np.arange(6))
    np.save(tmp_path / "samples.npy", crops)
    for samples in (crops, tmp_path / "samples.npz", str(tmp_path / "samples.npy")):
        res = I.fid_from_samples(samples, tmp_path / "ref.npz", model=model, batch_size=6, progress=False)
        assert res["fid"] == 123.0 and res["n"] == 6
        mu, sigma, ref_mu, ref_sigma = calls.pop()
        assert np.array_equal(ref_mu, ref.mu) and np.array_equal(ref_sigma, ref.sigma)
        np.testing.assert_allclose(mu, ref.mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(sigma, ref.sigma, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match=r"samples\.npz: no array 'images' \(holds \['arr_0', 'labels'\]\)"):
        I.fid_from_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", model=model, key="images")


@pytest.mark.slow  # scipy's sqrtm of a 2048 x 2048 matrix: 20-40 s on 2 cores
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 6 rows: a singular covariance
def test_fid_of_a_set_against_its_own_reference_is_zero(model, tmp_path):
    _folder(tmp_path / "imgs")
    ref = I.ref_stats_from_folder(tmp_path / "imgs", tmp_path / "ref.npz", size=32, model=model, progress=False)
    crops = np.stack([center_crop_arr(Image.open(p), 32) for p in I.list_image_files(tmp_path / "imgs")])
    np.savez(tmp_path / "samples.npz", arr_0=crops)
    res = I.fid_from_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", model=model, progress=False)
    assert res["n"] == 6
    assert abs(res["fid"]) < 1e-5 * np.trace(ref["sigma"])


def test_bad_folders_are_named_errors(model, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty: holds no images"):
        I.ref_stats_from_folder(tmp_path / "empty", tmp_path / "r.npz", model=model, progress=False)
    with pytest.raises(ValueError, match=r"nowhere: no such folder"):
        I.ref_stats_from_folder(tmp_path / "nowhere", tmp_path / "r.npz", model=model, progress=False)
    _folder(tmp_path / "bad", n=2)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: unreadable image"):
        I.ref_stats_from_folder(tmp_path / "bad", tmp_path / "r.npz", model=model, progress=False)
    assert not (tmp_path / "r.npz").exists()
