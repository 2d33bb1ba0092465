"""``mmfm bench train``: training throughput of a DiTDH preset, and its model FLOPs utilization.

One training step as the loop runs it: a linear-path batch (``x_t = (1 - t) x0 + t x1``, target
``x1 - x0``) through the network under bf16 autocast on a GPU (fp32 on the CPU), the velocity
loss, backward, gradient clipping at 1 and an AdamW step. After ``warmup`` steps, ``steps`` are
timed (synchronized on CUDA).

``flops_per_sample`` is counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over
one forward and backward pass of the same batch (matrix products, convolutions and attention),
divided by the batch. ``mfu = flops_per_sample * samples_per_s / peak``, with ``peak`` the dense
bf16 tensor-core rate of the device (a table of data-sheet figures, by device name); it is
``null`` on the CPU or an unknown device. The release trains DiTDH-XL at about 42 images/s per
A100 (method.md §5: 25k steps in 21 h on 8 GPUs), reported as ``release_a100_samples_per_s`` for
comparison.
"""

from __future__ import annotations

import time

import torch

from mmfm.flow.loss import velocity_loss
from mmfm.models.ditdh import build_ditdh, count_parameters

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by substring
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
             "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "V100": 125e12}
RELEASE_A100_SAMPLES_PER_S = 42.0


def device_peak(device: torch.device) -> tuple[str, float | None]:
    """``(device name, dense bf16 peak FLOP/s or None)``."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


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
