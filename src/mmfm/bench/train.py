"""``mmfm bench train``: training throughput of a DiTDH preset, and its model FLOPs utilization.

One training step as the loop runs it: a linear-path batch (``x_t = (1 - t) x0 + t x1``, target
``x1 - x0``) through the network under bf16 autocast on a GPU (fp32 on the CPU), the velocity
loss, backward, gradient clipping at 1 and an AdamW step. After ``warmup`` steps, ``steps`` are
timed (synchronized on CUDA).

``flops_per_sample`` is counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over
one forward and backward pass of the same batch (matrix products, convolutions and attention),
divided by the batch. ``mfu = flops_per_sample * samples_per_s / peak``, with ``peak`` the dense
bf16 tensor-core rate of the device: ``PEAK_BF16``, a table of data-sheet figures keyed by the
exact string ``torch.cuda.get_device_name`` returns (compared after trimming whitespace, never by
substring, so an H100 SXM is not taken for an H100 PCIe and a MIG slice is not taken for the whole
GPU). ``mfu`` is ``null`` on the CPU and on a device the table lacks; for the latter a one-line
notice naming the device goes to stderr, once per name. The release trains DiTDH-XL at about
42 images/s per A100 (method.md §5: 25k steps in 21 h on 8 GPUs), reported as
``release_a100_samples_per_s`` for comparison.
"""

from __future__ import annotations

import sys
import time

import torch

from mmfm.flow.loss import velocity_loss
from mmfm.models.ditdh import build_ditdh, count_parameters

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, keyed by the exact name the CUDA driver
# reports (torch.cuda.get_device_name; the same string nvidia-smi prints). Every name below appears
# in NVIDIA's table of supported GPUs (open-gpu-kernel-modules README, "Compatible GPUs"); the
# A100, H100, H200, GH200 and L40S names were also checked against torch / nvidia-smi output of
# real machines. Figures are the vendor data sheets': those print
# most tensor rates "with sparsity" (2x dense, starred); where a sheet prints the dense figure it is
# used as is, otherwise half the sparse one, to whole TFLOP/s (as the Hopper white paper rounds).
# Left out on purpose: Tesla V100 (no bf16 tensor cores: 125 TFLOP/s is fp16), "NVIDIA H100"
# (a generic Hopper SKU name with no one data-sheet column), "NVIDIA A10G" (AWS part, no NVIDIA
# data sheet), GB200 (per-GPU rate depends on the rack configuration), and every MIG slice
# ("<GPU name> MIG 1g.10gb" etc.: a fraction of the SMs, so the full-GPU peak would be wrong).
PEAK_BF16: dict[str, float] = {
    # A100 data sheet: BFLOAT16 Tensor Core 312 TFLOPS | 624 TFLOPS* (all four boards)
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    # A40 data sheet: Peak BF16 Tensor TFLOPS with FP32 Accumulate 149.7 | 299.4*
    "NVIDIA A40": 149.7e12,
    # A10 data sheet: BF16 Tensor Core 125 TF | 250 TF*
    "NVIDIA A10": 125e12,
    # RTX A6000 (Ampere GA102 figures, as Microway tabulates them): BF16 tensor 154.8 | 309.7*
    "NVIDIA RTX A6000": 154.8e12,
    # L4 data sheet: BFLOAT16 Tensor Core 242 TFLOPS* -> 121 dense
    "NVIDIA L4": 121e12,
    # L40 / L40S data sheet: BFLOAT16 Tensor Core 181.05 | 362.1* (L40), 362.05 | 733* (L40S)
    "NVIDIA L40": 181.05e12,
    "NVIDIA L40S": 362.05e12,
    # H100 data sheet: BFLOAT16 Tensor Core 1,979* (SXM), 1,513* (PCIe), 1,671* (NVL) TFLOPS;
    # "specifications 1/2 lower without sparsity". The SXM5 board reports "80GB HBM3".
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    # H200 data sheet: BFLOAT16 Tensor Core 1,979* (SXM), 1,671* (NVL) TFLOPS
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    # GH200 data sheet: BFLOAT16 Tensor Core 1,979 TFLOPS* | 990 TFLOPS (one GPU; the names differ by
    # memory: LPDDR5X 480GB / 120GB, HBM3 96GB or HBM3e 144GB)
    "NVIDIA GH200 480GB": 990e12,
    "NVIDIA GH200 120GB": 990e12,
    "NVIDIA GH200 144G HBM3e": 990e12,
    # HGX B200 specifications: FP16/BF16 Tensor Core 4.5 PFLOPS* per GPU -> 2.25 dense
    "NVIDIA B200": 2250e12,
}
RELEASE_A100_SAMPLES_PER_S = 42.0
_NOTIFIED: set[str] = set()  # unknown device names already reported


def device_peak(device: torch.device) -> tuple[str, float | None]:
    """``(device name, dense bf16 peak FLOP/s or None)``.

    The name is looked up in ``PEAK_BF16`` exactly, after trimming whitespace, and case-sensitively:
    the keys are the driver's own strings, copied verbatim, so folding case would only hide a
    mistyped key. A name the table lacks (including a MIG slice) gives ``None``, with a one-line
    notice on stderr the first time that name is seen. The CPU gives ``("cpu", None)``.
    """
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device).strip()
    peak = PEAK_BF16.get(name)
    if peak is None and name not in _NOTIFIED:
        _NOTIFIED.add(name)
        mig = " (a MIG slice: a fraction of the GPU's SMs)" if " MIG " in f" {name} " else ""
        print(f"mmfm: no dense bf16 peak is known for CUDA device {name!r}{mig}, so MFU is reported as null; "
              f"to add a device, put its exact name and data-sheet dense bf16 FLOP/s into PEAK_BF16 in "
              f"{__name__.replace('.', '/')}.py", file=sys.stderr)
    return name, peak


def _batch(b: int, n: int, c: int, device, generator):
    x0 = torch.randn(b, n, c, generator=generator).to(device)
    x1 = torch.randn(b, n, c, generator=generator).to(device)
    t = torch.rand(b, generator=generator).to(device)
    tt = t.view(-1, 1, 1)
    return (1 - tt) * x0 + tt * x1, t, x1 - x0


def count_flops(model: torch.nn.Module, batch: tuple, y=None) -> int:
    """FLOPs of one forward + backward pass on ``batch = (x_t, t, target)``."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, target = batch
    with FlopCounterMode(display=False) as counter:
        velocity_loss(model(x, t, y), target).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def bench_train(preset: str = "ditdh-s", batch: int = 8, steps: int = 5, warmup: int = 2, in_channels: int = 768,
                num_tokens: int = 256, device: str | None = None, compile: bool = False, seed: int = 0) -> dict:
    """Run the measurement; returns the JSON object ``mmfm bench train`` prints."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for key, value in (("batch", batch), ("steps", steps)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_ditdh(preset, in_channels=in_channels, num_tokens=num_tokens).to(device)
    data = _batch(batch, num_tokens, in_channels, device, gen)
    flops = count_flops(model, data)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    net = torch.compile(model) if compile else model
    bf16 = device.type == "cuda"

    def step():
        x, t, target = data
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = velocity_loss(net(x, t), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise ValueError(f"bench train: the loss went non-finite ({loss.item()}) on {preset}")
    name, peak = device_peak(device)
    sps = batch * steps / seconds
    return {"preset": preset, "device": name, "batch": batch, "steps": steps, "precision": "bf16" if bf16 else "fp32",
            "compile": compile, "parameters": count_parameters(model), "latent": [num_tokens, in_channels],
            "steps_per_s": steps / seconds, "samples_per_s": sps, "flops_per_sample": flops / batch,
            "achieved_flops_per_s": flops / batch * sps, "peak_flops_per_s": peak,
            "mfu": None if peak is None else flops / batch * sps / peak,
            "release_a100_samples_per_s": RELEASE_A100_SAMPLES_PER_S,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
