"""The run-folder lock: refusal (same process, another process), takeover after release and after SIGKILL,
the record-only fallback without flock, the parent-holds-it handshake for exec'd children."""

import errno
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from mmfm.train import lock as lock_mod
from mmfm.train.lock import ENV_VAR, RunFolderLocked, RunLock, held_by_parent, holder

HOST = socket.gethostname()
REFUSED, LOCKED = 3, 0

# A child that tries to lock argv[1]: exits 0 when it got the lock, 3 (message on stderr) when refused.
TRY_LOCK = textwrap.dedent("""
    import sys
    from mmfm.train.lock import RunFolderLocked, RunLock
    try:
        RunLock(sys.argv[1]).acquire()
    except RunFolderLocked as e:
        print(e, file=sys.stderr)
        sys.exit(3)
    sys.exit(0)
""")

# A child that takes the lock of argv[1], says so, and sleeps until killed.
HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from mmfm.train.lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def _python(code, *args, **kwargs):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=30, **kwargs)


def _snapshot(folder):
    """Every file in the folder with its bytes (the refusal must change nothing)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def sleeper():
    """A live process of this host that holds nothing (a sleeping child)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    """The PID of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without working flock: every flock call fails with ENOLCK."""
    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", flock)


def _write_record(folder, **rec):
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"pid": 1, "host": HOST, "started": "2000-01-01T00:00:00+00:00", "argv": ["mmfm", "train"], **rec}
    (folder / ".lock").write_text(json.dumps(rec))


# ---------------------------------------------------------------- acquire, refuse, release


def test_acquire_creates_folder_and_writes_record(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    with RunLock(run) as lock:
        assert lock.held and lock.flock is True and lock.took_over is None
        rec = json.loads((run / ".lock").read_text())
        assert rec["pid"] == os.getpid() and rec["host"] == HOST and rec["argv"] == sys.argv
        assert rec["started"].endswith("+00:00")
        assert holder(run) == rec
        assert not os.get_inheritable(lock._fd)  # close-on-exec: exec'd children do not inherit the lock
    assert not lock.held
    assert (run / ".lock").exists()  # the file is kept
    assert holder(run) is None  # a clean release empties the record


def test_second_object_in_same_process_refused(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        before = _snapshot(run)
        second = RunLock(run)
        with pytest.raises(RunFolderLocked) as info:
            second.acquire()
        assert not second.held
        assert _snapshot(run) == before
    e = info.value
    msg = str(e)
    assert f"PID {os.getpid()}" in msg and HOST in msg and str(run) in msg
    assert f"kill {os.getpid()}" in msg and "taken over automatically" in msg
    assert shlex.join(sys.argv) in msg  # the recorded command line
    assert e.path == run and e.holder["pid"] == os.getpid() and e.holder["host"] == HOST
    assert e.holder["started"] in msg
    assert isinstance(e, RuntimeError)


def test_other_process_refused_while_held(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        before = _snapshot(run)
        out = _python(TRY_LOCK, run)
        assert out.returncode == REFUSED, out.stderr
        assert f"PID {os.getpid()}" in out.stderr and HOST in out.stderr
        assert _snapshot(run) == before
    out = _python(TRY_LOCK, run)
    assert out.returncode == LOCKED, out.stderr


def test_same_object_twice_is_an_error_release_twice_harmless(tmp_path):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()
    assert lock.held
    lock.release()
    lock.release()
    assert not lock.held
    lock.acquire()  # the same object can lock again after release
    lock.release()


def test_after_release_lock_is_taken_without_takeover(tmp_path):
    run = tmp_path / "run"
    first = RunLock(run).acquire()
    first.release()
    second = RunLock(run).acquire()
    try:
        assert second.took_over is None
        assert holder(run)["pid"] == os.getpid()
    finally:
        second.release()


def test_sigkilled_holder_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert holder(run)["pid"] == proc.pid
        with pytest.raises(RunFolderLocked, match=f"PID {proc.pid} on host {HOST}"):
            RunLock(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger=lock_mod.__name__):
        with RunLock(run) as lock:
            assert lock.flock is True
            assert lock.took_over is not None
            assert f"PID {proc.pid} on host {HOST}" in lock.took_over
            assert lock.took_over.startswith("took over the stale lock of")
            assert holder(run)["pid"] == os.getpid()
    assert any(str(proc.pid) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_context_manager_releases_on_exception(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run)
    with pytest.raises(ValueError):
        with lock:
            assert lock.held
            raise ValueError("boom")
    assert not lock.held
    with RunLock(run) as again:  # would raise RunFolderLocked if the lock had leaked
        assert again.took_over is None


def test_holder_tolerates_missing_empty_garbled(tmp_path):
    assert holder(tmp_path / "missing") is None
    assert not (tmp_path / "missing").exists()  # read-only: creates nothing
    (tmp_path / ".lock").write_bytes(b"")
    assert holder(tmp_path) is None
    (tmp_path / ".lock").write_bytes(b"{not json")
    assert holder(tmp_path) is None
    (tmp_path / ".lock").write_bytes(b"\xff\xfe")
    assert holder(tmp_path) is None
    (tmp_path / ".lock").write_bytes(b"[1, 2]")
    assert holder(tmp_path) is None
    (tmp_path / ".lock").write_text('{"pid": 7}')
    assert holder(tmp_path) == {"pid": 7}


def test_refused_with_unreadable_record_still_refuses(tmp_path):
    """A holder that has locked but not written its record yet (or wrote garbage) still blocks."""
    run = tmp_path / "run"
    with RunLock(run):
        (run / ".lock").write_bytes(b"garbage")
        before = _snapshot(run)
        with pytest.raises(RunFolderLocked) as info:
            RunLock(run).acquire()
        assert info.value.holder is None and "unreadable" in str(info.value)
        assert _snapshot(run) == before


# ---------------------------------------------------------------- fallback without flock


def test_fallback_takes_over_dead_pid_on_this_host(tmp_path, no_flock, dead_pid, caplog):
    run = tmp_path / "run"
    _write_record(run, pid=dead_pid)
    with caplog.at_level(logging.WARNING, logger=lock_mod.__name__):
        lock = RunLock(run).acquire()
    try:
        assert lock.flock is False
        assert f"PID {dead_pid} on host {HOST}" in lock.took_over
        assert holder(run)["pid"] == os.getpid()
    finally:
        lock.release()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("no working flock" in m for m in warnings) == 1
    assert any(str(dead_pid) in m and "took over" in m for m in warnings)
    assert holder(run) is None  # released: record emptied, so the next one takes it without a takeover
    with RunLock(run) as again:
        assert again.took_over is None


def test_fallback_refuses_live_pid_on_this_host(tmp_path, no_flock, sleeper):
    run = tmp_path / "run"
    _write_record(run, pid=sleeper.pid)
    before = _snapshot(run)
    with pytest.raises(RunFolderLocked) as info:
        RunLock(run).acquire()
    assert f"PID {sleeper.pid}" in str(info.value) and HOST in str(info.value)
    assert f"kill {sleeper.pid}" in str(info.value)
    assert _snapshot(run) == before


def test_fallback_treats_eperm_as_alive(tmp_path, no_flock, monkeypatch):
    def kill(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "kill", kill)
    run = tmp_path / "run"
    _write_record(run, pid=424242)
    before = _snapshot(run)
    with pytest.raises(RunFolderLocked, match="PID 424242"):
        RunLock(run).acquire()
    assert _snapshot(run) == before


def test_fallback_refuses_other_host_cannot_check(tmp_path, no_flock, dead_pid):
    run = tmp_path / "run"
    _write_record(run, pid=dead_pid, host="some-other-host.invalid")
    before = _snapshot(run)
    with pytest.raises(RunFolderLocked) as info:
        RunLock(run).acquire()
    msg = str(info.value)
    assert "cannot be checked" in msg and "some-other-host.invalid" in msg and str(dead_pid) in msg
    assert f"delete the lock file {run / '.lock'}" in msg
    assert info.value.holder["host"] == "some-other-host.invalid"
    assert _snapshot(run) == before


def test_fallback_second_object_in_same_process_refused(tmp_path, no_flock):
    run = tmp_path / "run"
    with RunLock(run) as first:
        assert first.flock is False and first.took_over is None
        before = _snapshot(run)
        with pytest.raises(RunFolderLocked, match=f"PID {os.getpid()}"):
            RunLock(run).acquire()
        assert _snapshot(run) == before


def test_other_flock_errors_propagate(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(OSError) as info:
        RunLock(tmp_path / "run").acquire()
    assert info.value.errno == errno.EIO and not isinstance(info.value, RunFolderLocked)


# ---------------------------------------------------------------- the parent launcher holds it


# Prints held_by_parent for: the env as given, another folder, a grandchild with the same env, a wrong PID
# in the env, no env variable.
CHECK_PARENT = textwrap.dedent("""
    import json, os, subprocess, sys
    from mmfm.train.lock import ENV_VAR, held_by_parent
    run, other = sys.argv[1], sys.argv[2]
    res = {"given": held_by_parent(run), "other_folder": held_by_parent(other)}
    # a grandchild inherits the variable, but its parent is this child, not the holder
    grandchild = subprocess.run([sys.executable, "-c",
                                 "import sys; from mmfm.train.lock import held_by_parent; "
                                 "print(held_by_parent(sys.argv[1]))", run], capture_output=True, text=True)
    res["grandchild"] = grandchild.stdout.strip()
    value = os.environ.get(ENV_VAR, "")
    folder, _, pid = value.rpartition(":")
    os.environ[ENV_VAR] = f"{folder}:{int(pid or 0) + 1}"
    res["wrong_pid"] = held_by_parent(run)
    del os.environ[ENV_VAR]
    res["no_variable"] = held_by_parent(run)
    print(json.dumps(res))
""")


def test_held_by_parent_in_child(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    other.mkdir()
    with RunLock(run) as lock:
        env = lock.env()
        assert env == {ENV_VAR: f"{os.path.realpath(run)}:{os.getpid()}"}
        out = _python(CHECK_PARENT, run, other, env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"given": True, "other_folder": False, "grandchild": "False",
                                          "wrong_pid": False, "no_variable": False}
        # the child does not lock again; a child without the variable is refused
        out = _python(TRY_LOCK, run, env={k: v for k, v in os.environ.items() if k != ENV_VAR})
        assert out.returncode == REFUSED


def test_held_by_parent_false_when_parent_does_not_hold(tmp_path):
    """The variable names the parent, but the lock file's record does not (the parent never locked)."""
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, ENV_VAR: f"{run}:{os.getpid()}"}
    out = _python(CHECK_PARENT, run, tmp_path, env=env)
    assert json.loads(out.stdout)["given"] is False
    _write_record(run, pid=os.getpid(), host="some-other-host.invalid")
    out = _python(CHECK_PARENT, run, tmp_path, env=env)
    assert json.loads(out.stdout)["given"] is False


def test_held_by_parent_in_process(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with RunLock(run) as lock:
        monkeypatch.setattr(os, "getppid", lambda: os.getpid())
        monkeypatch.delenv(ENV_VAR, raising=False)
        assert held_by_parent(run) is False
        for key, value in lock.env().items():
            monkeypatch.setenv(key, value)
        assert held_by_parent(run) is True
        assert held_by_parent(tmp_path / "run" / ".." / "run") is True  # the same folder, spelled differently
        assert held_by_parent(tmp_path) is False
        with RunLock(tmp_path / "other"):  # held by the same PID, but the variable names another folder
            assert held_by_parent(tmp_path / "other") is False
        monkeypatch.setattr(os, "getppid", lambda: os.getpid() + 1)  # right variable, another parent
        assert held_by_parent(run) is False
        monkeypatch.setattr(os, "getppid", lambda: os.getpid())
        monkeypatch.setenv(ENV_VAR, f"{os.path.realpath(run)}:{os.getpid() + 1}")
        assert held_by_parent(run) is False
        monkeypatch.setenv(ENV_VAR, "garbage")
        assert held_by_parent(run) is False
    with pytest.raises(RuntimeError, match="not held"):
        lock.env()


def test_fork_child_release_keeps_parents_lock(tmp_path):
    """A fork()ed child inherits the lock; its release() must not unlock the parent's."""
    run = tmp_path / "run"
    with RunLock(run) as lock:
        pid = os.fork()
        if pid == 0:  # child: release its copy, then exit without running pytest's cleanup
            try:
                lock.release()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert holder(run)["pid"] == os.getpid()
        assert _python(TRY_LOCK, run).returncode == REFUSED
