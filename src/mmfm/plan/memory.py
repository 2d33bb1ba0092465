"""GPU memory of a job, counted by running its real code on fake tensors (no GPU, no weights, no data).

Inside :func:`fake_device` every tensor is a ``FakeTensor`` (``torch._subclasses.fake_tensor``): shapes,
dtypes, strides and storages behave as on a device, but nothing is allocated or computed. A
:class:`MemoryTracker` (a ``TorchDispatchMode`` under the fake mode) sees every storage that an operator
creates and the moment its last reference dies, so ``tracker.peak`` is the peak of the bytes alive at
once: parameters, gradients, DDP buckets, optimizer and EMA state, the GMM source, the batch, the
activations kept for backward and the transients of each operator, exactly as the code holds them.

The count agrees with the CPU allocator to the byte: a real CPU step run under ``torch.profiler``
(``profile_memory=True``; its ``[memory]`` events are the allocator's own allocations and frees) has the
same peak as the same step traced here (``tests/plan/test_memory.py`` checks it within 5 %). On a GPU two
things differ, and the plan adds them:

- the CUDA caching allocator rounds every block up to a multiple of 512 bytes (``round_to``);
- memory outside PyTorch's tensors: the CUDA context, cuBLAS / NCCL workspaces and the allocator's
  fragmentation, covered by ``GPU_RESERVE_BYTES`` and ``GPU_FRAGMENTATION`` in :func:`gpu_need`.

Autocast: fake CUDA tensors cannot run backward without a driver, so traces run on the fake CPU device
with CPU autocast standing in for CUDA autocast (:func:`autocast`). For the operators of our networks
(linear, matmul, scaled-dot-product attention, the norms, the pointwise ops) both autocast tables give
the same output dtypes; ``tests/plan/test_memory.py`` compares them operator by operator on a forward
pass (forward alone does run on fake CUDA tensors).

DDP: :func:`fake_process_group` starts torch's ``fake`` process-group backend (collectives return at
once) and :func:`ddp` wraps a module in the real ``DistributedDataParallel``, whose C++ reducer then
allocates its real gradient buckets; a communication hook stands for the in-place all-reduce (and
the bucket rebuild of the second iteration is skipped, see :class:`_NoRebuild`).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Block granularity of the CUDA caching allocator (``kMinBlockSize``).
CUDA_BLOCK_BYTES = 512
#: Memory a GPU process holds outside its tensors: CUDA context and kernels (~0.5 GiB on Hopper), cuBLAS
#: workspaces and NCCL's buffers (~0.5 GiB for 8 ranks).
GPU_RESERVE_BYTES = 1 << 30
#: Caching-allocator fragmentation allowed on top of the tensors' peak (reserved / allocated, typically
#: 1.02 - 1.10 for a fixed-shape training loop).
GPU_FRAGMENTATION = 0.10


def gpu_need(peak_bytes: int) -> int:
    """Bytes a GPU must have for a process whose tensors peak at ``peak_bytes`` (rounded blocks):
    ``peak * (1 + GPU_FRAGMENTATION) + GPU_RESERVE_BYTES``."""
    return int(peak_bytes * (1 + GPU_FRAGMENTATION)) + GPU_RESERVE_BYTES


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the storages created while it is active.

    ``round_to``: each storage counts ``ceil(nbytes / round_to) * round_to`` bytes (512 for CUDA).
    ``mark(name)`` records the live bytes at a point (``marks[name]``); ``peaks[name]`` is the peak
    between the previous mark and this one. Storages that existed before the tracker started are not
    counted (create everything inside it).
    """

    def __init__(self, round_to: int = 1):
        super().__init__()
        self.round_to = int(round_to)
        self.live = self.peak = 0
        self._since = 0  # peak since the last mark
        self._sizes: dict[int, int] = {}
        self.marks: dict[str, int] = {}
        self.peaks: dict[str, int] = {}

    def _size(self, nbytes: int) -> int:
        r = self.round_to
        return -(-nbytes // r) * r if r > 1 else nbytes

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._sizes:
                    self._sizes[key] = n = self._size(storage.nbytes())
                    self.live += n
                    weakref.finalize(storage, self._free, key)
        self._since = max(self._since, self.live)
        self.peak = max(self.peak, self.live)
        return out

    def mark(self, name: str) -> int:
        """Record and return the bytes alive now under ``name``."""
        self.marks[name], self.peaks[name] = self.live, self._since
        self._since = self.live
        return self.live


@contextlib.contextmanager
def fake_device():
    """Fake tensors on the CPU device (see the module docstring); yields the ``FakeTensorMode``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        yield mode


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None):
    """CPU autocast to ``dtype`` standing for CUDA autocast in a trace (``None``: no autocast)."""
    if dtype is None:
        yield
        return
    with torch.autocast("cpu", dtype=dtype):
        yield


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """``torch.distributed`` initialized as rank 0 of ``world_size`` with the ``fake`` backend, for DDP
    inside a trace; the group is destroyed afterwards. Refuses to run inside a real process group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan: a memory trace cannot run inside an initialized torch.distributed process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=int(world_size))
    try:
        yield
    finally:
        dist.destroy_process_group()


def ddp(module: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(module, **kwargs)`` over fake tensors and the fake process group.

    DDP's construction checks parameter shapes across ranks and broadcasts rank 0's values, both
    collectives that read data; they are skipped here (every rank builds the same model from the same
    seed). The reducer and its buckets are DDP's own. The comm hook returns each bucket as reduced in
    place, as NCCL's all-reduce does."""
    import torch.nn.parallel.distributed as ddp_module

    names = ("_verify_param_shape_across_processes", "_sync_module_states")
    saved = {n: getattr(ddp_module, n) for n in names}
    try:
        for n in names:
            setattr(ddp_module, n, lambda *a, **k: None)
        wrapped = torch.nn.parallel.DistributedDataParallel(module, **kwargs)
    finally:
        for n, f in saved.items():
            setattr(ddp_module, n, f)

    def in_place(state, bucket):
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    wrapped.register_comm_hook(None, in_place)
    wrapped.reducer = _NoRebuild(wrapped.reducer)
    return wrapped


class _NoRebuild:
    """DDP's reducer, but the bucket rebuild of the second iteration (buckets re-ordered by the first
    backward's gradient order, copied over, then the old ones freed) is skipped: it reads gradient data,
    which fake tensors do not have. The rebuilt buckets have the same sizes, and the rebuild happens
    before the forward pass, when far less memory is alive than at the step's peak."""

    def __init__(self, reducer):
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._reducer, name)


def cpu_allocator_peak(fn, *args, **kwargs) -> tuple[int, object]:
    """``(peak bytes, fn's result)`` of a real CPU run of ``fn``, from the allocator events that
    ``torch.profiler`` records with ``profile_memory=True`` (an independent check of the tracker)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, out
