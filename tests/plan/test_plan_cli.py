"""`mmfm plan` on the command line: what does not fit is named with its need and its limit (--strict exits 1),
the JSON line, an unknown --gpu, and configs the workflow would refuse (the same messages as snakemake)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmfm import config as mc
from mmfm.cli import main
from mmfm.plan import GPUS, PlanError, build_plan
from mmfm.plan.load import read_configfile, validate

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "workflow" / "presets" / "imagenet256-dinov2.yaml"
KEYS = {"jobs", "bytes_written", "host_memory_bytes", "gpu_memory_bytes_per_rank", "flops", "gpu_hours", "fits",
        "why"}


def demo(tmp_path: Path, **sections) -> Path:
    """config.yaml with some sections updated (one level deep), written to tmp_path."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            for k, v in value.items():
                cfg[key][k] = {**cfg[key][k], **v} if isinstance(v, dict) and isinstance(cfg[key].get(k), dict) else v
        else:
            cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["plan", "--no-cache", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def fake_train_memory(need=50 * 2**30, flops=10**15):
    calls = []

    def trace(settings, *, num_tokens, token_dim, cls_dim, num_modes, world_size, num_classes=1000):
        calls.append({"settings": settings, "world_size": world_size, "num_tokens": num_tokens,
                      "token_dim": token_dim, "num_modes": num_modes})
        return {"peak_bytes": need - 2**30, "need_bytes": need, "parts": {"parameters": 1}, "flops_per_step": flops,
                "flops_per_sample": flops / 64, "micro_batch": 32, "accumulation": 1}

    trace.calls = calls
    return trace


def test_unknown_gpu_lists_the_known_ones(capsys):
    rc, _, err = run(capsys, "--gpu", "v100-16gb")
    assert rc == 2
    assert "--gpu: unknown GPU 'v100-16gb'" in err
    for key in GPUS:
        assert key in err


def test_demo_json_is_the_last_line_after_the_totals(capsys, tmp_path):
    rc, out, _ = run(capsys, "--configfile", ROOT / "config.yaml", "--directory", tmp_path, "--json",
                     "--disk", "1TB")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[-3].startswith("total disk: ") and lines[-2].startswith("total GPU-hours: ")
    d = json.loads(lines[-1])
    assert {"rules", "total_bytes", "total_gpu_hours"} <= set(d)
    own = [s for s in mc.sampler_groups(yaml.safe_load((ROOT / "config.yaml").read_text())) if s]
    assert set(d["rules"]) == {"export_digits", "encode", "fit_cls_gmm", "spatial_stats", "spatial_gmm", "train",
                               "sample", "evaluate", "toy_r10", "report", "all",
                               *(f"{rule}{s}" for s in own for rule in ("sample", "evaluate"))}  # runs' own samplers
    for rule, r in d["rules"].items():
        assert KEYS <= set(r), rule
        assert r["fits"] and r["why"] == []
    # the demo asks for no GPU: no rule has a GPU part
    assert all(r["gpu_memory_bytes_per_rank"] is None and r["flops"] is None and r["gpu_hours"] is None
               for r in d["rules"].values())
    assert d["total_bytes"] == sum(r["bytes_written"] for r in d["rules"].values())
    assert d["total_gpu_hours"] == 0


def test_strict_names_the_job_the_need_and_the_limit(capsys, tmp_path):
    cfg = demo(tmp_path, resources={"spatial_gmm": {"mem_mb": 1}})
    rc, out, _ = run(capsys, "--configfile", cfg, "--directory", tmp_path, "--disk", "1TB")
    assert rc == 0  # without --strict it reports and succeeds
    assert "does not fit:" in out and "spatial_gmm: host memory 1 GB > mem_mb 1 (1 MB)" in out
    rc, out, _ = run(capsys, "--configfile", cfg, "--directory", tmp_path, "--disk", "1TB", "--strict")
    assert rc == 1


def test_disk_is_checked_against_the_space_given(capsys, tmp_path):
    rc, out, _ = run(capsys, "--configfile", ROOT / "config.yaml", "--directory", tmp_path, "--disk", "1kB",
                     "--strict", "--json")
    assert rc == 1
    d = json.loads(out.strip().splitlines()[-1])
    assert not d["disk_fits"] and d["disk_free"] == 1000
    assert "disk: " in out and "> 1 kB free" in out


def test_gpu_memory_and_runtime_against_the_gpu_and_the_profile(tmp_path):
    """The training trace (stubbed here; tests/plan/test_train_memory.py tests the real one) against the GPU's
    memory, and its hours against the allocations of ``runtime`` minutes that retries + 1 give."""
    cfg = demo(tmp_path, resources={"train": {"gpu": 2, "runtime": 30, "mem_mb": 100000}})
    trace = fake_train_memory(need=50 * 2**30, flops=2 * 10**14)
    plan = build_plan(cfg, gpu=GPUS["a100-40gb"], root=tmp_path, cache=None, train_memory=trace, disk=10**12)
    train = plan.rules["train"]
    assert {c["world_size"] for c in trace.calls} == {2}
    assert {(c["num_tokens"], c["token_dim"], c["num_modes"]) for c in trace.calls} == {(16, 12, 32)}
    assert train.gpu_memory_bytes_per_rank == 50 * 2**30
    hours = 200 * 2 * 10**14 / (0.4 * 19.5e12) / 3600  # config.yaml: 200 steps in fp32 (the fp32 peak)
    demo_cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    steps = [r.get("train", {}).get("steps", demo_cfg["train"]["steps"]) for r in demo_cfg["runs"].values()]
    assert 100 in steps  # dmf-gmm-mode fine-tunes for 100 steps, the others train 200
    assert train.gpu_hours == pytest.approx(sum(steps) / 200 * 2 * hours)  # every run of config.yaml, 2 GPUs each
    why = "\n".join(train.why)
    assert "train gauss-indep: GPU memory per rank 50.0 GiB" in why and "> a100-40gb's 40.0 GiB" in why
    # 85 min of training in allocations of 30 - 5 (stop lead) - 5 (restart) = 20 min: 5 > retries 1 + 1
    assert f"train gmm-mode: {hours:.1f} h of training" in why
    assert "need 5 allocations of runtime 30 min" in why and "> retries 1 + 1" in why
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_text("retries: 4\n")
    plan = build_plan(cfg, gpu=GPUS["a100-80gb"], root=tmp_path, cache=None, train_memory=trace, disk=10**12,
                      profile=profile)
    assert plan.rules["train"].fits  # 50 GiB fit an A100 80GB, and 5 allocations <= 4 + 1
    assert any("in 5 allocations of 30 min" in n for n in plan.rules["train"].notes)


def test_mfu_from_a_bench_result(capsys, tmp_path):
    cfg = demo(tmp_path, resources={"sample": {"gpu": 1}, "evaluate": {"gpu": 1}})
    bench = tmp_path / "bench.json"
    bench.write_text("some line\n" + json.dumps({"device": "NVIDIA H100 80GB HBM3", "mfu": 0.2}) + "\n")
    rc, out, _ = run(capsys, "--configfile", cfg, "--directory", tmp_path, "--mfu-from", bench, "--json",
                     "--disk", "1TB", "--gpu", "h100-80gb")
    assert rc == 0
    by_bench = json.loads(out.strip().splitlines()[-1])
    rc, out, _ = run(capsys, "--configfile", cfg, "--directory", tmp_path, "--mfu", "0.4", "--json", "--disk", "1TB",
                     "--gpu", "h100-80gb")
    default = json.loads(out.strip().splitlines()[-1])
    assert by_bench["mfu"] == 0.2 and "measured by mmfm bench train on NVIDIA H100 80GB HBM3" in by_bench["mfu_source"]
    for rule in ("sample", "evaluate"):
        assert by_bench["rules"][rule]["gpu_hours"] == pytest.approx(2 * default["rules"][rule]["gpu_hours"])
        assert by_bench["rules"][rule]["gpu_memory_bytes_per_rank"] > 0
    bench.write_text(json.dumps({"device": "cpu", "mfu": None}))
    rc, _, err = run(capsys, "--configfile", cfg, "--directory", tmp_path, "--mfu-from", bench)
    assert rc == 2 and "its mfu is None" in err


def smk_message(workdir: Path, configfile: Path) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "-n",
           "--cores", "1", "--configfile", str(configfile)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode != 0
    return res.stdout + res.stderr


@pytest.mark.parametrize("sections, message", [
    ({"gmm": {"k": 0}}, "invalid config:\n  gmm.k: 0 is less than the minimum of 1"),
    ({"runs": {"gmm-mode": {"sample": {"guide": "no-such-run"}}}},
     "invalid config: runs.gmm-mode.sample.guide: 'no-such-run' is neither a run"),
], ids=["schema", "check"])
def test_invalid_config_gives_snakemakes_message(capsys, tmp_path, sections, message):
    cfg = demo(tmp_path, **sections)
    rc, _, err = run(capsys, "--configfile", cfg, "--directory", tmp_path)
    assert rc == 2 and message in err
    assert message in smk_message(tmp_path, cfg)


def test_missing_artifacts_are_notes_and_a_wrong_kind_is_an_error(tmp_path):
    cfg, notes = validate(read_configfile(PRESET), tmp_path)
    keys = [n.split(":", 1)[0] for n in notes]
    assert keys == ["data.images", "encoder.path", "encoder.norm_stats", "decoder.path", "eval.reference",
                    "eval.inception"]
    assert cfg["data"]["num_images"] == 1281167 and cfg["data"]["images"] == "artifacts/imagenet/train"
    (tmp_path / "artifacts" / "imagenet").mkdir(parents=True)
    (tmp_path / "artifacts" / "imagenet" / "train").write_text("not a folder")
    with pytest.raises(PlanError, match=r"^invalid config: data\.images: artifacts/imagenet/train is not a folder$"):
        validate(read_configfile(PRESET), tmp_path)


def test_results_dir_names_the_files_and_keeps_the_bytes(capsys, tmp_path):
    def files(cfg):
        rc, out, _ = run(capsys, "--configfile", cfg, "--directory", tmp_path, "--json", "--disk", "1TB")
        assert rc == 0
        d = json.loads(out.strip().splitlines()[-1])
        return [(f["path"], f["bytes"], f["count"]) for r in d["rules"].values() for f in r["files"]], d["total_bytes"]

    default, total = files(ROOT / "config.yaml")
    moved, moved_total = files(demo(tmp_path, results_dir="out/mine"))
    assert moved_total == total and len(default) > 10
    assert moved == [("out/mine" + p[len("results"):], n, c) for p, n, c in default]


def test_a_second_sampler_counts_its_sets_and_its_curve(tmp_path):
    """sample.method [euler, heun] on one run: its one sample job writes both samplers' sets (heun's under
    samples/<run>/heun/, the method in each set's meta), its evaluate job both curves, the page both grids."""
    one = build_plan(demo(tmp_path), gpu=GPUS["a100-80gb"], root=tmp_path, cache=None, disk=10**12)
    cfg = demo(tmp_path, runs={"gmm-mode": {"sample": {"method": ["euler", "heun"]}}})
    two = build_plan(cfg, gpu=GPUS["a100-80gb"], root=tmp_path, cache=None, disk=10**12)
    nfes = yaml.safe_load((ROOT / "config.yaml").read_text())["eval"]["nfe"]
    files = {f.path: f for f in two.rules["sample_euler_heun"].files}
    assert two.rules["sample_euler_heun"].jobs == 1 and len(two.rules["sample_euler_heun"].per_job) == 2 * len(nfes)
    for n in nfes:
        euler, heun = files[f"results/samples/gmm-mode/nfe-{n}.npz"], files[f"results/samples/gmm-mode/heun/nfe-{n}.npz"]
        assert abs(heun.nbytes - euler.nbytes) <= 16  # the same arrays; the meta JSON says heun, its evaluations
        assert f"results/samples/gmm-mode/heun/nfe-{n}.png" in files
    assert {f.path for f in two.rules["evaluate_euler_heun"].files} == {
        "results/eval/gmm-mode/nfe_curve.csv", "results/eval/gmm-mode/heun/nfe_curve.csv", "results/eval/gmm-mode/final.json"}
    assert two.rules["sample"].jobs == one.rules["sample"].jobs - 1
    page = lambda p: next(f.nbytes for f in p.rules["report"].files if f.path.endswith("page.html"))  # noqa: E731
    assert page(two) > page(one)  # heun's grids inlined too
