"""One trainer per run folder: an exclusive lock held for the trainer's whole life.

What it protects. A run folder (``step-XXXXXXX/`` checkpoints, ``metrics.csv``, ``ema.safetensors``,
TensorBoard events) is written by exactly one trainer. Without a lock two trainers can run into the same
folder -- e.g. after ``kill -9`` of Snakemake the orphaned trainer keeps running and a rerun starts a
second one -- and their metrics interleave and their checkpoints collide. :class:`RunLock` refuses the
second one with :class:`RunFolderLocked`, which says who holds the folder and what to do.

Where it lives. ``<run folder>/.lock``. The file is created on the first lock and never deleted (deleting
a flock'ed file would let a second trainer lock a *new* file of the same name while the first still runs).
While held it contains one JSON record of the holder::

    {"pid": 1234, "host": "node7", "started": "2025-01-01T12:00:00+00:00", "argv": ["mmfm", "train", ...]}

:func:`holder` reads that record (for messages elsewhere); a clean :meth:`RunLock.release` empties it, so
a record found by the next trainer means its writer died while holding the lock.

flock semantics. The lock is ``fcntl.flock(fd, LOCK_EX | LOCK_NB)`` on the open lock file. It belongs to
the open file description, not to the process, so:

* the kernel releases it when the last descriptor of that description closes -- in particular when the
  holder dies by any means, ``kill -9`` included; a dead holder's lock is therefore taken over
  automatically, and the stale record it left is reported (:attr:`RunLock.took_over`, a WARNING log);
* a second ``open()`` + ``flock`` of the same file conflicts even inside the same process, so a second
  :class:`RunLock` on the same folder is refused there too;
* ``fork()`` children inherit the descriptor and with it the lock: the lock stays held until the holder
  *and* all its forked children (e.g. fork-started DataLoader workers) have exited. A forked child's
  :meth:`RunLock.release` only closes its copy and never unlocks the parent's lock;
* exec'd children (``subprocess``, torch's elastic launcher, spawn-started workers) do *not* inherit it,
  because the descriptor is close-on-exec (Python's default for ``os.open``). Such children learn that
  their parent launcher holds the folder from :meth:`RunLock.env` / :func:`held_by_parent` and must not
  lock again.

Fallback. Some filesystems (some NFS and Lustre mounts) have no working flock: it fails with ENOLCK,
EOPNOTSUPP, ENOSYS or EINVAL. Then the record alone is used -- a weaker, racy check, logged once per
acquisition at WARNING: a record naming a live process on this host (``os.kill(pid, 0)``, EPERM counting
as alive) or any process on another host (which cannot be checked from here) is refused; a record whose
PID is gone on this host is taken over as stale; an empty file is simply written. Caveat: on mounts where
flock works only per node (Lustre ``localflock``) two hosts can both get the kernel lock; this module
trusts a successful flock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

__all__ = ["ENV_VAR", "LOCK_NAME", "RunFolderLocked", "RunLock", "held_by_parent", "holder"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
ENV_VAR = "MMFM_RUN_LOCK"

# flock is "held by someone else"
_BUSY = frozenset({errno.EWOULDBLOCK, errno.EAGAIN})
# flock does not work on this filesystem: fall back to the record alone
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})

_MAX_RECORD = 1 << 20


def _lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / LOCK_NAME


def _parse(data: bytes) -> dict | None:
    """The holder record in ``data``; None when empty, garbled or not a record."""
    if not data.strip():
        return None
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _read_fd(fd: int) -> dict | None:
    return _parse(os.pread(fd, _MAX_RECORD, 0))


def holder(folder: str | os.PathLike) -> dict | None:
    """The current holder record of ``folder`` (``{"pid", "host", "started", "argv"}``), read-only.

    None when there is no lock file, or it is empty (never held, or released cleanly) or garbled. The
    record is informational: whether its process still holds the lock is only known to ``flock``.
    """
    try:
        with open(_lock_path(folder), "rb") as f:
            return _parse(f.read(_MAX_RECORD))
    except OSError:
        return None


def _pid_of(rec: dict | None) -> int | None:
    pid = (rec or {}).get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def _describe(rec: dict | None) -> str:
    """``PID 1234 on host node7 (started ...)`` for a record; tolerant of missing fields."""
    rec = rec or {}
    return f"PID {rec.get('pid', '?')} on host {rec.get('host', '?')} (started {rec.get('started', '?')})"


def _argv_text(rec: dict) -> str:
    argv = rec.get("argv")
    if isinstance(argv, list):
        return shlex.join(str(a) for a in argv)
    return "?" if argv is None else str(argv)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process on this host (EPERM: it exists, owned by someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


class RunFolderLocked(RuntimeError):
    """Another live trainer holds the run folder.

    Attributes: ``path`` (the run folder), ``holder`` (its record as a dict, or None when unreadable).
    """

    def __init__(self, path: str | os.PathLike, holder: dict | None, *, unverifiable: bool = False):
        self.path = Path(path)
        self.holder = holder
        self.unverifiable = unverifiable
        super().__init__(self._message())

    def _message(self) -> str:
        lock_file = _lock_path(self.path)
        rec = self.holder
        if rec is None:
            return (f"run folder {self.path} is in use by another trainer (its lock {lock_file} is held, but "
                    f"the holder's record is empty or unreadable -- it may be just starting). Wait for it to "
                    f"finish, or stop it; a dead holder's lock is taken over automatically.")
        pid, host = rec.get("pid", "?"), rec.get("host", "?")
        head = (f"run folder {self.path} is in use by another trainer: PID {pid} on host {host}, started "
                f"{rec.get('started', '?')}, command: {_argv_text(rec)}.")
        if self.unverifiable:
            return (f"{head} This filesystem has no working flock, so whether PID {pid} on host {host} is "
                    f"still running cannot be checked from host {socket.gethostname()}. Wait for it to "
                    f"finish, or stop it (`kill {pid}` on {host}); if you are sure no trainer runs into this "
                    f"folder, delete the lock file {lock_file} and rerun.")
        return (f"{head} Wait for it to finish, or stop it (`kill {pid}` on {host}) and rerun; a dead "
                f"holder's lock is taken over automatically. (lock file: {lock_file})")


class RunLock:
    """The exclusive lock of one run folder, held by its trainer for the trainer's whole life.

    ``RunLock(folder)`` does nothing until :meth:`acquire` (or ``with RunLock(folder) as lock:``), which
    creates the folder (parents too), opens ``<folder>/.lock`` and takes ``flock(LOCK_EX | LOCK_NB)``;
    see the module docstring for the semantics and the fallback. After acquiring:

    * :attr:`took_over` -- None, or ``"took over the stale lock of PID ... on host ... (started ...)"``
      when the file held the record of a dead holder (also logged at WARNING);
    * :attr:`flock` -- True when the kernel lock is in use, False on the record-only fallback;
    * :meth:`env` -- the environment entry telling exec'd children that this process holds the folder.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder)
        self.lock_path = _lock_path(self.path)
        self.took_over: str | None = None
        self.flock: bool | None = None
        self._fd: int | None = None
        self._owner_pid: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunFolderLocked` (the lock file is then left untouched).

        Raises RuntimeError when this object already holds it. Returns self.
        """
        if self._fd is not None:
            raise RuntimeError(f"RunLock on {self.path} is already held by this object")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                use_flock = True
            except OSError as e:
                if e.errno in _BUSY:
                    raise RunFolderLocked(self.path, _read_fd(fd)) from None
                if e.errno not in _NO_FLOCK:
                    raise
                use_flock = False
                log.warning("run folder %s: the filesystem has no working flock (%s); using the weaker "
                            "check of the holder record in %s", self.path, os.strerror(e.errno),
                            self.lock_path)
            previous = _read_fd(fd)
            if not use_flock:
                self._check_record(previous)
            took_over = None
            if previous is not None:
                took_over = f"took over the stale lock of {_describe(previous)}"
                log.warning("run folder %s: %s", self.path, took_over)
            self._write_record(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._owner_pid = fd, os.getpid()
        self.flock, self.took_over = use_flock, took_over
        return self

    def _check_record(self, rec: dict | None) -> None:
        """Fallback without flock: refuse a record that may name a live trainer."""
        if rec is None:
            return
        host, pid = rec.get("host"), _pid_of(rec)
        if host != socket.gethostname():
            raise RunFolderLocked(self.path, rec, unverifiable=True)
        if pid is None or _pid_alive(pid):
            # a record of this host without a usable PID cannot be checked either
            raise RunFolderLocked(self.path, rec, unverifiable=pid is None)

    @staticmethod
    def _write_record(fd: int) -> None:
        rec = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv),
        }
        data = (json.dumps(rec) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def release(self) -> None:
        """Empty the record, unlock and close; the file stays. Harmless when not held.

        In a ``fork()`` child of the holder this only closes the child's copy of the descriptor: the lock
        (shared by both) stays with the parent.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._owner_pid == os.getpid():
                try:
                    os.ftruncate(fd, 0)
                    os.fsync(fd)
                except OSError:
                    pass
                if self.flock:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    except OSError:
                        pass
        finally:
            os.close(fd)

    def env(self) -> dict[str, str]:
        """``{"MMFM_RUN_LOCK": "<abs folder>:<pid>"}``: put it into the environment of child processes
        (e.g. workers started by torch's elastic launcher) so that :func:`held_by_parent` tells them
        their parent already holds this folder and they must not lock again."""
        if self._fd is None:
            raise RuntimeError(f"RunLock on {self.path} is not held")
        return {ENV_VAR: f"{os.path.realpath(self.path)}:{os.getpid()}"}

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"


def held_by_parent(folder: str | os.PathLike) -> bool:
    """Whether this process's parent holds the lock of ``folder`` (so this process must not lock again).

    True when ``MMFM_RUN_LOCK`` (see :meth:`RunLock.env`) names ``folder`` and a PID equal to
    ``os.getppid()``, and the lock file's record names that PID on this host. Only the *direct* parent
    counts: if it dies, this process is reparented and the answer becomes False.
    """
    value = os.environ.get(ENV_VAR)
    if not value:
        return False
    env_folder, sep, pid_text = value.rpartition(":")
    if not sep or not env_folder:
        return False
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid <= 0 or pid != os.getppid():
        return False
    if os.path.realpath(env_folder) != os.path.realpath(folder):
        return False
    rec = holder(folder)
    return _pid_of(rec) == pid and rec.get("host") == socket.gethostname()
