"""Argument checks shared by the package.

Every check raises ``ValueError`` whose message starts with the argument's name and says what was
expected, so bad input never turns into a silent broadcast deep inside a computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

_AS_ON_ACCELERATOR = [False]


@contextlib.contextmanager
def as_on_accelerator():
    """Inside, :func:`concrete` is false for CPU tensors too: a CPU run then takes the code path of a GPU
    run (``mmfm bench train`` counts the host syncs a GPU step would make)."""
    _AS_ON_ACCELERATOR.append(True)
    try:
        yield
    finally:
        _AS_ON_ACCELERATOR.pop()


def concrete(x: torch.Tensor) -> bool:
    """Whether a check may read ``x``'s values: a real CPU tensor outside ``torch.compile``.

    Value checks (finite, positive, label range) are skipped elsewhere: on an accelerator a read is a
    host sync, which the training and sampling loops must not pay per step (they check what they read
    from disk on the host, before it crosses to the device); a ``FakeTensor`` (a memory trace,
    :mod:`mmfm.plan.memory`) or a ``meta`` tensor has no values; under ``torch.compile`` a read breaks
    the graph. Shapes and dtypes are always checked."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or _AS_ON_ACCELERATOR[-1]:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(x)


def tensor(name: str, x, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """Return ``x`` as a floating tensor, checking its rank and that every value is finite."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    finite(name, x)
    return x


def integer(name: str, v, minimum: int = 1) -> int:
    """Check an integer argument ``>= minimum`` (sizes, counts, labels)."""
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name}: expected {kind}, got {v!r}")
    return v


def event(name: str, x: torch.Tensor, event_shape: tuple[int, ...]) -> None:
    """Check that ``x`` is a batch ``(B, *event_shape)`` of a source's events."""
    if x.ndim != len(event_shape) + 1 or tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(
            f"{name}: expected shape (B, {', '.join(map(str, event_shape))}) matching the source, "
            f"got {tuple(x.shape)}"
        )


def finite(name: str, x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN or an infinity (skipped where values cannot be read, :func:`concrete`)."""
    if x.numel() and concrete(x) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} non-finite of {x.numel()}")


def shape(name: str, x: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Check ``x.shape`` against ``expected``; ``None`` entries match any size."""
    ok = x.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b}: expected the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def positive(name: str, x: torch.Tensor | float) -> None:
    """Check that every value is strictly positive (variances, scales)."""
    if isinstance(x, torch.Tensor):
        if x.numel() and concrete(x) and not bool((x > 0).all()):
            raise ValueError(f"{name}: expected strictly positive values, min is {float(x.min()):.6g}")
    elif not x > 0:
        raise ValueError(f"{name}: expected a positive number, got {x}")


def probability_vector(name: str, w: torch.Tensor, atol: float = 1e-4) -> None:
    """Check a 1-D vector of non-negative weights that sums to one."""
    shape(name, w, (None,))
    finite(name, w)
    if not concrete(w):
        return
    if bool((w < 0).any()):
        raise ValueError(f"{name}: expected non-negative weights, min is {float(w.min()):.6g}")
    total = float(w.double().sum())
    if abs(total - 1.0) > atol:
        raise ValueError(f"{name}: expected weights summing to 1, they sum to {total:.6g}")


def choice(name: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {sorted(options)}, got {value!r}")
    return value


def interval(name: str, lo: float, hi: float, within: tuple[float, float] = (0.0, 1.0)) -> None:
    if not (within[0] <= lo < hi <= within[1]):
        raise ValueError(f"{name}: expected {within[0]} <= lo < hi <= {within[1]}, got ({lo}, {hi})")


def labels(name: str, y: torch.Tensor, num: int, batch: int | None = None) -> None:
    """Check integer labels in ``[0, num)`` of shape ``(batch,)``.

    The range is read only where :func:`concrete` allows (on a GPU an index out of range still stops
    the embedding in a device-side assert)."""
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    shape(name, y, (batch,))
    if y.numel() and concrete(y) and (int(y.min()) < 0 or int(y.max()) >= num):
        raise ValueError(f"{name}: expected values in [0, {num}), got range [{int(y.min())}, {int(y.max())}]")
