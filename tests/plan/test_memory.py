"""The memory tracker against the CPU allocator, and the CPU autocast stand-in against CUDA autocast."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmfm.models import layers
from mmfm.models.ditdh import build_ditdh
from mmfm.plan import memory


def _step(batch: int):
    torch.manual_seed(0)
    model = build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for _ in range(2):
        x = torch.randn(batch, 16, 8)
        loss = (model(x, torch.rand(batch)) - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("batch", [4, 32])
def test_tracker_on_fake_tensors_equals_the_cpu_allocator(one_thread, batch):
    """The fake trace allocates nothing, yet its peak is the real CPU run's peak as the allocator saw it."""
    measured, _ = memory.cpu_allocator_peak(_step, batch)
    with memory.fake_device(), memory.MemoryTracker() as tracker:
        _step(batch)
    assert measured > 0
    assert tracker.peak == measured


def test_rounding_to_cuda_blocks():
    with memory.fake_device(), memory.MemoryTracker(round_to=512) as tracker:
        a = torch.empty(3, dtype=torch.uint8)
        b = torch.empty(513, dtype=torch.uint8)
        assert tracker.live == 512 + 1024
        del a
        assert tracker.live == 1024
        del b
    assert tracker.live == 0 and tracker.peak == 1536
    assert memory.gpu_need(10 << 30) == int((10 << 30) * (1 + memory.GPU_FRAGMENTATION)) + memory.GPU_RESERVE_BYTES


_ATTENTION = F.scaled_dot_product_attention

#: Operators that only re-stride or alias (and the copy ``reshape`` makes of a non-contiguous tensor): the
#: attention kernels of CUDA and CPU return different strides, the dtypes around them are the question.
LAYOUT = {"view", "_unsafe_view", "clone", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "detach",
          "alias", "reshape", "contiguous", "split", "unbind", "slice", "select"}


class _Dtypes(TorchDispatchMode):
    """(operator, output dtypes) of every computing operator; attention is recorded as one entry."""

    def __init__(self):
        super().__init__()
        self.seq, self.muted = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.muted and name != "device" and name not in LAYOUT:
            self.seq.append((name, tuple(t.dtype for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))))
        return out


@contextlib.contextmanager
def _cuda_autocast():
    """CUDA autocast switched on below ``torch.autocast`` (which refuses without a driver)."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", False)
        torch.clear_autocast_cache()


def _forward_dtypes(device: str, autocast, monkeypatch) -> list:
    rec = _Dtypes()
    real = _ATTENTION

    def attention(q, k, v, **kw):  # CUDA's fused kernel and CPU's differ in their internals only
        rec.muted = True
        try:
            out = real(q, k, v, **kw)
        finally:
            rec.muted = False
        rec.seq.append(("attention", (out.dtype,)))
        return out

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", attention)
    with memory.fake_device():
        with torch.device(device):
            model = build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16, conditioning="mode", num_classes=5)
            x, t, y = torch.randn(2, 16, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
        with autocast(), rec:
            model(x, t, y)
    return rec.seq


def test_cpu_autocast_gives_cuda_autocasts_dtypes(monkeypatch):
    """Operator by operator, the network's forward under CPU autocast (what traces use) has the output
    dtypes of CUDA autocast (forward alone runs on fake CUDA tensors)."""
    cuda = _forward_dtypes("cuda", _cuda_autocast, monkeypatch)
    cpu = _forward_dtypes("cpu", lambda: memory.autocast(torch.bfloat16), monkeypatch)
    assert any(torch.bfloat16 in d for _, d in cuda) and any(torch.float32 in d for _, d in cuda)
    assert cpu == cuda


def test_cpu_attention_saves_what_flash_attention_saves():
    """On the CPU, attention runs the fused flash kernel: bf16 output and an fp32 log-sum-exp of
    (B, heads, N), the tensors CUDA's flash attention keeps for backward."""
    q = torch.randn(2, 3, 16, 8, dtype=torch.bfloat16)
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32 and out[1].shape == (2, 3, 16)
