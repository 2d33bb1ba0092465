"""One device policy for every command that runs on GPUs (train, sample, and what comes later).

- **Asked means required.** A job that asked for GPUs (``--device cuda``, or a rule with ``gpu >= 1``)
  stops with :class:`DeviceError` when CUDA is unusable, and the message says why: no CUDA in this
  torch build, ``CUDA_VISIBLE_DEVICES`` hiding every device, the driver refusing this torch's CUDA
  (the text of torch's own warning, e.g. a driver too old for a CUDA 13 build), or no device at all.
  Only ``allow_cpu_fallback`` (``--allow-cpu-fallback``; the workflow key ``allow_cpu_fallback``,
  which the CI cluster's fake GPUs set) turns that into a warning and the CPU.
- **No more processes than devices.** ``--nproc N`` on CUDA needs ``N`` visible devices on the node.
- **Each rank binds its own GPU.** :func:`bind` calls ``torch.cuda.set_device(LOCAL_RANK)`` and
  :func:`process_group` passes ``device_id=cuda:LOCAL_RANK`` to ``init_process_group``, so
  ``barrier()`` and ``all_gather_object`` of every rank run on that rank's device, never on
  ``cuda:0``.
- **Threads are shared, not multiplied.** A job of ``T`` threads running ``P`` processes on a node
  gives each process ``max(1, T // P)`` OpenMP / MKL / BLAS threads (:func:`thread_env`).

Nothing here initializes CUDA in a launcher process (``is_available`` and ``device_count`` do not
create a context), so the launcher takes no memory on GPU 0.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings

#: Environment variables that size a process's CPU thread pools.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")
#: Present on Linux when the NVIDIA kernel driver is loaded.
NVIDIA_DRIVER = "/proc/driver/nvidia/version"
#: How long a collective may wait for the slowest rank (rank 0 writing a 13 GB checkpoint included).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class DeviceError(ValueError):
    """The device a job asked for cannot be used; the message names the setting and the reason."""


def cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, or ``None`` when it can."""
    import torch

    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every device"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if usable and torch.cuda.device_count() > 0:
        return None
    told = " ".join(str(w.message).strip() for w in caught if "CUDA" in str(w.message))
    where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if told:
        why = told
    elif not os.path.exists(NVIDIA_DRIVER):
        why = f"no NVIDIA driver is loaded on this node ({NVIDIA_DRIVER} is missing)"
    else:
        why = f"no CUDA device is visible{where}"
    return f"{why}; torch {torch.__version__} is built for CUDA {torch.version.cuda}"


def resolve(device: str | None, *, gpus: int = 0, allow_cpu_fallback: bool = False, key: str = "--device") -> str:
    """The device type a command runs on: ``"cuda"`` or ``"cpu"``.

    ``device``: ``"cuda"`` / ``"cuda:N"`` (required), ``"cpu"``, or ``None`` / ``"auto"`` (CUDA when usable).
    ``gpus``: GPUs the job asked for (a rule's ``gpu`` resource): ``gpus >= 1`` makes CUDA required.
    ``key``: the setting named in the error (``--device``, or ``resources gpu`` for a workflow rule).
    """
    asked = str(device or "auto")
    if asked == "cpu" and int(gpus) <= 0:
        return "cpu"
    if not (asked in ("auto", "cuda", "cpu") or asked.startswith("cuda:")):
        raise DeviceError(f"{key}: expected cpu, cuda, cuda:N or auto, got {device!r}")
    required = asked.startswith("cuda") or int(gpus) > 0
    problem = cuda_problem()
    if problem is None:
        return "cuda"
    if not required:
        return "cpu"
    what = f"{key}: {gpus}" if int(gpus) > 0 else f"{key} {asked}"
    if allow_cpu_fallback:
        warnings.warn(f"{what} asks for CUDA, which is unusable here ({problem}); running on the CPU because "
                      "allow_cpu_fallback is set", stacklevel=2)
        return "cpu"
    raise DeviceError(f"{what}: CUDA is unusable here: {problem}. Fix the node or the torch build, or set "
                      "allow_cpu_fallback (--allow-cpu-fallback) to run on the CPU")


def check_nproc(nproc: int, device_type: str, key: str = "--nproc") -> None:
    """Refuse more CUDA processes on a node than it has visible devices."""
    if not (isinstance(nproc, int) and nproc >= 1):
        raise DeviceError(f"{key}: expected a positive integer, got {nproc!r}")
    if device_type != "cuda":
        return
    import torch

    count = torch.cuda.device_count()
    if nproc > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(f"{key} {nproc}: only {count} CUDA device(s) are visible on this node"
                          + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                          + f"; use at most {key} {count}, or more nodes")


def threads_per_process(threads: int | None, nproc: int) -> int:
    """CPU threads for each of ``nproc`` processes sharing ``threads`` (default: this process's CPUs)."""
    total = int(threads) if threads else len(os.sched_getaffinity(0))
    return max(1, total // max(1, int(nproc)))


def thread_env(threads: int | None, nproc: int) -> dict[str, str]:
    """The thread variables for the ``nproc`` processes of a node (see :data:`THREAD_VARS`)."""
    n = str(threads_per_process(threads, nproc))
    return {var: n for var in THREAD_VARS}


def job_threads() -> int | None:
    """The threads this job was given: ``OMP_NUM_THREADS`` as Snakemake sets it, else ``None``."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def local_rank() -> int:
    """``LOCAL_RANK`` of a launched process (0 outside a launcher)."""
    value = os.environ.get("LOCAL_RANK", "0")
    if not value.isdigit():
        raise DeviceError(f"LOCAL_RANK: expected a non-negative integer, got {value!r}")
    return int(value)


def bind(device_type: str, device: str | None = None):
    """This process's ``torch.device``: ``cuda:LOCAL_RANK`` (made current with ``torch.cuda.set_device``) on
    CUDA, the CPU otherwise. A single process asked for ``cuda:N`` gets ``cuda:N``."""
    import torch

    if device_type != "cuda":
        return torch.device("cpu")
    if device is not None and str(device).startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        index = int(str(device).split(":", 1)[1])
    else:
        index = local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"LOCAL_RANK {index}: this node shows only {count} CUDA device(s)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextlib.contextmanager
def process_group(device):
    """Join the process group when launched with ``WORLD_SIZE > 1`` and leave it afterwards: NCCL with
    ``device_id=device`` on CUDA (each rank's collectives on its own GPU), gloo on the CPU."""
    import torch.distributed as dist

    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        joined = True
    try:
        yield
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def set_parent_death_signal(signum: int, parent: int | None = None) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so
    workers whose launcher was killed with SIGKILL checkpoint and stop instead of training on unowned.
    ``parent``: the launcher's PID; if it is already gone, the signal is raised at once. Returns whether
    the request took (Linux only)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        ok = ctypes.CDLL(None, use_errno=True).prctl(1, int(signum), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return False
    if ok and parent is not None and os.getppid() != parent:  # the launcher died before the request took
        os.kill(os.getpid(), signum)
    return ok
