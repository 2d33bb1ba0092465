"""mmfm.report: summary.json (targets on the evaluated grid, ratios, stages, what each run is, the floor, runs
still missing)."""

import csv
import json

import pytest
from PIL import Image

from mmfm import report
from mmfm.toy import r10

BENCH_HEAD = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"

# fd over steps 100..400; the baseline ends at 5.0
FD = {
    "gauss": [10.0, 8.0, 6.0, 5.0],
    "mode": [7.0, 4.9, 5.5, 3.0],  # first <= 5 at 200 (not monotone afterwards)
    "indep": [9.0, 6.0, 5.0, 4.0],  # reaches it exactly (<=) at 300
    "never": [9.0, 8.0, 7.0, 6.0],
}
NFES = (1, 2, 4, 8, 16, 32)
NFE_FD = {
    "gauss": [50.0, 30.0, 20.0, 12.0, 8.0, 6.0],  # default target 6.0, reached first at 32
    "mode": [40.0, 15.0, 6.0, 5.0, 4.0, 3.9],  # 6.0 reached (==) at 4
    "indep": [45.0, 25.0, 14.0, 9.0, 7.0, 6.5],  # never reaches 6.0
    "never": [60.0, 40.0, 30.0, 20.0, 15.0, 12.0],
}


def _write_fd(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "nfe", "fd"])
        w.writerows(rows)


def _run(root, name, n_metrics=400):
    d = root / name
    d.mkdir(parents=True)
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "grad_norm", "samples_per_s"])
        for s in range(1, n_metrics + 1):
            w.writerow([s, f"{2.0 / s ** 0.5 + 0.01 * (s % 7):.6g}", "1e-4", "0.5", "1000"])
    _write_fd(d / "fd.csv", [(100 * (i + 1), 20, v) for i, v in enumerate(FD[name])])
    # an older evaluation (step 200, all good) that must be ignored: only the largest step counts
    _write_fd(root / f"{name}-nfe.csv", [(200, n, 1.0) for n in NFES]
              + [(400, n, v) for n, v in reversed(list(zip(NFES, NFE_FD[name])))])
    return {"run_dir": d, "samples": root / f"{name}.npz", "nfe_curve": root / f"{name}-nfe.csv", "metric": "fd"}


def _bench(folder, rel, rows):
    p = folder / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(BENCH_HEAD + "".join(f"{s}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t1\n" for s, rss in rows))


@pytest.fixture
def runs(tmp_path):
    return {name: _run(tmp_path / "runs", name) for name in FD}


@pytest.fixture
def bench(tmp_path):
    b = tmp_path / "benchmarks"
    _bench(b, "train/run=gauss.tsv", [(100.5, 2000.0)])
    _bench(b, "train/run=mode.tsv", [(80.0, "-")])
    _bench(b, "train/run=indep.tsv", [("NA", 1500.0)])
    _bench(b, "sample/run=gauss/seed=0.tsv", [(4.5, 800.0)])
    _bench(b, "fit_gmm.tsv", [(10.0, 300.0), (20.0, 350.0)])  # two repeats: mean s, max rss
    _bench(b, "report.tsv", [("-", "NA")])
    return b


@pytest.fixture
def toy_json(tmp_path):
    rows = [{"setting": s, "source": src, "coupling": c, "len": round(1.5 + 0.1 * i, 4), "w2": 1.3, "w2_floor": 1.2,
             "paper_len": p[0], "paper_w2": p[1], "seconds": 0.1} for i, ((s, src, c), p) in enumerate(r10.PAPER.items())]
    return r10.write_outputs(rows, r10.R10Config(), tmp_path / "toy")["json"]


def test_summary_targets_ratios_stages(tmp_path, runs, bench, toy_json):
    runs["indep"]["final"] = tmp_path / "indep-fid.json"
    (tmp_path / "indep-fid.json").write_text(json.dumps({"fid": 3.21, "n": 100}))
    runs["indep"]["metric"] = "fid"
    out = tmp_path / "results" / "summary.json"
    s = report.summarize(runs, baseline="gauss", out=out, toy_r10=toy_json, benchmarks=bench)
    assert json.loads(out.read_text()) == s
    assert sorted(p.name for p in out.parent.iterdir()) == ["summary.json"]  # no temp file left
    assert s["baseline"] == "gauss" and s["steps_target"] == 5.0 and s["nfe_target"] == 6.0
    r = s["runs"]
    assert {k: r[k]["steps_to_baseline_final"] for k in r} == {"gauss": 400, "mode": 200, "indep": 300, "never": None}
    assert {k: r[k]["steps_ratio"] for k in r} == {"gauss": 1.0, "mode": 2.0, "indep": pytest.approx(4 / 3),
                                                   "never": None}
    assert {k: r[k]["nfe_for_target"] for k in r} == {"gauss": 32, "mode": 4, "indep": None, "never": None}
    assert {k: r[k]["nfe_ratio"] for k in r} == {"gauss": 1.0, "mode": 8.0, "indep": None, "never": None}
    assert r["mode"]["final"] == 3.0 and r["indep"]["final"] == 3.21 and r["indep"]["metric"] == "fid"
    assert r["mode"]["fd_over_steps"] == [[100, 7.0], [200, 4.9], [300, 5.5], [400, 3.0]]
    assert r["mode"]["steps"] == 400 and r["mode"]["final_loss"] == pytest.approx(2.0 / 20 + 0.01 * (400 % 7))
    assert r["mode"]["samples"].endswith("mode.npz")
    assert r["gauss"]["wall_s"] == pytest.approx(105.0) and r["mode"]["wall_s"] == 80.0 and r["indep"]["wall_s"] is None
    assert s["stages"] == {
        "fit_gmm": {"jobs": 1, "wall_s": 15.0, "max_s": 15.0, "peak_mem_mb": 350.0},
        "report": {"jobs": 1, "wall_s": None, "max_s": None, "peak_mem_mb": None},
        "sample": {"jobs": 1, "wall_s": 4.5, "max_s": 4.5, "peak_mem_mb": 800.0},
        "train": {"jobs": 3, "wall_s": 180.5, "max_s": 100.5, "peak_mem_mb": 2000.0},
    }
    toy = s["toy_r10"]["rows"]
    assert len(toy) == 6 and toy[2]["len"] == 1.7 and (toy[2]["paper_len"], toy[2]["paper_w2"]) == (1.67, 1.248)
    assert set(s["toy_r10"]["claims"]) == {"compact", "spread"}


def test_explicit_nfe_target_and_no_extras(tmp_path, runs):
    s = report.summarize(runs, baseline="gauss", out=tmp_path / "s.json", nfe_target=13.0)
    r = s["runs"]
    assert {k: r[k]["nfe_for_target"] for k in r} == {"gauss": 8, "mode": 4, "indep": 8, "never": 32}
    assert r["mode"]["nfe_ratio"] == 2.0 and r["never"]["nfe_ratio"] == 0.25
    assert s["stages"] == {} and s["toy_r10"] is None and r["gauss"]["wall_s"] is None


def test_read_benchmarks_na(bench):
    recs = {(r["rule"], r["wildcards"]): r for r in report.read_benchmarks(bench)}
    assert set(recs) == {("train", "run=gauss"), ("train", "run=mode"), ("train", "run=indep"),
                         ("sample", "run=gauss/seed=0"), ("fit_gmm", ""), ("report", "")}
    assert (recs[("train", "run=mode")]["s"], recs[("train", "run=mode")]["max_rss"]) == (80.0, None)
    assert (recs[("train", "run=indep")]["s"], recs[("train", "run=indep")]["max_rss"]) == (None, 1500.0)
    assert recs[("fit_gmm", "")]["s"] == 15.0 and recs[("fit_gmm", "")]["repeats"] == 2


def test_errors_name_the_file(tmp_path, runs, bench):
    fd = runs["mode"]["run_dir"] / "fd.csv"
    fd.write_text("step,nfe,value\n100,20,3.0\n")
    with pytest.raises(ValueError, match=r"fd\.csv: missing column\(s\) \['fd'\]") as err:
        report.summarize(runs, baseline="gauss", out=tmp_path / "s.json")
    assert str(fd) in str(err.value) and not (tmp_path / "s.json").exists()
    fd.write_text("step,nfe,fd\n100,20,oops\n")
    with pytest.raises(ValueError, match="malformed row") as err:
        report.read_curve(fd)
    assert str(fd) in str(err.value)
    fd.unlink()
    with pytest.raises(FileNotFoundError, match="fd.csv: no such file"):
        report.summarize(runs, baseline="gauss", out=tmp_path / "s.json")
    bad = bench / "train" / "run=bad.tsv"
    bad.write_text("s\th:m:s\n1.0\t0:00:01\n")
    with pytest.raises(ValueError, match=r"run=bad\.tsv: missing column\(s\) \['max_rss'\]"):
        report.read_benchmarks(bench)
    bad.write_text(BENCH_HEAD + "fast\t0\t1\t1\t1\t1\t0\t0\t50\t1\n")
    with pytest.raises(ValueError, match=r"run=bad\.tsv: line 2, column 's': not a number"):
        report.read_benchmarks(bench)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report.read_benchmarks(tmp_path / "nowhere")
    _write_fd(fd, [(100, 20, 3.0)])
    runs["gauss"]["final"] = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        report.summarize(runs, baseline="gauss", out=tmp_path / "s.json")
    with pytest.raises(ValueError, match="baseline 'x'"):
        report.summarize(runs, baseline="x", out=tmp_path / "s.json")
    toy = tmp_path / "r10.json"
    toy.write_text(json.dumps({"rows": [{"setting": "compact"}]}))
    with pytest.raises(ValueError, match="r10.json: not an r10.json"):
        report.read_r10(toy)


def test_summary_and_report_show_the_bad_images(tmp_path, runs):
    """summary.json's ``data`` and the summary page count the images encoded and name the first bad ones,
    from the shards' metadata (encoded here with a bad file of each kind over two shards)."""
    import numpy as np

    from mmfm.data import shards
    from mmfm.data.encode import encode_folder
    from mmfm.encoders import PixelTokenizer

    folder = tmp_path / "img"
    rng = np.random.default_rng(0)
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    (folder / "c0" / "broken.png").write_bytes(b"not a png")
    (folder / "c1" / "notes.xyz").write_text("?")
    (folder / "c1" / "z.gif").write_bytes(b"GIF89a")  # truncated
    paths = [tmp_path / "shards" / f"shard-{i}.parquet" for i in range(2)]
    for i, p in enumerate(paths):
        encode_folder(folder, p, PixelTokenizer(image_size=8), shard=i, num_shards=2, flip=True, progress=False)
    s = report.summarize(runs, baseline="gauss", out=tmp_path / "s.json", shards=paths)
    data = json.loads((tmp_path / "s.json").read_text())["data"]
    assert data == s["data"] and data["images"] == 8 and data["bad_images"] == 3
    assert [e["path"].rsplit("/", 2)[-2:] for e in data["bad_examples"]] == [["c0", "broken.png"], ["c1", "notes.xyz"],
                                                                              ["c1", "z.gif"]]
    assert "unsupported extension '.xyz'" in data["bad_examples"][1]["reason"]
    assert all(e["reason"] for e in data["bad_examples"])
    few = report.read_images(paths, examples=2)
    assert few["bad_images"] == 3 and len(few["bad_examples"]) == 2
    assert data["classes"] == 2
    assert "1 more in the shards" in report.images_line(few)
    # shards of another tool (no bad-image record) count their original rows and no bad image
    other = tmp_path / "other.parquet"
    shards.write_shard(other, {"flip": np.array([False, True, False]), "cls": np.zeros((3, 2), np.float32)}, {})
    assert report.read_images([other]) == {"images": 2, "classes": None, "bad_images": 0, "bad_examples": []}
    with pytest.raises(FileNotFoundError, match="missing.parquet: no such file"):
        report.read_images([tmp_path / "missing.parquet"])
    assert report.summarize(runs, baseline="gauss", out=tmp_path / "t.json")["data"] is None


def test_summary_records_what_each_run_is_and_its_nfe_curve(tmp_path, runs, bench):
    for name, spec in runs.items():
        spec.update(description=f"the {name} run", method="fm", source="gmm" if name != "gauss" else "gaussian",
                    coupling="mode-soft", conditioning="none", model="ditdh-demo", final_nfe=32, final_samples=512)
    runs["mode"]["sampler"] = "heun"
    s = report.summarize(runs, baseline="gauss", out=tmp_path / "s.json", benchmarks=bench,
                         fd_eval={"metric": "fd"}, fd_floor={"512": 0.8})
    r = s["runs"]["mode"]
    assert r["fd_over_nfe"] == {"heun": [[n, v] for n, v in zip(NFES, NFE_FD["mode"])]}  # the last step's rows
    assert s["runs"]["gauss"]["fd_over_nfe"] == {"euler": [[n, v] for n, v in zip(NFES, NFE_FD["gauss"])]}
    assert (r["description"], r["method"], r["source"], r["model"], r["status"]) == \
        ("the mode run", "fm", "gmm", "ditdh-demo", "complete")
    assert (r["final_nfe"], r["final_samples"]) == (32, 512) and s["fd_floor"] == {"512": 0.8}
    assert [j["rule"] for j in s["jobs"]].count("train") == 3 and s["missing"] == []
    labels = [p["label"] for p in s["paper"]["imagenet_fid"]]
    assert labels == ["Gaussian baseline", "GMM source + mode coupling, unconditional network", "+ mode-conditional network"]
    assert [p["fid"] for p in s["paper"]["imagenet_fid"]] == [9.33, 3.82, 3.18]
    assert [p["conditioning"] for p in s["paper"]["imagenet_fid"]] == ["none", "none", "mode"]


def test_every_sampler_of_a_run_is_a_curve_the_headline_gives_the_targets(tmp_path, runs):
    """nfe_curves {sampler: csv}: fd_over_nfe has one entry per sampler, the headline (``sampler``) first; the
    NFE target and ratio are the headline curve's; a further curve still missing is listed, not fatal."""
    heun = tmp_path / "mode-heun.csv"
    _write_fd(heun, [(400, n, v / 10) for n, v in zip(NFES, NFE_FD["mode"])])
    runs["mode"]["nfe_curves"] = {"euler": runs["mode"]["nfe_curve"], "heun": heun}
    s = report.summarize(runs, baseline="gauss", out=tmp_path / "s.json")
    fd = s["runs"]["mode"]["fd_over_nfe"]
    assert list(fd) == ["euler", "heun"]
    assert fd["euler"] == [[n, v] for n, v in zip(NFES, NFE_FD["mode"])]
    assert fd["heun"] == [[n, v / 10] for n, v in zip(NFES, NFE_FD["mode"])]
    assert s["runs"]["mode"]["nfe_for_target"] == 4  # the headline's, not heun's (4.0 at NFE 1)
    assert list(json.loads((tmp_path / "s.json").read_text())["runs"]["mode"]["fd_over_nfe"]) == ["euler", "heun"]
    heun.unlink()
    with pytest.raises(FileNotFoundError):
        report.summarize(runs, baseline="gauss", out=None)
    s = report.summarize(runs, baseline="gauss", out=None, strict=False)
    assert s["runs"]["mode"]["fd_over_nfe"]["heun"] == [] and s["runs"]["mode"]["status"] == "complete"
    assert [m["path"] for m in s["missing"]] == [str(heun)]


def test_a_run_still_training_is_listed_as_missing_not_an_error(tmp_path, runs):
    (runs["indep"]["run_dir"] / "fd.csv").unlink()
    runs["indep"]["nfe_curve"].unlink()
    (runs["never"]["run_dir"] / "metrics.csv").write_text("step,loss\n1,0.5\nhalf")  # a line being written
    with pytest.raises(FileNotFoundError):
        report.summarize(runs, baseline="gauss", out=tmp_path / "s.json")
    s = report.summarize(runs, baseline="gauss", out=tmp_path / "s.json", strict=False)
    assert s["runs"]["indep"]["status"] == "missing" and s["runs"]["indep"]["fd_over_nfe"] == {"euler": []}
    assert s["runs"]["mode"]["status"] == "complete" and s["runs"]["mode"]["steps_ratio"] == 2.0
    missing = {m["path"]: m["reason"] for m in s["missing"]}
    assert missing[str(runs["indep"]["run_dir"] / "fd.csv")] == "not there (yet)"
    assert missing[str(runs["indep"]["nfe_curve"])] == "not there (yet)"
    assert "unreadable" in missing[str(runs["never"]["run_dir"] / "metrics.csv")]
    assert s["runs"]["never"]["steps"] is None and s["runs"]["never"]["fd_over_nfe"]["euler"]


def test_fd_floor_is_the_distance_of_two_real_samples(tmp_path):
    """On standard-normal "tokens", the floor equals the mean distance between fresh independent samples of
    the same sizes (pytorch-fid's formula on new draws: what a perfect model would score), and falls with n."""
    import numpy as np
    from pytorch_fid.fid_score import calculate_frechet_distance

    from mmfm.data import shards

    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(600, 3, 2)).astype(np.float32)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"shard-{i}.parquet")
        shards.write_shard(paths[-1], {"tokens": tokens[300 * i:300 * (i + 1)], "label": np.zeros(300, np.int64)},
                           {"grid": [3, 1], "token_dim": 2})
    floor = report.fd_floor(paths, [50, 200, 499, 1], rows=500, draws=40)
    assert set(floor) == {"50", "200"}  # one row on a side gives no floor
    assert floor["50"] > floor["200"]

    def fresh(n, m, reps=200):
        vals = []
        for _ in range(reps):
            a, b = rng.normal(size=(n, 6)), rng.normal(size=(m, 6))
            vals.append(calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
        return float(np.mean(vals))

    assert floor["50"] == pytest.approx(fresh(50, 450), rel=0.15)
    assert floor["200"] == pytest.approx(fresh(200, 300), rel=0.15)
