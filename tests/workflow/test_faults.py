"""Faults injected into the workflow (slow): what the user sees (Snakemake's console, the job's log) and what
is left on disk after Snakemake is killed or interrupted, two Snakemakes meet, the results folder is
read-only, a job fails, the disk fills up (a real ENOSPC: a small tmpfs), a shard holds NaN, the inputs of
a run change, or a resumed run stops evaluating.

Every test works on its own copy of the session's tiny demo (conftest.py: ``demo``) and asks for one
target (mostly ``results/runs/gmm-mode/ema.safetensors``), so only the jobs it needs run. A test that
must catch ``train`` mid-way raises the run's ``steps`` (a change a run resumes from, so the job continues
from the demo's last checkpoint) and, where timing would be a race, freezes the trainer with SIGSTOP
while the other party acts (the trainer stays alive, holding its run folder, as a slow one would).

    python -m pytest tests/workflow/test_faults.py -q
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from toyrun import metric_steps
import yaml

from mmfm.data import shards
from mmfm.io import open_tensors, read_header, save_tensors
from mmfm.train.lock import holder
from tests.workflow.conftest import ROOT, smk, smk_cmd

pytestmark = pytest.mark.slow

RUN = "gmm-mode"
RUN_DIR = f"results/runs/{RUN}"
EMA = f"{RUN_DIR}/ema.safetensors"
LONGER = 16  # steps of a train job that must be caught mid-way (the demo's run stops at 4)


# ------------------------------------------------------------------------------------------------ helpers


def copy_demo(demo, tmp_path: Path) -> tuple[Path, str]:
    """A private copy of the demo (files' times kept, so it is as up to date as the original) and the
    ``--configfile`` argument that belongs to it."""
    workdir, _ = demo
    copy = tmp_path / "demo"
    shutil.copytree(workdir, copy, symlinks=True)
    return copy, str(copy / "tiny.yaml")


def steps_config(steps: int) -> list[str]:
    """``--config`` for a longer training of RUN only (Snakemake merges it into the config file's runs)."""
    return ["--config", f"runs={{{RUN}: {{train: {{steps: {steps}}}}}}}"]


def console(res: subprocess.CompletedProcess) -> str:
    """What Snakemake printed (it logs to stderr; the jobs' own output goes there too)."""
    return res.stdout + res.stderr


def job_log(workdir: Path, rule: str, name: str) -> str:
    """``results/logs/<rule>/<name>.log``."""
    return (workdir / "results" / "logs" / rule / f"{name}.log").read_text(errors="replace")


def ema_step(workdir: Path) -> int:
    """The training step recorded in the run's exported EMA (its safetensors metadata)."""
    return read_header(workdir / EMA)[1]["step"]


def assert_steps_once_each(workdir: Path, steps: int) -> None:
    """metrics.csv holds the steps 1..steps, strictly increasing: one trainer wrote it, none twice."""
    got = metric_steps(workdir / RUN_DIR)
    assert got == list(range(1, steps + 1)), f"{workdir / RUN_DIR}/metrics.csv steps: {got}"


class Snakemake:
    """``snakemake`` started in the background, in its own process group (its jobs too), its console into
    a file."""

    def __init__(self, workdir: Path, *args: str):
        self.out = workdir.parent / f"snakemake-{time.monotonic_ns()}.txt"
        with open(self.out, "w") as f:
            self.proc = subprocess.Popen(smk_cmd(workdir, *args), stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def background():
    """``background(workdir, *args)`` starts a :class:`Snakemake`; ``background.freeze(pid)`` / ``.thaw(pid)``
    stop and continue a process. At the end every process group started here is killed (orphaned
    trainers included) and every frozen process let go, whatever happened."""
    started: list[Snakemake] = []
    frozen: set[int] = set()

    def start(workdir: Path, *args: str) -> Snakemake:
        started.append(Snakemake(workdir, *args))
        return started[-1]

    def freeze(pid: int) -> None:
        frozen.add(pid)
        os.kill(pid, signal.SIGSTOP)

    def thaw(pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        frozen.discard(pid)

    start.freeze, start.thaw = freeze, thaw
    yield start
    for run in started:
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run.proc.wait()
    for pid in frozen:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def line_with(text: str, *parts: str) -> str | None:
    """The first line of ``text`` that holds every one of ``parts``."""
    return next((ln for ln in text.splitlines() if all(p in ln for p in parts)), None)


def put_nan(shard: Path, row: int) -> str:
    """Rewrite ``shard`` (as ``mmfm encode`` writes one, its metadata kept) with a NaN in the tokens of
    ``row``; returns that row's image path."""
    data = next(shards.iter_columns(shard, shards.open_file(shard).schema_arrow.names, rows=shards.num_rows(shard)))
    data["tokens"] = data["tokens"].copy()
    data["tokens"][row, 5] = np.nan
    shards.write_shard(shard, data, shards.read_metadata(shard), row_group_rows=256)
    return data["path"][row]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: an orphan's reaper may be slow)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(what: str, predicate, timeout: float = 120, smk_run: Snakemake | None = None):
    """Poll ``predicate()`` until it returns something true; fail naming ``what`` (with Snakemake's console
    when it has exited before)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if smk_run is not None and smk_run.proc.poll() is not None:
            value = predicate()
            if value:
                return value
            raise AssertionError(f"snakemake exited ({smk_run.proc.returncode}) before {what}:\n{smk_run.text()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def training(workdir: Path, smk_run: Snakemake, past: int) -> dict:
    """Wait until RUN's trainer holds its folder and has logged a step beyond ``past``; its lock record."""

    def progressed():
        rec = holder(workdir / RUN_DIR)
        try:
            steps = metric_steps(workdir / RUN_DIR)
        except (FileNotFoundError, KeyError, ValueError):
            return None
        return rec if rec and steps and steps[-1] > past and alive(rec["pid"]) else None

    return wait_for(f"{RUN}'s trainer to pass step {past}", progressed, smk_run=smk_run)


def wait_gone(pid: int, timeout: float = 120) -> None:
    wait_for(f"PID {pid} to exit", lambda: not alive(pid), timeout)


# ------------------------------------------------------------------------------------------------ the cases


def test_kill_9_of_snakemake_alone_then_unlock_and_rerun(demo, tmp_path, background):
    """kill -9 of Snakemake during train orphans the trainer; after --unlock a rerun must not start a
    second trainer in the folder while the orphan runs, and once it is done a rerun completes."""
    copy, configfile = copy_demo(demo, tmp_path)
    args = [EMA, "--cores", "1", "--configfile", configfile]
    first = background(copy, *args, *steps_config(LONGER))
    rec = training(copy, first, past=5)
    first.proc.send_signal(signal.SIGKILL)  # Snakemake alone, not its process group
    first.wait()
    orphan = rec["pid"]
    assert alive(orphan), "the trainer died with Snakemake"
    background.freeze(orphan)  # whatever the machine's speed, it is mid-run for the rerun

    assert "Unlocked working directory" in console(smk(copy, "--unlock", "--configfile", configfile))
    # --rerun-incomplete: Snakemake marked the EMA incomplete when the killed run started its job and
    # refuses to go on without it (as profiles/local and profiles/slurm set)
    res = smk(copy, *args, "--rerun-incomplete", "--show-failed-logs", *steps_config(LONGER), check=False)
    text = console(res)
    assert res.returncode != 0, text[-3000:]
    assert f"run folder {RUN_DIR} is in use by another trainer: PID {orphan} on host" in text, text[-3000:]
    assert f"kill {orphan}" in text
    assert alive(orphan) and holder(copy / RUN_DIR)["pid"] == orphan  # the refused job left the lock alone
    assert (copy / RUN_DIR / "latest").is_file()  # ... and the orphan's checkpoints

    background.thaw(orphan)
    wait_gone(orphan)
    res = smk(copy, *args, "--rerun-incomplete", *steps_config(LONGER))
    assert ema_step(copy) == LONGER, console(res)[-3000:]  # the EMA of a run that completed its steps
    assert_steps_once_each(copy, LONGER)
    assert holder(copy / RUN_DIR) is None  # released cleanly
    assert not list((copy / RUN_DIR).glob("step-*.tmp*"))  # the frozen checkpoint write was finished


def test_ctrl_c_during_train_keeps_nothing_half_done_and_the_rerun_resumes(demo, tmp_path, background):
    """Ctrl-C in the terminal (SIGINT to Snakemake's whole process group, trainer included) during train:
    Snakemake stops, no EMA is left, and a plain rerun resumes from the last checkpoint and completes.

    (SIGINT to the Snakemake process alone is different: Snakemake then waits for the running jobs to
    finish, and leaves their outputs marked incomplete for --rerun-incomplete.)"""
    copy, configfile = copy_demo(demo, tmp_path)
    args = [EMA, "--cores", "1", "--configfile", configfile, *steps_config(LONGER)]
    run = background(copy, *args)
    rec = training(copy, run, past=6)  # a checkpoint every 2 steps: at least one beyond the demo's
    background.freeze(rec["pid"])  # the signal reaches the trainer mid-run, however fast it trains
    os.killpg(run.proc.pid, signal.SIGINT)
    background.thaw(rec["pid"])
    code = run.wait(120)
    wait_gone(rec["pid"])
    text = run.text()
    assert code != 0, text[-3000:]
    assert "Terminating processes on user request" in text and "Error in rule train" in text, text[-3000:]
    assert not (copy / EMA).exists()
    latest = (copy / RUN_DIR / "latest").read_text().strip()
    assert (copy / RUN_DIR / latest).is_dir() and latest > "step-0000004", latest
    assert not list((copy / RUN_DIR).glob("step-*.tmp*"))  # no half-written checkpoint

    # a plain rerun: the job failed (it did not just lose its Snakemake), so nothing is marked incomplete
    res = smk(copy, *args)
    assert f"resuming from {RUN_DIR}/{latest}" in job_log(copy, "train", RUN), console(res)[-3000:]
    assert ema_step(copy) == LONGER
    assert_steps_once_each(copy, LONGER)


def test_two_snakemakes_at_once_the_second_is_refused(demo, tmp_path, background):
    """The same command twice in one folder: Snakemake's own lock refuses the second before any job; the
    first completes undisturbed."""
    copy, configfile = copy_demo(demo, tmp_path)
    args = [EMA, "--cores", "1", "--configfile", configfile, *steps_config(LONGER)]
    first = background(copy, *args)
    rec = training(copy, first, past=5)
    background.freeze(rec["pid"])  # the first is mid-train however long the second takes to start
    second = smk(copy, *args, check=False)
    background.thaw(rec["pid"])
    text = console(second)
    assert second.returncode != 0
    assert "Directory cannot be locked" in text and str(copy) in text, text[-3000:]
    assert "rule train" not in text  # refused before any job
    assert first.wait(300) == 0, first.text()[-3000:]
    assert ema_step(copy) == LONGER
    assert_steps_once_each(copy, LONGER)


@functools.cache
def _user_namespace() -> str | None:
    """Why ``unshare -rm`` (a user namespace with a private mount namespace: mounts no one else sees, even
    as root) is not usable here; None when it is."""
    if not shutil.which("unshare"):
        return "no unshare"
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", d], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -rm: {probe.stderr.strip()}"


def _read_only(results: Path) -> tuple[list[str], str]:
    """A command prefix that runs a command with ``results`` read-only, and the error the kernel gives.

    As root, permissions are ignored: a read-only bind mount in a private mount namespace (``unshare -rm``)
    is refused even to root. Without user namespaces, ``chmod -R a-w`` (not as root)."""
    why = _user_namespace()
    if why is None:
        script = f'mount --bind {results} {results} && mount -o remount,bind,ro {results} {results} && exec "$@"'
        return ["unshare", "-rm", "sh", "-c", script, "sh"], "Read-only file system"
    if os.geteuid() == 0:
        pytest.skip(f"as root, which ignores file permissions, a read-only folder needs a bind mount: {why}")
    subprocess.run(["chmod", "-R", "a-w", str(results)], check=True)
    return [], "Permission denied"


# `folder` becomes a tmpfs of `size` bytes holding what it held; after the command, what it holds is
# copied to `after` (the tmpfs goes with the namespace)
_SMALL_DISK = """set -eu
folder=$1; size=$2; after=$3; shift 3
keep=$(mktemp -d); cp -a "$folder/." "$keep/"
mount -t tmpfs -o size="$size" tmpfs "$folder"
cp -a "$keep/." "$folder/"; rm -rf "$keep"
set +e; "$@"; rc=$?
cp -a "$folder/." "$after/"
exit $rc"""


def run_on_small_disk(folder: Path, free: int, after: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``folder`` on a file system of its contents' size plus ``free`` bytes (a tmpfs in a
    private mount namespace: a real ENOSPC, nothing else affected); what is left there lands in ``after``."""
    why = _user_namespace()
    if why is not None:
        pytest.skip(f"a small file system needs a tmpfs mount in a user namespace: {why}")
    used = sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())
    after.mkdir()
    return subprocess.run(["unshare", "-rm", "sh", "-c", _SMALL_DISK, "sh", str(folder), str(used + free), str(after),
                           *cmd], capture_output=True, text=True, timeout=300)


def test_read_only_results_folder_names_the_path(demo, tmp_path):
    """A results folder nobody may write to: the first write fails with the path and the reason."""
    copy, configfile = copy_demo(demo, tmp_path)
    (copy / EMA).unlink()  # the train job must run, and write
    before = sorted(p.name for p in (copy / RUN_DIR).iterdir())
    prefix, error = _read_only(copy / "results")
    try:
        res = subprocess.run([*prefix, *smk_cmd(copy, EMA, "--cores", "1", "--configfile", configfile,
                                                "--show-failed-logs")],
                             capture_output=True, text=True, timeout=300)
    finally:
        if not prefix:  # chmod'ed: writable again, for pytest to clean up
            subprocess.run(["chmod", "-R", "u+w", str(copy / "results")], check=False)
    text = console(res)
    assert res.returncode != 0
    line = line_with(text, error)
    assert line is not None, text[-3000:]
    assert "results/" in line, f"the error does not name the file: {line}"
    assert sorted(p.name for p in (copy / RUN_DIR).iterdir()) == before  # nothing half-written


@pytest.mark.parametrize("how", [["--show-failed-logs"], ["--profile", str(ROOT / "profiles" / "local")]],
                         ids=["show-failed-logs", "profile-local"])
def test_a_failed_jobs_error_is_on_the_console(demo, tmp_path, how):
    """A failed job's own error line is on Snakemake's console, not only in its log: with
    --show-failed-logs, and with profiles/local, which sets it."""
    copy, configfile = copy_demo(demo, tmp_path)
    res = smk(copy, EMA, "--cores", "1", "--configfile", configfile, *how, "--config",
              "train={global_batch: 1000000}", check=False)  # (the target first: --config takes what follows)
    text = console(res)
    assert res.returncode != 0
    error = line_with(job_log(copy, "train", RUN), "cannot fill one global batch")
    assert error is not None, job_log(copy, "train", RUN)[-3000:]
    assert error in text, text[-3000:]  # the job's own error line, not just "check log file(s)"
    assert not (copy / EMA).exists()


def test_disk_full_during_a_checkpoint_names_it_and_keeps_the_previous(demo, tmp_path):
    """No room for the next checkpoint (half of it free): the train job fails naming the checkpoint, the
    bytes it needs and those free; the previous checkpoint stays the latest, nothing half-written."""
    copy, configfile = copy_demo(demo, tmp_path)
    run_dir = copy / RUN_DIR
    (copy / EMA).unlink()  # (Snakemake removes it before the job: not to be counted as space)
    checkpoint = sum(f.stat().st_size for f in (run_dir / "step-0000004").iterdir())
    after = tmp_path / "after"
    res = run_on_small_disk(run_dir, checkpoint // 2, after, smk_cmd(
        copy, EMA, "--cores", "1", "--configfile", configfile, "--show-failed-logs", *steps_config(6)))
    text = console(res)
    assert res.returncode != 0
    line = line_with(text, f"{RUN_DIR}/step-0000006: no space left on the device", "needs", "free")
    assert line is not None, text[-3000:]
    assert (after / "latest").read_text().strip() == "step-0000004"
    assert sorted(p.name for p in after.glob("step-*")) == ["step-0000004"]  # no half-written one
    assert not (after / "ema.safetensors").exists()


def test_disk_full_during_encode_names_the_shard(demo, tmp_path):
    """No room for a shard (half of it free): encode fails naming the shard and the sizes; no partial file."""
    copy, configfile = copy_demo(demo, tmp_path)
    shard = "results/shards/shard-0001.parquet"
    size = (copy / shard).stat().st_size
    (copy / shard).unlink()  # to be encoded again (Snakemake would remove it before the job too)
    after = tmp_path / "after"
    res = run_on_small_disk(copy / "results/shards", size // 2, after, smk_cmd(
        copy, shard, "--cores", "1", "--configfile", configfile, "--show-failed-logs"))
    text = console(res)
    assert res.returncode != 0
    line = line_with(text, f"{shard}: no space left on the device", "needs", "free")
    assert line is not None, text[-3000:]
    assert sorted(p.name for p in after.iterdir()) == ["shard-0000.parquet"]  # no partial shard-0001


def test_changed_inputs_start_the_run_afresh_and_keep_the_old_one(demo, tmp_path):
    """The data a run trained on changed (here its spatial GMM, as a refit on new images gives; new shards
    change the same fingerprint): the train job starts the run afresh instead of resuming it, keeps the
    old folder aside as RUN.prev-<timestamp> and says so in its log."""
    copy, configfile = copy_demo(demo, tmp_path)
    gmm = copy / "results/gmm/spatial.safetensors"
    tensors, meta = open_tensors(gmm)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors["variances"] *= 1.5
    save_tensors(gmm, tensors, meta)  # newer than the EMA: Snakemake reruns train, and only that
    res = smk(copy, EMA, "--cores", "1", "--configfile", configfile)
    assert "rule train:" in console(res) and "rule spatial_gmm:" not in console(res), console(res)[-3000:]
    [aside] = (copy / "results/runs").glob(f"{RUN}.prev-*")
    line = line_with(job_log(copy, "train", RUN), "data_fingerprint", "starting afresh",
                     str(aside.relative_to(copy)))
    assert line is not None, job_log(copy, "train", RUN)[-3000:] + console(res)[-2000:]
    assert (aside / "step-0000004").is_dir() and metric_steps(aside) == [1, 2, 3, 4]  # the old run, whole
    assert ema_step(copy) == 4
    assert_steps_once_each(copy, 4)  # trained from step 0: nothing of the old run mixed in


def test_new_images_reencode_and_start_the_run_afresh(demo, tmp_path):
    """Images added to a class of one's own image folder: Snakemake re-encodes (it would not see a new file
    in a class subfolder by itself), refits, and the run, whose shards' fingerprint changed, starts afresh
    with the old folder kept aside (the same line in RUN/train.log, which keeps every attempt)."""
    copy, configfile = copy_demo(demo, tmp_path)
    cfg = yaml.safe_load(Path(configfile).read_text())
    cfg["data"] = {"source": "folder", "images": "images"}
    (copy / "results/digits").rename(copy / "images")
    Path(configfile).write_text(yaml.safe_dump(cfg, sort_keys=False))
    smk(copy, EMA, "--cores", "2", "--configfile", configfile)  # the demo's images as a folder of one's own
    assert "Nothing to be done" in console(smk(copy, EMA, "-n", "--configfile", configfile))
    before = sum(shards.num_rows(p) for p in (copy / "results/shards").glob("*.parquet"))
    first = sorted((copy / "images" / "3").iterdir())[0]
    shutil.copy(first, copy / "images" / "3" / f"new-{first.name}")  # one more image of class 3
    res = smk(copy, EMA, "--cores", "2", "--configfile", configfile)
    text = console(res)
    assert "rule encode:" in text and "rule fit_cls_gmm:" in text and "rule train:" in text, text[-3000:]
    assert sum(shards.num_rows(p) for p in (copy / "results/shards").glob("*.parquet")) == before + 1
    asides = sorted((copy / "results/runs").glob(f"{RUN}.prev-*"))  # moving the images made new shards too
    assert len(asides) == 2, asides
    aside = asides[-1]
    for log in (job_log(copy, "train", RUN), (copy / RUN_DIR / "train.log").read_text()):
        assert line_with(log, "data_fingerprint", "starting afresh", str(aside.relative_to(copy))) is not None, log
    assert metric_steps(aside) == [1, 2, 3, 4] and ema_step(copy) == 4
    assert_steps_once_each(copy, 4)


def test_resumed_run_without_evaluation_drops_the_old_distances(demo, tmp_path):
    """eval_every: 0 on a run that evaluated before: the resumed run removes fd.csv, whose distances
    belong to the steps before (the report would take them for this run's curve), and says so."""
    copy, configfile = copy_demo(demo, tmp_path)
    assert (copy / RUN_DIR / "fd.csv").is_file()
    res = smk(copy, EMA, "--cores", "1", "--configfile", configfile, "--config",
              f"runs={{{RUN}: {{train: {{eval_every: 0, steps: 6}}}}}}")
    log = job_log(copy, "train", RUN)
    assert f"resuming from {RUN_DIR}/step-0000004" in log, console(res)[-3000:]
    assert f"eval_every is 0: removed {RUN_DIR}/fd.csv" in log, log[-3000:]
    assert not (copy / RUN_DIR / "fd.csv").exists()
    assert ema_step(copy) == 6
    assert_steps_once_each(copy, 6)


def test_nan_tokens_in_a_shard_are_named_by_the_first_job_that_reads_them(demo, tmp_path):
    """A NaN in one row's tokens (a shard written by an older encoder, or damaged): the first job reading
    the tokens (spatial_stats) fails with the shard, the row and its image on the console; the run's
    model trained before is left alone."""
    copy, configfile = copy_demo(demo, tmp_path)
    shard = "results/shards/shard-0001.parquet"
    image = put_nan(copy / shard, row=300)
    ema = (copy / EMA).read_bytes()
    res = smk(copy, EMA, "--cores", "1", "--configfile", configfile, "--show-failed-logs", check=False)
    text = console(res)
    assert res.returncode != 0
    assert "Error in rule spatial_stats" in text and "rule train:" not in text, text[-3000:]
    line = line_with(text, shard, "row 300", image)
    assert line is not None and "non-finite" in line, text[-3000:]
    assert (copy / EMA).read_bytes() == ema


@pytest.mark.parametrize("profile", sorted(p.parent.name for p in (ROOT / "profiles").glob("*/config.yaml")))
def test_every_profile_shows_failed_logs(profile):
    cfg = yaml.safe_load((ROOT / "profiles" / profile / "config.yaml").read_text())
    assert cfg.get("show-failed-logs") is True, f"profiles/{profile}/config.yaml: show-failed-logs is not true"


def _flip_page_byte(shard: Path) -> None:
    """Flip one byte inside the first data page of the ``tokens`` column (its CRC no longer matches)."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(shard).metadata
    col = md.row_group(0).column(md.schema.names.index("tokens"))
    at = col.data_page_offset + col.total_compressed_size // 2
    data = bytearray(shard.read_bytes())
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_mmfm_check_names_the_damage_and_its_command_recovers(demo, tmp_path):
    """A truncated shard, a flipped byte in another shard's page, a truncated safetensors partial and a sidecar
    that disagrees with its tensors: `mmfm check` names exactly those files and prints one command; that
    command, run, leaves `mmfm check` clean and `snakemake -n` with nothing to do."""
    import json
    import shlex
    import sys

    copy, configfile = copy_demo(demo, tmp_path)
    good = (copy / EMA).read_bytes()
    bad = {"results/shards/shard-0000.parquet", "results/shards/shard-0001.parquet",
           "results/gmm/partials/group-0001.safetensors", "results/gmm/cls.json"}
    shard0 = copy / "results/shards/shard-0000.parquet"
    shard0.write_bytes(shard0.read_bytes()[:-100])
    _flip_page_byte(copy / "results/shards/shard-0001.parquet")
    partial = copy / "results/gmm/partials/group-0001.safetensors"
    partial.write_bytes(partial.read_bytes()[:-64])
    sidecar = copy / "results/gmm/cls.json"
    meta = json.loads(sidecar.read_text())
    meta["k"] = int(meta["k"]) + 1
    sidecar.write_text(json.dumps(meta))

    def check() -> tuple[int, dict, str]:
        res = subprocess.run([sys.executable, "-m", "mmfm.cli", "check", "results", "--configfile", "tiny.yaml",
                              "--json"], cwd=copy, capture_output=True, text=True, timeout=300)
        *lines, last = res.stdout.strip().splitlines()
        return res.returncode, json.loads(last), "\n".join(lines)

    rc, found, text = check()
    assert rc == 1 and {b["path"] for b in found["bad"]} == bad, text
    for b in found["bad"]:
        assert f"{b['path']}: " in text  # one line per file, naming it
    command = found["command"]
    assert command.startswith("snakemake --cores all ") and "--configfile tiny.yaml" in command, command
    forced = command.split("--forcerun ", 1)[1].split()  # each bad file's job (cls.json: the CLS GMM's)
    assert sorted(forced) == sorted(bad - {"results/gmm/cls.json"} | {"results/gmm/cls.safetensors"}), command
    assert f"  {command}" in text
    argv = shlex.split(command)
    assert argv[0] == "snakemake"
    res = subprocess.run(smk_cmd(copy, *argv[1:]), cwd=copy, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, console(res)[-3000:]
    rc, found, text = check()
    assert rc == 0 and found["ok"] and found["bad"] == [], text
    assert "Nothing to be done" in console(smk(copy, "-n", "--cores", "1", "--configfile", configfile))
    assert (copy / EMA).is_file() and len((copy / EMA).read_bytes()) == len(good)
