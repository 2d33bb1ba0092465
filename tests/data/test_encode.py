import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmfm import io
from mmfm.cli import main
from mmfm.data import shards
from mmfm.data.digits import export_digits
from mmfm.data.encode import compute_norm_stats, encode_folder
from mmfm.data.images import center_crop_arr, list_images
from mmfm.encoders import PixelTokenizer
from mmfm.encoders.normalization import LatentNorm, load_norm_stats


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    export_digits(out)
    return out


def small_folder(root, n_per_class=(3, 4), size=(12, 10)):
    rng = np.random.default_rng(0)
    for c, n in enumerate(n_per_class):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def read_all(path):
    meta = shards.read_metadata(path)
    cols = next(shards.iter_columns(path, ["image_id", "label", "path", "flip", "cls", "tokens"], rows=10**6))
    cols["tokens"] = cols["tokens"].reshape(len(cols["tokens"]), -1, meta["token_dim"])
    return meta, cols


def test_digits_encode_is_exact_and_decodes_back_to_the_pngs(digits, tmp_path):
    tok = PixelTokenizer(image_size=8, patch_size=2, pool=2)
    out = tmp_path / "s.parquet"
    meta = encode_folder(digits, out, tok, dtype="float32", batch_size=256, progress=False)
    assert meta["rows"] == 1797 and meta["bad_images"]["count"] == 0
    m, cols = read_all(out)
    assert m == meta and m["grid"] == [4, 4] and m["token_dim"] == 12 and m["cls_dim"] == 12
    items, _ = list_images(digits)
    assert cols["image_id"].tolist() == list(range(1797))
    assert cols["label"].tolist() == [i.label for i in items]
    assert pq.ParquetFile(out).metadata.num_row_groups == -(-1797 // 256)
    images = torch.from_numpy(np.stack([center_crop_arr(Image.open(i.path), 8) for i in items]))
    x = images.permute(0, 3, 1, 2).double() / 255
    back = tok.decode(torch.from_numpy(np.array(cols["tokens"])).double())
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)
    cls, _ = tok.encode(x.float())
    np.testing.assert_allclose(cols["cls"], cls.numpy(), rtol=0, atol=1e-6)


def test_shards_partition_the_folder_and_stored_flips_mirror(digits, tmp_path):
    tok = PixelTokenizer(image_size=8, patch_size=2, pool=2)
    seen = []
    for i in range(3):
        encode_folder(digits, tmp_path / f"{i}.parquet", tok, shard=i, num_shards=3, flip=True, progress=False)
        _, cols = read_all(tmp_path / f"{i}.parquet")
        assert cols["flip"].tolist() == [False, True] * (len(cols["flip"]) // 2)
        assert np.array_equal(cols["image_id"][0::2], cols["image_id"][1::2])
        a = tok.decode(torch.from_numpy(cols["tokens"][0::2].astype(np.float32)))
        b = tok.decode(torch.from_numpy(cols["tokens"][1::2].astype(np.float32)))
        torch.testing.assert_close(b, a.flip(-1), rtol=0, atol=2e-3)  # float16 storage
        seen.extend(cols["image_id"][0::2].tolist())
    assert seen == list(range(1797))


def test_complete_shard_is_not_redone_and_changed_settings_are(tmp_path):
    root = small_folder(tmp_path / "img")
    tok = PixelTokenizer(image_size=8)
    out = tmp_path / "s.parquet"
    first = encode_folder(root, out, tok, progress=False)
    stamp = out.stat().st_mtime_ns
    again = encode_folder(root, out, tok, progress=False)
    assert again["skipped"] and again["settings_digest"] == first["settings_digest"]
    assert out.stat().st_mtime_ns == stamp
    changed = encode_folder(root, out, tok, dtype="float32", progress=False)
    assert "skipped" not in changed and changed["settings_digest"] != first["settings_digest"]


def make_bad_images(root):
    small_folder(root)
    (root / "class0" / "empty.png").write_bytes(b"")
    (root / "class0" / "notes.jpg").write_text("not an image")
    good = root / "class1" / "0.png"
    data = good.read_bytes()
    (root / "class1" / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (3, 5)).save(root / "class1" / "tiny.png")
    return {"class0/empty.png", "class0/notes.jpg", "class1/truncated.png", "class1/tiny.png"}


def test_bad_images_skipped_logged_and_counted(tmp_path, capsys):
    root = tmp_path / "img"
    bad = make_bad_images(root)
    out = tmp_path / "s.parquet"
    meta = encode_folder(root, out, PixelTokenizer(image_size=8), min_side=8, progress=False, num_workers=1)
    err = capsys.readouterr().err
    assert meta["bad_images"]["count"] == 4 and meta["rows"] == 7
    assert {os.path.relpath(p, root) for p in meta["bad_images"]["paths"]} == bad
    assert all(str(root / b) in err for b in bad)
    _, cols = read_all(out)
    assert not set(cols["path"]) & bad and len(cols["path"]) == 7


def test_bad_image_fail_writes_nothing(tmp_path):
    root = tmp_path / "img"
    make_bad_images(root)
    out = tmp_path / "out" / "s.parquet"
    with pytest.raises(ValueError, match="empty.png: bad image"):
        encode_folder(root, out, PixelTokenizer(image_size=8), on_bad_image="fail", progress=False)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_an_error_mid_shard_leaves_no_file(tmp_path):
    root = small_folder(tmp_path / "img", (20, 20))

    class Broken(PixelTokenizer):
        calls = 0

        def encode(self, images):
            Broken.calls += 1
            if Broken.calls == 3:
                raise RuntimeError("device lost")
            return super().encode(images)

    out = tmp_path / "out" / "s.parquet"
    with pytest.raises(RuntimeError):
        encode_folder(root, out, Broken(image_size=8), batch_size=4, row_group_rows=4, progress=False)
    assert list(out.parent.iterdir()) == []


def test_kill_9_leaves_no_file_that_looks_complete(tmp_path):
    root = small_folder(tmp_path / "img", (40, 40))
    out = tmp_path / "out" / "s.parquet"
    script = f"""
import time, sys
from mmfm.data.encode import encode_folder
from mmfm.encoders import PixelTokenizer
class Slow(PixelTokenizer):
    def encode(self, images):
        print("batch", flush=True); time.sleep(0.2)
        return super().encode(images)
encode_folder({str(root)!r}, {str(out)!r}, Slow(image_size=8), batch_size=2, row_group_rows=2, progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # some row groups are on disk
        assert proc.stdout.readline() == "batch\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    left = list(out.parent.iterdir())
    assert all(p.name.startswith(".s.parquet.tmp") for p in left)
    for p in left:  # what is left is not a readable shard
        with pytest.raises(ValueError):
            shards.read_metadata(p)


def test_shard_opens_in_pandas_and_duckdb_with_metadata(tmp_path):
    import duckdb
    import pandas as pd

    root = small_folder(tmp_path / "img")
    out = tmp_path / "s.parquet"
    encode_folder(root, out, PixelTokenizer(image_size=8), flip=True, progress=False)
    df = pd.read_parquet(out)
    assert list(df.columns) == ["image_id", "label", "path", "flip", "cls", "tokens"]
    assert len(df) == 14 and df["path"][0] == "class0/0.png" and len(df["cls"][0]) == 12
    _, cols = read_all(out)
    grid = np.frombuffer(df["tokens"][3], np.float16).reshape(16, 12)  # the recipe in shards' docstring
    assert np.array_equal(grid, cols["tokens"][3])
    rows = duckdb.sql(f"select label, count(*) from '{out}' where not flip group by label order by label").fetchall()
    assert rows == [(0, 3), (1, 4)]
    assert duckdb.sql(f"select distinct octet_length(tokens) from '{out}'").fetchall() == [(16 * 12 * 2,)]
    kv = dict(duckdb.sql(f"select decode(key), decode(value) from parquet_kv_metadata('{out}')").fetchall())
    assert '"encoder": "pixels"' in kv["mmfm"]


def test_norm_stats_welford_equals_direct_float64_and_round_trips(digits, tmp_path):
    tok = PixelTokenizer(image_size=8, patch_size=2, pool=2)
    path = tmp_path / "stat.safetensors"
    norm = compute_norm_stats(digits, path, tok, num_images=500, seed=3, keep_mean=True, batch_size=64,
                              progress=False)
    items, _ = list_images(digits)
    pick = np.sort(np.random.default_rng(3).permutation(len(items))[:500])
    x = torch.from_numpy(np.stack([center_crop_arr(Image.open(items[i].path), 8) for i in pick]))
    x = x.permute(0, 3, 1, 2).float() / 255
    _, t = tok.encode(torch.cat([x, x.flip(-1)]))
    t = t.double()
    np.testing.assert_allclose(norm.var.numpy(), t.var(0, unbiased=True).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(norm.mean.numpy(), t.mean(0).numpy(), rtol=1e-6, atol=1e-7)
    loaded = load_norm_stats(path)
    assert torch.equal(loaded.var, norm.var) and torch.equal(loaded.mean, norm.mean)
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 16, 12))).float()
    torch.testing.assert_close(loaded.denormalize(loaded.normalize(z)), z, rtol=0, atol=1e-6)
    zn = loaded.normalize(t.float())
    live = norm.var > 1e-2  # the digits' border pixels are constant
    assert abs(zn.mean().item()) < 1e-4 and torch.allclose(zn.var(0)[live], torch.ones(()), atol=1e-3)


def test_variance_only_normalization_and_rae_stat_pt(tmp_path):
    var = torch.rand(6, 2, 3) + 0.1  # (D, H, W) as RAE stores it
    torch.save({"mean": None, "var": var}, tmp_path / "stat.pt")
    norm = load_norm_stats(tmp_path / "stat.pt")
    assert norm.mean is None and norm.shape == (6, 6)
    z = torch.randn(4, 6, 6)
    expected = z / torch.sqrt(var.flatten(1).T + 1e-5)  # token i = (h, w) row-major, channel last
    torch.testing.assert_close(norm.normalize(z), expected)
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected token grids"):
        norm.normalize(torch.randn(4, 5, 6))
    with pytest.raises(ValueError, match="no such normalization"):
        load_norm_stats(tmp_path / "missing.safetensors")


def test_encode_with_normalization_stores_normalized_tokens(tmp_path):
    root = small_folder(tmp_path / "img")
    tok = PixelTokenizer(image_size=8)
    raw = encode_folder(root, tmp_path / "raw.parquet", tok, dtype="float32", progress=False)
    norm = LatentNorm(np.full((16, 12), 4.0), np.full((16, 12), 0.25), source="test")
    meta = encode_folder(root, tmp_path / "n.parquet", tok, dtype="float32", norm=norm, progress=False)
    assert meta["normalization"]["mean"] and meta["normalization"]["eps"] == 1e-5
    assert raw["settings_digest"] != meta["settings_digest"]
    _, a = read_all(tmp_path / "raw.parquet")
    _, b = read_all(tmp_path / "n.parquet")
    np.testing.assert_allclose(b["tokens"], (a["tokens"] - 0.25) / np.sqrt(4.0 + 1e-5), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a["cls"], b["cls"])  # the descriptor is never normalized
    bad = LatentNorm(np.ones((4, 12)))
    with pytest.raises(ValueError, match="do not fit"):
        encode_folder(root, tmp_path / "x.parquet", tok, norm=bad, progress=False)


def test_cli_encode_and_norm_stats(digits, tmp_path, capsys):
    import json

    stat = tmp_path / "stat.safetensors"
    assert main(["norm-stats", "--images", str(digits), "--encoder", "pixels", "--image-size", "8",
                 "--num-images", "200", "--out", str(stat), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["grids"] == 400
    out = tmp_path / "s.parquet"
    assert main(["encode", "--images", str(digits), "--encoder", "pixels", "--image-size", "8",
                 "--norm-stats", str(stat), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 1797 and report["normalization"]["mean"] is False
    assert main(["encode", "--images", str(digits), "--encoder", "dinov2", "--encoder-path",
                 str(tmp_path / "no-such-model"), "--out", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err


# ------------------------------------------------------------ encoder.precision fp32, shards.dtype float16


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A 2-layer DINOv2-with-registers of width 32 (patch 7) saved like a hub snapshot; nothing is downloaded."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7,
        num_register_tokens=4))
    folder = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(folder)
    BitImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.3, 0.25, 0.2]).save_pretrained(folder)
    return folder


def _hf_tokenizer(folder, precision):
    """The tokenizer the workflow's encode job builds from the encoder section."""
    from mmfm.config import tokenizer_kwargs
    from mmfm.encoders import load_tokenizer

    return load_tokenizer(**tokenizer_kwargs({"name": "dinov2", "path": str(folder), "image_size": 32,
                                              "precision": precision}))


def test_fp32_encoding_stored_as_float16_is_the_fp32_output_rounded_once(tiny_dinov2, tmp_path):
    """encoder.precision fp32 + shards.dtype float16 (the presets): each stored value is the fp32 encoder's
    normalized output rounded to float16 once, bit for bit; bf16 is recorded and redoes the shard."""
    root = small_folder(tmp_path / "img", (5, 4), size=(40, 36))
    tok = _hf_tokenizer(tiny_dinov2, "fp32")
    assert (tok.grid, tok.token_dim, tok.input_size) == ((16, 16), 32, 112)
    norm = LatentNorm(np.random.default_rng(0).uniform(0.5, 2.0, (256, 32)), source="test")
    out = tmp_path / "s.parquet"
    kw = {"flip": True, "norm": norm, "dtype": "float16", "batch_size": 64, "progress": False}
    meta = encode_folder(root, out, tok, **kw)
    assert meta["precision"] == "fp32" and meta["dtype"] == "float16" and meta["rows"] == 18
    m, cols = read_all(out)
    assert m["precision"] == "fp32" and cols["tokens"].dtype == np.float16

    items, _ = list_images(root)
    x = torch.from_numpy(np.stack([center_crop_arr(Image.open(i.path), 32) for i in items]))
    x = x.permute(0, 3, 1, 2).float() / 255
    x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # image, mirror, image, ... (one batch, as encoded)
    cls, tokens = tok.encode(x)
    assert cls.dtype == tokens.dtype == torch.float32
    exact = norm.normalize(tokens)
    assert np.array_equal(cols["tokens"], exact.numpy().astype(np.float16))      # rounded once, from fp32
    assert np.array_equal(cols["cls"], cls.numpy())                               # the descriptor stays float32
    rel = np.abs(cols["tokens"].astype(np.float32) - exact.numpy()) / np.maximum(np.abs(exact.numpy()), 6.2e-5)
    assert rel.max() <= 2.0**-11 and cols["flip"].tolist() == [False, True] * 9

    fast = encode_folder(root, out, _hf_tokenizer(tiny_dinov2, "bf16"), **kw)  # another precision: redone
    assert "skipped" not in fast and fast["precision"] == "bf16" and fast["settings_digest"] != meta["settings_digest"]
    _, bf = read_all(out)
    diff = np.abs(bf["tokens"].astype(np.float32) - cols["tokens"].astype(np.float32))
    assert 0 < diff.mean() < 0.1                                                  # bf16 autocast is not fp32
    again = encode_folder(root, out, tok, **kw)
    assert "skipped" not in again and np.array_equal(read_all(out)[1]["tokens"], cols["tokens"])
    assert encode_folder(root, out, tok, **kw)["skipped"]


def test_fp32_float16_shards_through_the_gmm_stages_as_released(tiny_dinov2, tmp_path):
    """Shards as the presets write them (fp32 encoder, float16 tokens, stored mirrors) -> the CLS GMM on the
    originals -> the spatial statistics of the originals with the latent flip: every mean equals the float64
    mean of the stored float16 grids x_i and flip(x_i) of the originals in each mode."""
    from mmfm import io
    from mmfm.gmm import files
    from mmfm.gmm.fit import fit_cls_gmm
    from mmfm.gmm.spatial import spatial_reduce, spatial_stats

    root = small_folder(tmp_path / "img", (6, 6), size=(36, 40))
    tok = _hf_tokenizer(tiny_dinov2, "fp32")
    paths = [tmp_path / f"shard-{i:04d}.parquet" for i in range(2)]
    for i, p in enumerate(paths):
        encode_folder(root, p, tok, shard=i, num_shards=2, flip=True, dtype="float16", batch_size=4, progress=False)
    cls_path = tmp_path / "cls.safetensors"
    _, side = fit_cls_gmm(paths, 2, cls_path, init="from-data", seed=0, max_iter=20, rows="originals", plot=False,
                          progress=False)
    assert side["data"]["rows"] == 12 and side["settings"]["rows"] == "originals"
    parts = []
    for i, p in enumerate(paths):
        parts.append(tmp_path / f"part-{i}.safetensors")
        spatial_stats(p, cls_path, parts[-1], flip=True, rows_from="originals", rows=5)
    spatial_reduce(parts, tmp_path / "spatial.safetensors", weights="counts")
    got, meta = io.open_tensors(tmp_path / "spatial.safetensors")
    assert meta["rows_from"] == "originals" and meta["flip"] is True and meta["samples"] == 24

    rows = [next(shards.iter_columns(p, ["cls", "tokens"], rows=10**6, originals=True)) for p in paths]
    c = np.concatenate([r["cls"] for r in rows]).astype(np.float64)
    x = np.concatenate([r["tokens"] for r in rows]).astype(np.float64).reshape(12, 16, 16, 32)
    g = files.load_cls_gmm(cls_path)  # hard labels by the diagonal Gaussian log-joint, in numpy
    logp = (np.log(g.weights) - 0.5 * (np.log(2 * np.pi * g.variances).sum(1)
                                       + (((c[:, None] - g.means) ** 2) / g.variances).sum(2)))
    lab = logp.argmax(1)
    for k in range(2):
        sel = lab == k
        assert got["counts"][k] == 2 * sel.sum()
        if sel.any():
            both = np.concatenate([x[sel], x[sel][:, :, ::-1]])
            np.testing.assert_allclose(np.asarray(got["means"][k]).reshape(16, 16, 32), both.mean(0), rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_allclose(got["variances"][k], both.var(0).mean(), rtol=1e-5)


class NaNForWhite(PixelTokenizer):
    """A tokenizer stub whose latent is NaN for an all-white image (``cls`` too with ``cls=True``); with
    ``mirror_only`` only the second row of each image pair (its stored mirror) is spoiled."""

    def __init__(self, *a, cls=False, mirror_only=False, **kw):
        super().__init__(*a, **kw)
        self.spoil_cls, self.mirror_only = cls, mirror_only

    def encode(self, images):
        c, t = super().encode(images)
        white = images.flatten(1).min(1).values == 1.0
        if self.mirror_only:
            white &= torch.arange(len(images)) % 2 == 1
        t = t.clone()
        t[white, 0, :3] = float("nan")
        if self.spoil_cls:
            c = c.clone()
            c[white, 1] = float("inf")
        return c, t


def folder_with_white(root):
    small_folder(root)
    Image.new("RGB", (12, 10), (255, 255, 255)).save(root / "class1" / "white.png")
    return "class1/white.png"


@pytest.mark.parametrize("flip", [False, True])
def test_a_non_finite_latent_is_a_bad_image_skipped_and_counted(tmp_path, capsys, flip):
    root = tmp_path / "img"
    white = folder_with_white(root)
    out = tmp_path / "s.parquet"
    meta = encode_folder(root, out, NaNForWhite(image_size=8, cls=flip), flip=flip, batch_size=3, progress=False)
    reps = 2 if flip else 1
    assert meta["rows"] == 7 * reps and meta["bad_images"]["count"] == 1
    [example] = meta["bad_images"]["examples"]
    assert os.path.relpath(example["path"], root) == white and example["reason"].startswith("non-finite latent")
    assert "tokens: 3 of 192 values NaN/Inf" in example["reason"]
    assert ("cls: 1 of 12 values" in example["reason"]) == flip
    assert str(root / white) in capsys.readouterr().err
    m, cols = read_all(out)
    assert m["bad_images"] == meta["bad_images"] and white not in set(cols["path"]) and len(cols["path"]) == 7 * reps
    assert np.isfinite(cols["tokens"].astype(np.float32)).all() and np.isfinite(cols["cls"]).all()
    # the other images are encoded as by a tokenizer that never fails, in the same order
    good = tmp_path / "good.parquet"
    (root / white).unlink()
    encode_folder(root, good, PixelTokenizer(image_size=8), flip=flip, progress=False)
    _, want = read_all(good)
    assert np.array_equal(want["tokens"], cols["tokens"]) and list(want["path"]) == list(cols["path"])


def test_a_non_finite_mirror_alone_spoils_its_image(tmp_path):
    root = tmp_path / "img"
    white = folder_with_white(root)
    meta = encode_folder(root, tmp_path / "s.parquet", NaNForWhite(image_size=8, mirror_only=True), flip=True,
                         progress=False)
    [example] = meta["bad_images"]["examples"]
    assert example["path"].endswith(white) and "tokens of its mirror: 3 of 192" in example["reason"]
    assert meta["rows"] == 14


def test_a_non_finite_latent_fails_the_job_naming_the_image(tmp_path):
    root = tmp_path / "img"
    white = folder_with_white(root)
    out = tmp_path / "out" / "s.parquet"
    with pytest.raises(ValueError, match=rf"{white}: bad image \(non-finite latent \(tokens: 3 of 192"):
        encode_folder(root, out, NaNForWhite(image_size=8), on_bad_image="fail", progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_norm_stats_leave_a_non_finite_image_out(tmp_path):
    root = tmp_path / "img"
    white = folder_with_white(root)
    norm = compute_norm_stats(root, tmp_path / "n.safetensors", NaNForWhite(image_size=8), num_images=8,
                              flip=False, progress=False)
    assert np.isfinite(norm.var.numpy()).all()
    _, meta, _ = io.read_header(tmp_path / "n.safetensors")
    assert meta["images"]["count"] == 7 and [os.path.relpath(p, root) for p in meta["skipped_images"]] == [white]


def test_every_pillow_format_is_read_and_others_are_bad(tmp_path):
    """A .gif (animated: its first frame), .webp, .tiff and an upper-case .PNG are encoded; a .xyz file is
    counted as bad, with its path and the reason."""
    root = small_folder(tmp_path / "img", (2, 2))
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(root / "class0" / "anim.gif", save_all=True, append_images=frames[1:], loop=0)
    frames[0].save(root / "class0" / "still.webp", lossless=True)
    frames[1].save(root / "class1" / "page.tiff")
    frames[1].save(root / "class1" / "UPPER.PNG")
    (root / "class1" / "data.xyz").write_bytes(b"\x00" * 64)
    out = tmp_path / "s.parquet"
    tok = PixelTokenizer(image_size=8)
    meta = encode_folder(root, out, tok, dtype="float32", progress=False)
    assert meta["bad_images"]["count"] == 1 and meta["rows"] == 8
    [example] = meta["bad_images"]["examples"]
    assert example["path"].endswith("class1/data.xyz") and "unsupported extension '.xyz'" in example["reason"]
    _, cols = read_all(out)
    paths = list(cols["path"])
    assert {"class0/anim.gif", "class0/still.webp", "class1/page.tiff", "class1/UPPER.PNG"} <= set(paths)
    with Image.open(root / "class0" / "anim.gif") as gif:  # Pillow's first frame, as encode read it
        gif.load()
        first = torch.from_numpy(np.array(center_crop_arr(gif, 8))).permute(2, 0, 1)[None].float() / 255
    _, want = tok.encode(first)
    got = cols["tokens"][paths.index("class0/anim.gif")]
    np.testing.assert_allclose(got, want[0].numpy(), rtol=0, atol=1e-6)
    last = torch.from_numpy(np.array(center_crop_arr(frames[1], 8))).permute(2, 0, 1)[None].float() / 255
    _, second = tok.encode(last)
    assert not np.allclose(got, second[0].numpy(), atol=1e-3)  # not the last frame
    with pytest.raises(ValueError, match=r"data\.xyz: bad image \(unsupported extension '\.xyz'"):
        encode_folder(root, tmp_path / "f.parquet", tok, on_bad_image="fail", progress=False)
