"""The GPU kinds ``mmfm plan --gpu`` knows: memory and dense peak FLOP/s by precision.

``memory_bytes`` is the total the driver reports (``nvidia-smi``'s ``memory.total``, MiB), which is what a
process can at most allocate (less the CUDA context, counted by :func:`mmfm.plan.memory.gpu_need`).

Peaks are dense (no 2:4 sparsity) data-sheet figures:

- ``bf16``: the tensor-core rate, taken from :data:`mmfm.bench.train.PEAK_BF16` by the exact device name the
  driver reports (the table ``mmfm bench train`` computes MFU against), so a plan and a measured MFU use one
  figure;
- ``tf32``: the tensor-core TF32 rate; PyTorch uses it for fp32 convolutions (``torch.backends.cudnn.allow_tf32``
  is true by default) but not for fp32 matrix products (``torch.backends.cuda.matmul.allow_tf32`` is false by
  default, and nothing in mmfm turns it on);
- ``fp32``: the CUDA-core FP32 rate, for fp32 matrix products and attention.

A100 data sheet: FP32 19.5 TFLOPS, TF32 Tensor Core 156 | 312* TFLOPS, BF16 312 | 624*. H100 SXM data sheet:
FP32 67 TFLOPS, TF32 Tensor Core 989* (494.5 dense), BF16 1,979* (989 dense). H200 (SXM) data sheet: the same
figures as H100 SXM (FP32 67, TF32 989*, BF16 1,979*).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    """One GPU kind: its ``--gpu`` name, the driver's device name, memory and dense peaks (FLOP/s)."""

    key: str
    device_name: str
    memory_bytes: int
    fp32: float
    tf32: float

    @property
    def bf16(self) -> float:
        from mmfm.bench.train import PEAK_BF16  # (imports torch)

        return PEAK_BF16[self.device_name]

    def peak(self, precision: str, kind: str = "matmul") -> float:
        """Dense peak FLOP/s for ``precision`` (``bf16`` | ``fp32``) and operator ``kind`` (``matmul`` |
        ``conv``): bf16 autocast runs both on bf16 tensor cores; fp32 runs convolutions as TF32 (cuDNN's
        default) and matrix products on the FP32 cores (PyTorch's default)."""
        if precision == "bf16":
            return self.bf16
        return self.tf32 if kind == "conv" else self.fp32


GPUS: dict[str, GPU] = {
    g.key: g for g in (
        GPU("a100-40gb", "NVIDIA A100-SXM4-40GB", 40960 * MIB, 19.5e12, 156e12),
        GPU("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920 * MIB, 19.5e12, 156e12),
        GPU("h100-80gb", "NVIDIA H100 80GB HBM3", 81559 * MIB, 67e12, 494.5e12),
        GPU("h200", "NVIDIA H200", 143771 * MIB, 67e12, 494.5e12),
    )
}
DEFAULT_GPU = "a100-80gb"


def gpu(key: str) -> GPU:
    """The GPU kind ``key``; an unknown one is a ``ValueError`` that lists the known ones."""
    if key not in GPUS:
        raise ValueError(f"--gpu: unknown GPU {key!r}; known: {', '.join(GPUS)}")
    return GPUS[key]
