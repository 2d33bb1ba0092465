import torch

from mmfm.bench.train import _batch, bench_train, count_flops, device_peak
from mmfm.models.ditdh import build_ditdh


def linear_macs(model, tokens):
    """Multiply-adds of the Linear layers applied to every token (adaLN and time MLPs act once per sample)."""
    per_token = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and "adaLN" not in n and "t_embedder" not in n]
    return sum(m.in_features * m.out_features for m in per_token) * tokens


def test_counted_flops_are_linear_in_batch_and_cover_the_matmuls():
    torch.manual_seed(0)
    model = build_ditdh("ditdh-tiny", in_channels=12, num_tokens=16)
    g = torch.Generator().manual_seed(0)
    one, four = (count_flops(model, _batch(b, 16, 12, "cpu", g)) for b in (1, 4))
    assert four == 4 * one
    # forward 2 MACs, backward 4 MACs per Linear weight use; attention and the 1x1 embeddings come on top
    macs = linear_macs(model, 16)
    assert 6 * macs <= one <= 6 * macs * 1.6


def test_bench_train_reports_throughput_and_no_mfu_on_cpu():
    out = bench_train("ditdh-tiny", batch=4, steps=2, warmup=1, in_channels=12, num_tokens=16, device="cpu")
    assert out["mfu"] is None and out["peak_flops_per_s"] is None and out["device"] == "cpu"
    assert out["samples_per_s"] == 4 * out["steps_per_s"] > 0
    assert out["flops_per_sample"] > 0 and out["parameters"] == sum(
        p.numel() for p in build_ditdh("ditdh-tiny", in_channels=12, num_tokens=16).parameters())
    assert device_peak(torch.device("cpu")) == ("cpu", None)
