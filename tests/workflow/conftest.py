"""Shared by the workflow tests: run this checkout's Snakefile in any directory, read a dry run's plan, and
the tiny demo DAG, run once per test session (``demo``) for test_workflow.py and test_faults.py.

A test that changes anything in the demo works on a copy: ``shutil.copytree(workdir, tmp_path / "copy",
symlinks=True)`` keeps the files' times, so the copy is as up to date as the original."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY_RUNS = ("gauss-indep", "gmm-mode")


def smk_cmd(workdir: Path, *args: str) -> list[str]:
    """The command line ``snakemake -s <this checkout's Snakefile> --directory workdir ARGS``."""
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]


def smk(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``snakemake`` in ``workdir`` (this checkout's Snakefile, any working directory); raise with its
    output when it fails and ``check``."""
    cmd = smk_cmd(workdir, *args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def planned(workdir: Path, *args: str) -> list[tuple[str, dict]]:
    """The jobs a dry run plans: ``[(rule, wildcards), ...]``."""
    res = smk(workdir, "-n", "--cores", "1", *args)
    text = res.stdout + res.stderr
    if "Nothing to be done" in text:
        return []
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        w = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        jobs.append((m.group(1), dict(kv.split("=", 1) for kv in w.group(1).split(", ")) if w else {}))
    return jobs


def tiny_config() -> dict:
    """config.yaml with two runs, a few training steps, few samples and a tiny toy."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["runs"] = {r: cfg["runs"][r] for r in TINY_RUNS}
    cfg["gmm"]["k"] = 4
    cfg["train"].update(model="ditdh-tiny", global_batch=32, micro_batch_max=32, steps=4, checkpoint_every=2,
                        log_every=1, eval_every=2, eval_samples=16, eval_steps=2, eval_rows=256)
    cfg["sample"].update(n=32, batch_size=32)
    cfg["eval"].update(nfe=[1, 2], final_nfe=2, rows=256, batch_size=32)
    cfg["toy_r10"].update(iters=20, batch=64, n_eval=200, steps=10)
    return cfg


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """A working directory where the tiny DAG has run once; returns it and the --configfile argument
    (``<workdir>/tiny.yaml``). Shared by every test of the session: a test that changes what is there works on a copy."""
    workdir = tmp_path_factory.mktemp("workflow")
    configfile = workdir / "tiny.yaml"
    configfile.write_text(yaml.safe_dump(tiny_config(), sort_keys=False))
    smk(workdir, "--cores", "2", "--configfile", str(configfile))
    return workdir, str(configfile)
