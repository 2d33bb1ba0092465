import errno
import json
import os
import pickle

import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.mixture import GaussianMixture

from mmfm import io
from mmfm.cli import main
from mmfm.data import shards
from mmfm.gmm import files
from mmfm.gmm.em import DiagonalGMM
from mmfm.gmm.released import import_released


def blobs(n=600, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, d)) * 6
    return (c[rng.integers(0, k, n)] + rng.standard_normal((n, d))).astype(np.float32)


def test_tensor_files_are_standard_safetensors_and_memory_mapped(tmp_path):
    t = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], np.int64), "e": np.zeros((0, 2))}
    path = tmp_path / "x.safetensors"
    io.save_tensors(path, t, {"kind": "test", "n": 3})
    ref = load_file(path)  # the safetensors library reads our file
    for k in t:
        assert np.array_equal(ref[k], t[k]) and ref[k].dtype == t[k].dtype
    maps, meta = io.open_tensors(path)
    assert isinstance(maps["a"], np.memmap) and meta == {"kind": "test", "n": 3}
    assert np.array_equal(maps["a"], t["a"])


def test_tensor_file_without_commit_or_with_error_leaves_nothing(tmp_path):
    path = tmp_path / "y.safetensors"
    with pytest.raises(RuntimeError, match="without commit"):
        with io.TensorFile(path, {"a": ((2,), np.float32)}):
            pass
    with pytest.raises(KeyError):
        with io.TensorFile(path, {"a": ((2,), np.float32)}) as f:
            f["missing"]
    assert list(tmp_path.iterdir()) == []


def test_cls_gmm_roundtrip_and_source(tmp_path):
    rng = np.random.default_rng(0)
    g = DiagonalGMM(np.full(3, 1 / 3), rng.standard_normal((3, 4)), rng.uniform(0.5, 2, (3, 4)))
    path = tmp_path / "g.safetensors"
    files.save_cls_gmm(path, g, {"note": "x"})
    back = files.load_cls_gmm(path)
    assert np.array_equal(back.means, g.means) and np.array_equal(back.variances, g.variances)
    assert files.read_sidecar(path)["note"] == "x"
    src = files.load_source(path)
    assert src.covariance == "diag" and src.event_shape == (4,)


def test_fit_gmm_cli_writes_fit_files_from_parquet_and_npy(tmp_path, capsys):
    x = blobs()
    folder = tmp_path / "shards"
    for i in range(3):
        shards.write_shard(folder / f"s{i}.parquet", {"cls": x[i * 200:(i + 1) * 200]}, {"encoder": "t"})
    np.save(tmp_path / "cls.npy", x)
    outs = {}
    for name, inp, extra in [("pq", str(folder), []), ("glob", str(folder / "s*.parquet"), ["--stream"]),
                             ("npy", str(tmp_path / "cls.npy"), [])]:
        out = tmp_path / f"{name}.safetensors"
        assert main(["fit-gmm", "--input", inp, "--k", "3", "--out", str(out), "--seed", "1", "--json", *extra]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["rows"] == 600 and line["k"] == 3
        outs[name] = files.load_cls_gmm(out)
        side = files.read_sidecar(out)
        assert side["settings"]["k"] == 3 and len(side["fit"]["loglik"]) == side["fit"]["n_iter"]
        assert side["data"]["fingerprint"] and (tmp_path / f"{name}_weights.png").stat().st_size > 0
    # the same data however it is read: the same mixture
    assert np.array_equal(outs["pq"].means, outs["npy"].means)
    assert np.array_equal(outs["pq"].means, outs["glob"].means)
    sk = GaussianMixture(3, covariance_type="diag", random_state=0).fit(x)
    assert np.allclose(np.sort(outs["npy"].weights), np.sort(sk.weights_), atol=1e-3)


def test_fit_gmm_bad_input_writes_nothing(tmp_path, capsys):
    x = blobs(n=50)
    np.save(tmp_path / "a.npy", x)
    out = tmp_path / "g.safetensors"
    assert main(["fit-gmm", "--input", str(tmp_path / "a.npy"), "--k", "60", "--out", str(out)]) == 2
    assert "k: 60 components but the data has only 50 rows" in capsys.readouterr().err
    x[3, 1] = np.inf
    np.save(tmp_path / "b.npy", x)
    assert main(["fit-gmm", "--input", str(tmp_path / "b.npy"), "--k", "2", "--out", str(out)]) == 2
    assert "b.npy rows 0..49: 1 row(s) hold NaN or Inf" in capsys.readouterr().err
    assert main(["fit-gmm", "--input", str(tmp_path / "nope"), "--k", "2", "--out", str(out)]) == 2
    assert "nope: no such file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]


def test_import_requires_allow_pickle_and_converts_cls_and_spatial(tmp_path, capsys):
    x = blobs().astype(np.float64)
    sk = GaussianMixture(3, covariance_type="diag", random_state=0).fit(x)
    pkl = tmp_path / "gmm_n3_diag_k-means++.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": sk, "labels": sk.predict(x), "config": {"covariance_type": "diag"}}, f)
    out = tmp_path / "cls.safetensors"
    assert main(["import-gmm", "--pickle", str(pkl), "--out", str(out)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main(["import-gmm", "--pickle", str(pkl), "--out", str(out), "--allow-pickle"]) == 0
    assert "executes code" in capsys.readouterr().err
    g = files.load_cls_gmm(out)
    assert np.array_equal(g.means, sk.means_) and np.array_equal(g.variances, sk.covariances_)

    # a released-style spatial GMM: means flattened channels-first (C, H, W)
    k, c, h = 4, 6, 2
    rng = np.random.default_rng(1)
    grid = rng.standard_normal((k, c, h, h))
    spatial = {"means": grid.reshape(k, -1), "variances": rng.uniform(0.5, 1, k), "weights": np.full(k, 0.25),
               "cluster_counts": np.arange(k), "config": {"covariance_type": "spherical", "flip_augmentation": True}}
    pkl2 = tmp_path / "spatial.pkl"
    pkl2.write_bytes(pickle.dumps(spatial))
    out2 = tmp_path / "spatial.safetensors"
    import_released(pkl2, out2, allow_pickle=True, channels=c)
    t, meta = io.open_tensors(out2)
    assert t["means"].shape == (k, h * h, c)
    # token (i, j) of mode m is channel vector grid[m, :, i, j]
    assert np.allclose(t["means"][2, 1 * h + 0], grid[2, :, 1, 0])
    assert meta["flip"] is True and meta["grid"] == [h, h]
    with pytest.raises(ValueError, match="--channels"):
        import_released(pkl2, tmp_path / "bad.safetensors", allow_pickle=True, channels=5)


def test_bench_gmm_cli_prints_one_json_line(capsys):
    args = ["--n", "3000", "--d", "8", "--k", "16", "--iters", "3", "--repeats", "1", "--json"]
    assert main(["bench", "gmm", *args]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ours_s", "sklearn_s", "ours_per_iter_s", "speedup_vs_sklearn", "loglik_rel_diff", "gemm_bound_s"):
        assert result[key] > 0
    assert result["loglik_rel_diff"] < 1e-4  # the same algorithm from the same start


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_import_refuses_globals_a_gmm_pickle_does_not_need(tmp_path):
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(ValueError, match=r"evil\.pkl: refusing to load global (posix|os|nt)\.system"):
        import_released(pkl, tmp_path / "out.safetensors", allow_pickle=True)
    assert not (tmp_path / "out.safetensors").exists()


def small_gmm(k=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return DiagonalGMM(np.full(k, 1 / k), rng.standard_normal((k, d)), rng.uniform(0.5, 2, (k, d)))


def test_verify_checks_tensors_against_metadata_and_sidecar(tmp_path):
    from mmfm.recover import CorruptArtifact

    path = tmp_path / "g.safetensors"
    files.save_cls_gmm(path, small_gmm(), {"note": "x"})
    assert files.verify(path)["k"] == 3 and files.verify(path)["note"] == "x"
    side = json.loads(io.sidecar_path(path).read_text())
    io.write_json(io.sidecar_path(path), {**side, "k": 5})
    with pytest.raises(CorruptArtifact, match=r"g.json: 'k' is 5 but g.safetensors records 3") as e:
        files.verify(path)
    assert e.value.path == io.sidecar_path(path)
    with pytest.raises(CorruptArtifact, match="g.json"):
        files.read_sidecar(path)
    # header metadata and tensors disagree (no sidecar)
    g = small_gmm()
    other = tmp_path / "h.safetensors"
    io.save_tensors(other, {"weights": g.weights, "means": g.means, "variances": g.variances},
                    {"kind": files.CLS_KIND, "k": 4, "dim": 4, "covariance": "diag"})
    with pytest.raises(CorruptArtifact, match=r"h.safetensors: tensor 'weights' has shape \(3,\), its metadata imply \(4,\)"):
        files.verify(other)
    io.save_tensors(other, {"weights": g.weights}, {"kind": "something"})
    with pytest.raises(CorruptArtifact, match="not a GMM file"):
        files.verify(other)


def test_verify_spatial_gmm_shapes(tmp_path):
    from mmfm.recover import CorruptArtifact

    k, c, h = 4, 6, 2
    rng = np.random.default_rng(1)
    spatial = {"means": rng.standard_normal((k, c * h * h)), "variances": rng.uniform(0.5, 1, k),
               "weights": np.full(k, 0.25), "config": {"covariance_type": "spherical"}}
    pkl = tmp_path / "spatial.pkl"
    pkl.write_bytes(pickle.dumps(spatial))
    out = tmp_path / "spatial.safetensors"
    import_released(pkl, out, allow_pickle=True, channels=c)
    assert files.verify(out)["grid"] == [h, h]
    side = json.loads(io.sidecar_path(out).read_text())
    meta = io.read_header(out)[1]
    io.save_tensors(out, dict(io.open_tensors(out)[0]), {**meta, "token_dim": 3, "grid": [2, 4]})
    io.write_json(io.sidecar_path(out), {**side, "token_dim": 3, "grid": [2, 4]})
    with pytest.raises(CorruptArtifact, match=r"tensor 'means' has shape \(4, 4, 6\), spatial.json and its header "
                                              r"imply \(4, 8, 3\)"):
        files.verify(out)


def test_damaged_gmm_file_is_named(tmp_path):
    from mmfm.recover import CorruptArtifact

    path = tmp_path / "g.safetensors"
    files.save_cls_gmm(path, small_gmm(), {})
    os.truncate(path, path.stat().st_size - 8)
    for read in (files.load_cls_gmm, files.load_source, files.verify):
        with pytest.raises(CorruptArtifact, match=r"g.safetensors: not a complete safetensors file \(truncated"):
            read(path)


def test_full_disk_leaves_the_previous_fit_and_sidecar(tmp_path, monkeypatch):
    path = tmp_path / "g.safetensors"
    files.save_cls_gmm(path, small_gmm(seed=0), {"note": "first"})
    before = path.read_bytes(), io.sidecar_path(path).read_text()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(io.DiskFull, match=r"g.safetensors: no space left on the device \(needs \d+ bytes"):
        files.save_cls_gmm(path, small_gmm(seed=1), {"note": "second"})
    assert (path.read_bytes(), io.sidecar_path(path).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.safetensors"]
