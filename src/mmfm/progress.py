"""Progress that reads well in a terminal and in a log file.

:func:`progress` is used wherever mmfm shows progress. On a terminal (``sys.stderr.isatty()``) it is
tqdm's bar (``tqdm.auto``), as before. Anywhere else (a Snakemake log, SLURM's output file, a pipe) it
is :class:`PlainProgress`: one plain line on stderr, ended by ``"\\n"`` and flushed, never a ``"\\r"``
bar, so a log holds readable lines and an error traceback starts on a line of its own::

    train: 1234/5000 (24%) 12.3 step/s, eta 5m06s, loss=0.0123, lr=0.0001
    train: 5000/5000 (100%) in 6m40s, 12.5 step/s, loss=0.0101, lr=0.0001

A line is written when :data:`ENV_SECONDS` seconds (default 10; the environment variable
``MMFM_PROGRESS_SECONDS`` sets it, ``0`` writes every update) have passed since the last one, or when
another tenth of ``total`` is done, whichever comes first; and one final line when the loop ends
(``close``, the end of the iteration, or leaving a ``with`` block; an interrupted loop's final line says
where it stopped). A bar made with ``leave=False`` (an inner loop) writes only the timed lines. The rate
counts the updates of this run (``initial`` is a resumed run's start).

The object answers the part of tqdm's interface mmfm uses: iteration, ``update(n)``,
``set_postfix(**values)``, ``close()``, the context manager, and ``disable``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable

#: The environment variable that sets the seconds between plain lines.
ENV_SECONDS = "MMFM_PROGRESS_SECONDS"
DEFAULT_SECONDS = 10.0


def interval_seconds() -> float:
    """Seconds between plain lines: ``$MMFM_PROGRESS_SECONDS``, else :data:`DEFAULT_SECONDS`."""
    raw = os.environ.get(ENV_SECONDS, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{ENV_SECONDS}: expected a number of seconds >= 0, got {raw!r}")
    return value


def duration(seconds: float) -> str:
    """``42s``, ``5m06s``, ``2h05m``, ``3d04h``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _number(x: float) -> str:
    """``12.3``, ``174000``: three significant digits, no exponent."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


class PlainProgress:
    """tqdm's counting without a bar: plain lines on stderr (module doc)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, leave: bool = True,
                 seconds: float | None = None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = int(initial)
        self.disable, self.leave = bool(disable), bool(leave)
        self.seconds = interval_seconds() if seconds is None else float(seconds)
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._tenth = self._tenths()
        self._closed = False

    def _tenths(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self.disable or self._closed:
            return
        now, tenth = time.monotonic(), self._tenths()
        # a tenth more is done (not the last one: the final line says that)
        tenth_line = self.leave and bool(self.total) and tenth > self._tenth and self.n < self.total
        if now - self._last >= self.seconds or tenth_line:
            self._write(self.line(now))
            self._last, self._tenth = now, tenth

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now: float | None = None, final: bool = False) -> str:
        """``desc: n/total (p%) rate, eta ..., postfix``; the final line gives the elapsed time instead."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        tail = [f"in {duration(elapsed)}"] if final else []
        if rate > 0:
            tail.append(f"{_number(rate)} {self.unit}/s" if rate >= 1 else f"{_number(1 / rate)} s/{self.unit}")
        if self.total and self.n < self.total:
            if final:
                tail.append("ended early")
            elif rate > 0:
                tail.append(f"eta {duration((self.total - self.n) / rate)}")
        if self.postfix:
            tail.append(self.postfix)
        return (f"{self.desc}: " if self.desc else "") + count + (" " + ", ".join(tail) if tail else "")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave and not self.disable:
            self._write(self.line(final=True))

    @staticmethod
    def _write(text: str) -> None:
        err = sys.stderr  # looked up at each write: a workflow script redirects it to its log
        err.write(text + "\n")
        err.flush()


def on_terminal() -> bool:
    """Whether stderr is a terminal (then progress is tqdm's bar)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, leave: bool = True, **tqdm_options):
    """A tqdm bar on a terminal, else a :class:`PlainProgress` (module doc). ``tqdm_options`` (such as
    ``mininterval``) only reach tqdm."""
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave,
                    **tqdm_options)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave)

