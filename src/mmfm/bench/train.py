"""``mmfm bench train``: training throughput of a DiTDH preset, and its model FLOPs utilization.

The loop's own optimizer step (:class:`mmfm.train.step.TrainStep`: coupling, times, the network under
bf16 autocast on a GPU (fp32 on the CPU), the velocity loss, backward, gradient clipping at 1, the fused
AdamW, the EMA) on random data of the latent's shape, for ``--conditioning none`` (Gaussian source),
``class`` (1000 labels, dropout 0.1) or ``mode`` (a random ``--modes``-mode GMM source in fp16 with soft
mode coupling and the adaptive weighting). After ``warmup`` steps, ``steps`` are timed (synchronized on
CUDA). Then two more steps run under :class:`HostSyncCounter`: ``host_syncs_per_step`` is the number of
device-to-host reads a step makes, counted (a GPU step never reads back between log steps; the target
is 0). With ``--compile``, ``graph_breaks`` is ``torch._dynamo.explain``'s count on the network.

``flops_per_sample`` is counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over
one forward and backward pass of the same batch (matrix products, convolutions and attention),
divided by the batch. ``mfu = flops_per_sample * samples_per_s / peak``, with ``peak`` the dense
bf16 tensor-core rate of the device: ``PEAK_BF16``, a table of data-sheet figures keyed by the
exact string ``torch.cuda.get_device_name`` returns (compared after trimming whitespace, never by
substring, so an H100 SXM is not taken for an H100 PCIe and a MIG slice is not taken for the whole
GPU). ``mfu`` is ``null`` on the CPU and on a device the table lacks; for the latter a one-line
notice naming the device goes to stderr, once per name. The release trains DiTDH-XL at about
42 images/s per A100 (docs/method.md §5: 25k steps in 21 h on 8 GPUs), reported as
``release_a100_samples_per_s`` for comparison.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmfm import _checks
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


def count_flops(model: torch.nn.Module, batch: tuple, y=None) -> int:
    """FLOPs of one forward + backward pass on ``batch = (x_t, t, target)``."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, target = batch
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, y)
        if isinstance(out, torch.Tensor):
            velocity_loss(out, target).backward()
        else:  # a GMFlow head (mmfm.flow.gm.GMOutput): its mixture mean, with every output in the graph
            (velocity_loss(out.mean(), target) + 0.0 * out.logstd.float().sum()).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def count_objective_flops(step, inputs: dict, rows: int) -> int:
    """FLOPs of the objective's network calls and backward on ``rows`` rows of one step (DMF: the diagonal
    branch, the JVP or the two no-grad passes of the difference, the backward), forward-mode tangents included."""
    from torch.utils.flop_counter import FlopCounterMode

    batch, cond, _ = step.draw(inputs["x1"], inputs["cls"], inputs["label"], 0)
    part = {k: (v[:rows] if v is not None else None) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        per_row, _ = step.objective.forward_loss(step.model, step.inner, part, {k: c[:rows] for k, c in cond.items()})
        per_row.mean().backward()
    step.raw.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class HostSyncCounter(TorchDispatchMode):
    """Counts the operators that make the host wait for the device: ``aten._local_scalar_dense`` (behind
    ``item()``, ``float()``, ``int()``, ``bool()`` of a tensor) and those whose output shape depends on
    the data (``nonzero``, ``masked_select``, ``unique``, ``bincount``, ...), plus copies to the CPU from
    another device. Run under :func:`mmfm._checks.as_on_accelerator`, a CPU step counts what the same
    step on a GPU would."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
               "unique_consecutive", "unique_dim", "bincount", "repeat_interleave", "histc", "is_nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.count, self.ops = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        to_host = name in ("_to_copy", "copy_") and any(
            isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args[:2]) and \
            str(kwargs.get("device", args[0].device if name == "copy_" else "")) == "cpu"
        if name in self.SYNCING or to_host:
            self.count += 1
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **kwargs)


def graph_breaks(model: torch.nn.Module, *args, **kwargs) -> int:
    """Graph breaks of ``model(*args, **kwargs)`` under ``torch.compile`` (``torch._dynamo.explain``)."""
    import torch._dynamo

    torch._dynamo.reset()
    return int(torch._dynamo.explain(model)(*args, **kwargs).graph_break_count)


def _bench_step(preset: str, batch: int, accumulation: int, in_channels: int, num_tokens: int, device,
                compile: bool, conditioning: str, modes: int, seed: int, method: str = "fm"):
    """The loop's :class:`~mmfm.train.step.TrainStep` over random data: ``(step, inputs, raw model)``.

    ``conditioning`` ``mode``: a random ``modes``-mode spatial GMM source (fp16 means, as the presets) and
    CLS GMM with soft mode coupling and the adaptive weighting; ``class``: 1000 classes with label dropout
    0.1; ``none``: the Gaussian source. ``method`` ``gmflow``: the GM head of the loop's defaults (J = 8, G of
    ``TrainConfig.gm_groups_for``) and the transition loss (ratio 0.5)."""
    from mmfm.flow.couplings import make_coupling
    from mmfm.flow.path import LinearPath
    from mmfm.flow.sources import GaussianMixtureSource, GaussianSource
    from mmfm.flow.time import TimeSampler, shift_factor
    from mmfm.train.config import TrainConfig
    from mmfm.train.ema import EMA
    from mmfm.train.step import TrainStep, make_optimizer
    from mmfm.train.weighting import AdaptiveModeWeighting

    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    labels = {"none": 0, "class": 1000, "mode": modes}[conditioning]
    cfg = TrainConfig.from_dict({"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.0})
    head = {}
    if method == "gmflow":
        head = {"head": "gm", "gm_components": cfg.gm_components, "gm_groups": cfg.gm_groups_for(in_channels),
                "gm_logstd_hidden": cfg.gm_logstd_hidden, "gm_logstd_layers": cfg.gm_logstd_layers}
    if method.startswith("dmf"):
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "method": "dmf", "model": preset,
                                     "dmf_derivative": method.removeprefix("dmf-")})
        head = {"dmf_depth": cfg.dmf_depth_of()}
    if method == "dfm":  # the loop's defaults: 2 stages, [0.9, 0.1], bands
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "method": "dfm", "model": preset})
        head = {"dfm_stages": cfg.dfm_stages}
    model = build_ditdh(preset, in_channels=in_channels, num_tokens=num_tokens, conditioning=conditioning,
                        num_classes=labels, class_dropout_prob=0.1 if conditioning == "class" else 0.0,
                        **head).to(device)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ema = EMA(model, 0.9995)
    weighting = None
    if conditioning == "mode":
        w = torch.full((modes,), 1.0 / modes, dtype=torch.float64)
        means = torch.randn(modes, num_tokens, in_channels, generator=gen).to(device=device, dtype=torch.float16)
        source = GaussianMixtureSource(w.to(device), means, torch.full((modes,), 0.5, device=device))
        cls_means = torch.randn(modes, in_channels, generator=gen, dtype=torch.float64)
        assigner = GaussianMixtureSource(w, cls_means, torch.ones(modes, in_channels, dtype=torch.float64)).to(device)
        coupling = make_coupling("mode", source, assigner=assigner, assignment="soft")
        weighting = AdaptiveModeWeighting(modes, warmup_steps=1, device=device)
    else:
        source = GaussianSource((num_tokens, in_channels))
        coupling = make_coupling("independent", source)
    objective = None
    if method != "fm":
        from mmfm.train.objective import make_objective

        objective = make_objective(cfg if method != "gmflow" else TrainConfig.from_dict({"method": "gmflow"}),
                                   source, dim=num_tokens * in_channels, num_tokens=num_tokens)
    times = TimeSampler("logit_normal", shift=shift_factor(num_tokens * in_channels))
    net = torch.compile(model) if compile else model
    autocast = contextlib.nullcontext
    if device.type == "cuda":
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    per_rank = batch * accumulation
    step = TrainStep(model=net, raw=model, optimizer=optimizer, scheduler=scheduler, ema=ema, coupling=coupling,
                     times=times, path=LinearPath(), generator=torch.Generator(device=device).manual_seed(seed),
                     global_batch=per_rank, micro=batch, accumulation=accumulation, conditioning=conditioning,
                     class_dropout_prob=0.1 if conditioning == "class" else 0.0, weighting=weighting,
                     autocast=autocast, grad_clip=1.0, seed=seed, objective=objective)
    inputs = {"x1": torch.randn(per_rank, num_tokens, in_channels, generator=gen).to(device),
              "cls": torch.randn(per_rank, in_channels, generator=gen).to(device) if conditioning == "mode" else None,
              "label": torch.randint(0, 1000, (per_rank,), generator=gen).to(device) if conditioning == "class"
              else None}
    return step, inputs, model


METHODS = ("fm", "gmflow", "dmf", "dfm")


def bench_train(preset: str = "ditdh-s", batch: int = 8, steps: int = 5, warmup: int = 2, in_channels: int = 768,
                num_tokens: int = 256, device: str | None = None, compile: bool = False, seed: int = 0,
                conditioning: str = "none", modes: int = 64, accumulation: int = 1, method: str = "fm") -> dict:
    """Run the measurement; returns the JSON object ``mmfm bench train`` prints.

    ``method`` ``gmflow``: the GMFlow step (GM head, transition loss), and beside it, measured in the same run
    on the same preset and batch, the flow-matching step (``fm``: its steps/s, FLOPs and parameters) and the
    ratios ``gmflow / fm`` (``overhead``). ``dmf``: the DMF fine-tune's step with the JVP (the figures) and with
    the central difference (``fd``), each beside ``fm`` (``overhead``, ``fd_overhead``); FLOPs are counted over
    the objective's whole step (both branches, the tangents, the backward). ``dfm``: the DFM step (2 stages: the
    coarse stage's embedders, time embedder and output layer besides the DiTDH's) beside ``fm``."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    args = (preset, batch, steps, warmup, in_channels, num_tokens, device, compile, seed, conditioning, modes,
            accumulation)
    if method == "fm":
        return _bench_train(*args, "fm")
    _bench_train(*args[:2], 1, 1, *args[4:], "fm")  # the process's first step pays one-time costs: not timed
    anchor = _bench_train(*args, "fm")
    keys = ("steps_per_s", "flops_per_sample", "parameters", "peak_memory_gb", "peak_memory_gb_per_sample")
    ratio = (lambda a: {k: a[k] / anchor[k] for k in keys if a[k] is not None and anchor[k]})  # noqa: E731
    out = _bench_train(*args, "dmf-jvp" if method == "dmf" else method)
    if method == "dmf":
        fd = _bench_train(*args, "dmf-fd")
        out["fd"] = {k: fd[k] for k in keys + ("host_syncs_per_step",)}
        out["fd_overhead"] = ratio(fd)
    out["fm"] = {k: anchor[k] for k in keys}
    out["overhead"] = ratio(out)
    return out


def _bench_train(preset, batch, steps, warmup, in_channels, num_tokens, device, compile, seed, conditioning, modes,
                 accumulation, method) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for key, value in (("batch", batch), ("steps", steps), ("modes", modes), ("accumulation", accumulation)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    if conditioning not in ("none", "class", "mode"):
        raise ValueError(f"conditioning: expected one of ['class', 'mode', 'none'], got {conditioning!r}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, inputs, model = _bench_step(preset, batch, accumulation, in_channels, num_tokens, device, compile,
                                      conditioning, modes, seed, method)
    x = inputs["x1"][:batch]
    t = torch.full((batch,), 0.5, device=device)
    y = {"none": None, "class": inputs["label"], "mode": torch.zeros(batch, dtype=torch.long, device=device)}[
        conditioning]
    y = None if y is None else y[:batch]
    if method == "dfm":  # the packed stages and a time per stage
        x = torch.randn(batch, model.pyramid.packed_tokens, in_channels, device=device)
        t = torch.full((batch, model.dfm_stages), 0.5, device=device)
    staged = method.startswith("dmf") or method == "dfm"
    flops = count_objective_flops(step, inputs, batch) if staged else count_flops(model, (x, t, x), y)
    breaks = graph_breaks(model, x, t, y) if compile else None
    at = 0

    def run(n: int):
        nonlocal at
        out = None
        for _ in range(n):
            out = step(inputs["x1"], inputs["cls"], inputs["label"], step=at)
            at += 1
        return out

    run(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    counter = HostSyncCounter()
    with _checks.as_on_accelerator(), counter:  # not timed: a Python dispatch mode slows every operator
        run(2)
    if not bool(out["finite"]):
        raise ValueError(f"bench train: the loss went non-finite ({float(out['loss'])}) on {preset}")
    name, peak = device_peak(device)
    per_step = batch * accumulation
    sps = per_step * steps / seconds
    fps = flops / batch
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"preset": preset, "method": method, "device": name, "conditioning": conditioning, "batch": batch,
            "accumulation": accumulation, "steps": steps, "precision": "bf16" if device.type == "cuda" else "fp32",
            "compile": compile, "parameters": count_parameters(model), "latent": [num_tokens, in_channels],
            "optimizer": "AdamW(fused=True), the loop's", "steps_per_s": steps / seconds, "samples_per_s": sps,
            "flops_per_sample": fps, "achieved_flops_per_s": fps * sps, "peak_flops_per_s": peak,
            "mfu": None if peak is None else fps * sps / peak,
            "host_syncs_per_step": counter.count / 2, "host_sync_ops": counter.ops, "graph_breaks": breaks,
            "release_a100_samples_per_s": RELEASE_A100_SAMPLES_PER_S,
            "peak_memory_gb": peak_gb, "peak_memory_gb_per_sample": None if peak_gb is None else peak_gb / batch}
