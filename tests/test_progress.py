"""mmfm.progress: tqdm on a terminal, plain timed lines in a log, and errors on lines of their own."""

import io
import subprocess
import sys
import textwrap

import pytest

from mmfm import progress as pg


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(pg.time, "monotonic", c)
    monkeypatch.delenv(pg.ENV_SECONDS, raising=False)
    return c


def lines(capsys):
    err = capsys.readouterr().err
    assert "\r" not in err and (not err or err.endswith("\n"))
    return err.splitlines()


def test_plain_lines_every_tenth_with_rate_eta_and_a_final_line(clock, capsys):
    bar = pg.progress(total=200, desc="encode s.parquet", unit="img")
    assert isinstance(bar, pg.PlainProgress)  # pytest's captured stderr is no terminal
    for _ in range(200):
        clock.t += 0.01  # 2 s in all: never 10 s apart, so the tenths decide
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing
    got = lines(capsys)
    assert len(got) == 10  # 10%, ..., 90%, then the final line (no 100% line before it)
    assert got[0] == "encode s.parquet: 20/200 (10%) 100 img/s, eta 2s"
    assert got[4] == "encode s.parquet: 100/200 (50%) 100 img/s, eta 1s"
    assert got[-2] == "encode s.parquet: 180/200 (90%) 100 img/s, eta 0s"
    assert got[-1] == "encode s.parquet: 200/200 (100%) in 2s, 100 img/s"


def test_timed_lines_resumed_start_postfix_and_a_stopped_loop(clock, capsys, monkeypatch):
    monkeypatch.setenv(pg.ENV_SECONDS, "30")
    bar = pg.progress(total=100_000, initial=40_000, desc="train", unit="step")
    for i in range(100):
        clock.t += 1.0
        bar.update(1)
        if i == 10:
            bar.set_postfix(loss="0.0123", lr="0.0001")
    bar.close()
    got = lines(capsys)
    # every 30 s (no tenth of 100k is crossed); the rate counts this run's steps, not the resumed 40k
    assert got[:3] == ["train: 40030/100000 (40%) 1 step/s, eta 16h39m, loss=0.0123, lr=0.0001",
                       "train: 40060/100000 (40%) 1 step/s, eta 16h39m, loss=0.0123, lr=0.0001",
                       "train: 40090/100000 (40%) 1 step/s, eta 16h38m, loss=0.0123, lr=0.0001"]
    assert got[3] == "train: 40100/100000 (40%) in 1m40s, 1 step/s, ended early, loss=0.0123, lr=0.0001"
    assert len(got) == 4


def test_iteration_unknown_total_slow_rates_and_leave_false(clock, capsys):
    out = []
    for x in pg.progress(iter(range(3)), desc="EM"):  # no len: counts only
        clock.t += 25.0
        out.append(x)
    assert out == [0, 1, 2]
    assert lines(capsys) == ["EM: 1 25 s/it", "EM: 2 25 s/it", "EM: 3 25 s/it", "EM: 3 in 1m15s, 25 s/it"]
    for _ in pg.progress(range(50), desc="inner", leave=False):  # an inner loop: only the timed lines
        clock.t += 0.5
    assert lines(capsys) == ["inner: 20/50 (40%) 2 it/s, eta 15s", "inner: 40/50 (80%) 2 it/s, eta 5s"]
    for _ in pg.progress(range(50), disable=True):
        clock.t += 100
    assert lines(capsys) == []


def test_a_loop_left_by_break_writes_its_final_line_at_once(clock, capsys):
    """As tqdm, the count is of the items finished (the third was being worked on)."""
    for i in pg.progress(range(1, 101), desc="EM", unit="it"):
        clock.t += 0.001
        if i == 3:
            break
    print("after", file=sys.stderr)
    final, after = lines(capsys)[-2:]
    assert final == "EM: 2/100 (2%) in 0s, 667 it/s, ended early" and after == "after"


def test_the_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(pg.ENV_SECONDS, "2.5")
    assert pg.interval_seconds() == 2.5 and pg.PlainProgress(total=3).seconds == 2.5
    monkeypatch.setenv(pg.ENV_SECONDS, "")
    assert pg.interval_seconds() == pg.DEFAULT_SECONDS == 10.0
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(pg.ENV_SECONDS, bad)
        with pytest.raises(ValueError, match=rf"MMFM_PROGRESS_SECONDS: expected a number of seconds >= 0, got '{bad}'"):
            pg.progress(total=3)


def test_a_terminal_gets_tqdm(monkeypatch):
    from tqdm.auto import tqdm

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    bar = pg.progress(total=3, desc="x", disable=True)
    assert isinstance(bar, tqdm)
    bar.close()


@pytest.mark.parametrize("s, text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3599, "59m59s"), (7500, "2h05m"),
                                     (90000, "1d01h")])
def test_duration(s, text):
    assert pg.duration(s) == text


def test_rates_have_no_exponent(clock, capsys, monkeypatch):
    monkeypatch.setenv(pg.ENV_SECONDS, "0.5")
    bar = pg.progress(total=10**6, desc="rows", unit="row")
    clock.t += 0.5
    bar.update(87_000)
    clock.t += 2000.0
    bar.close()
    assert lines(capsys) == ["rows: 87000/1000000 (9%) 174000 row/s, eta 5s",
                             "rows: 87000/1000000 (9%) in 33m20s, 43.5 row/s, ended early"]


def test_a_workflow_scripts_error_stands_on_its_own_line(tmp_path):
    """As a workflow script does: stdout and stderr to the log, a loop with progress that fails. The log holds
    the progress lines, then the traceback from a line of its own, ending in the exception's type."""
    log = tmp_path / "job.log"
    script = textwrap.dedent(f"""
        import sys
        sys.stdout = sys.stderr = open({str(log)!r}, "w", buffering=1)
        from mmfm.progress import progress
        bar = progress(total=10, desc="train", unit="step")
        try:
            for step in range(10):
                bar.update(1)
                print(f"step {{step}} done")
                if step == 6:
                    raise ValueError("results/shards/shard-0001.parquet row 17: tokens has 48 non-finite values")
        finally:
            bar.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={"MMFM_PROGRESS_SECONDS": "1000", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    text = log.read_text()
    assert "\r" not in text
    got = text.splitlines()
    assert got[0] == "train: 1/10 (10%) " + got[0].split("(10%) ", 1)[1] and got[1] == "step 0 done"
    tb = got.index("Traceback (most recent call last):")
    assert got[tb - 1].startswith("train: 7/10 (70%) in ") and got[tb - 1].endswith(", ended early")
    assert got[-1] == "ValueError: results/shards/shard-0001.parquet row 17: tokens has 48 non-finite values"
