"""Batches read, shuffled, checked and pinned in a background thread while the device computes.

:class:`Prefetch` runs a :class:`~mmfm.data.stream.ShardStream` (its :meth:`forever` iterator) in a
thread, ``depth`` batches ahead of the consumer. Per batch the thread

- takes the stream's ``state_dict()`` right after the batch, so a checkpoint stores the position of the
  last batch *consumed*, not of the last one read ahead (resume stays exact);
- checks on the host what a device must not be asked to read back: every token and descriptor finite,
  every label in ``[0, num_labels)``. A :class:`~mmfm.data.stream.ShardStream` checks finiteness itself
  as it reads each row group (``checks_finite``; its error names the shard file, the row and the image),
  so the thread checks values only for other streams; the label check names the batch;
- copies the numeric columns into page-locked (pinned) memory when the target is a CUDA device, so
  ``to(device, non_blocking=True)`` overlaps with compute; the columns keep their stored dtype (float16
  tokens cross the bus as float16 and are converted on the device, :func:`to_device`).

An exception in the thread is raised in the consumer at the next batch. ``close()`` stops the thread.
"""

from __future__ import annotations

import queue
import threading

import torch

_DONE = object()


class Prefetch:
    """Iterate ``(batch, stream_state)`` pairs of ``stream`` (``as_torch`` batches), ``depth`` ahead.

    Args:
        stream: a :class:`~mmfm.data.stream.ShardStream` built with ``as_torch=True``.
        pin: copy numeric columns into pinned memory (CUDA targets).
        num_labels: the range of the ``label`` column to check (``None``: no label check).
        depth: batches held ready.
    """

    def __init__(self, stream, *, pin: bool = False, num_labels: int | None = None, depth: int = 2):
        self.stream, self.pin, self.num_labels = stream, pin, num_labels
        self._check_finite = not getattr(stream, "checks_finite", False)  # a ShardStream checks as it reads
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmfm-prefetch", daemon=True)
        self._thread.start()

    def _prepare(self, batch: dict, index: int) -> dict:
        out = {}
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                if self._check_finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    bad = int((~torch.isfinite(value)).sum())
                    raise ValueError(f"shards: column {name!r} of batch {index} of this run (stream state "
                                     f"{self.stream.state_dict()}) holds {bad} non-finite values")
                if name == "label" and self.num_labels is not None and value.numel():
                    lo, hi = int(value.min()), int(value.max())
                    if lo < 0 or hi >= self.num_labels:
                        raise ValueError(f"shards: column 'label' of batch {index} has values in [{lo}, {hi}], "
                                         f"expected [0, {self.num_labels})")
                value = value.pin_memory() if self.pin else value
            out[name] = value
        return out

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for index, batch in enumerate(self.stream.forever()):
                item = (self._prepare(batch, index), self.stream.state_dict())
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the consumer
            self._put(err)
        else:
            self._put(_DONE)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, dict]:
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def to_device(value: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` on ``device`` (``non_blocking``: the copy from pinned memory overlaps), then cast there to
    ``dtype`` (float16 tokens cross as float16)."""
    device = torch.device(device)
    moved = value.to(device=device, non_blocking=device.type == "cuda")
    return moved if dtype is None else moved.to(dtype)

