import pytest
import torch

from mmfm.bench import train
from mmfm.bench.train import PEAK_BF16, bench_train, count_flops, device_peak
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
    batch = lambda b: (torch.randn(b, 16, 12, generator=g), torch.rand(b, generator=g),  # noqa: E731
                       torch.randn(b, 16, 12, generator=g))
    one, four = (count_flops(model, batch(b)) for b in (1, 4))
    assert four == 4 * one
    # forward 2 MACs, backward 4 MACs per Linear weight use; attention and the 1x1 embeddings come on top
    macs = linear_macs(model, 16)
    assert 6 * macs <= one <= 6 * macs * 1.6


def test_bench_train_reports_throughput_and_no_mfu_on_cpu(capsys):
    out = bench_train("ditdh-tiny", batch=4, steps=2, warmup=1, in_channels=12, num_tokens=16, device="cpu")
    assert out["mfu"] is None and out["peak_flops_per_s"] is None and out["device"] == "cpu"
    assert out["samples_per_s"] == 4 * out["steps_per_s"] > 0
    assert out["host_syncs_per_step"] == 0 and out["graph_breaks"] is None
    assert out["flops_per_sample"] > 0 and out["parameters"] == sum(
        p.numel() for p in build_ditdh("ditdh-tiny", in_channels=12, num_tokens=16).parameters())
    assert device_peak(torch.device("cpu")) == ("cpu", None)
    assert capsys.readouterr().err == ""  # the CPU is not an unknown device: no notice


@pytest.mark.slow
def test_bench_train_runs_the_loops_step_compiled_without_breaks():
    """Mode conditioning (GMM source, mode coupling, adaptive weighting) compiled, with accumulation; the
    other conditionings' graphs are checked in tests/models/test_compile.py."""
    out = bench_train("ditdh-tiny", batch=2, steps=1, warmup=1, in_channels=8, num_tokens=16, device="cpu",
                      compile=True, conditioning="mode", modes=5, accumulation=2)
    assert out["graph_breaks"] == 0 and out["host_syncs_per_step"] == 0 and out["host_sync_ops"] == {}
    assert out["samples_per_s"] == pytest.approx(4 * out["steps_per_s"]) and out["accumulation"] == 2


# the strings torch.cuda.get_device_name() returns, and each board's data-sheet dense bf16 peak
REAL_NAMES = [
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12),  # H100 SXM5
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 990e12),
    ("NVIDIA L40S", 362.05e12),
    ("NVIDIA L40", 181.05e12),
    ("NVIDIA B200", 2250e12),
]


@pytest.fixture
def gpu_named(monkeypatch):
    """Make ``torch.cuda.get_device_name`` report ``name``; forget which unknown names were reported."""
    monkeypatch.setattr(train, "_NOTIFIED", set())

    def use(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return use


@pytest.mark.parametrize("name, peak", REAL_NAMES)
def test_device_peak_matches_each_real_device_name_exactly(gpu_named, capsys, name, peak):
    gpu_named(name)
    assert device_peak(torch.device("cuda", 0)) == (name, peak)
    assert capsys.readouterr().err == ""


def test_h100_variants_get_their_own_peaks_not_the_first_substring_match(gpu_named):
    """"NVIDIA H100 80GB HBM3" contains "H100"; a substring table handed the SXM the PCIe peak."""
    peaks = {}
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"):
        gpu_named(name)
        peaks[name] = device_peak(torch.device("cuda", 0))[1]
    assert peaks == {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12}


def test_surrounding_whitespace_is_trimmed_but_case_and_spelling_are_not_folded(gpu_named, capsys):
    gpu_named("  NVIDIA H200\n")
    assert device_peak(torch.device("cuda", 0)) == ("NVIDIA H200", 989e12)
    assert capsys.readouterr().err == ""
    gpu_named("nvidia h200")
    assert device_peak(torch.device("cuda", 0)) == ("nvidia h200", None)


@pytest.mark.parametrize("name", [
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb",  # a MIG slice: 1/7 of the SMs, not the full-GPU peak
    "NVIDIA A100-SXM4-40GB MIG 1g.5gb",
    "NVIDIA H100",  # a generic Hopper name: contained in every H100 name, matches none
    "Tesla V100-SXM2-32GB",  # no bf16 tensor cores
    "NVIDIA GeForce RTX 4090",
])
def test_unknown_or_mig_device_gets_no_peak_and_one_notice(gpu_named, capsys, name):
    gpu_named(name)
    assert device_peak(torch.device("cuda", 0)) == (name, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and repr(name) in err
    assert "MFU is reported as null" in err and "PEAK_BF16" in err and "bench/train.py" in err
    assert ("MIG slice" in err) == (" MIG " in name)
    assert device_peak(torch.device("cuda", 0)) == (name, None)  # once per name
    assert capsys.readouterr().err == ""
    gpu_named("NVIDIA Some Future GPU")
    assert device_peak(torch.device("cuda", 0))[1] is None
    assert "NVIDIA Some Future GPU" in capsys.readouterr().err  # another name gets its own notice


def test_peak_table_keys_are_exact_driver_strings_with_positive_dense_peaks():
    for name, peak in PEAK_BF16.items():
        assert name == name.strip() and " MIG " not in name
        assert isinstance(peak, float) and 1e14 <= peak <= 3e15, name
    assert len({name.lower() for name in PEAK_BF16}) == len(PEAK_BF16)  # no key differs only by case


def test_bench_train_dmf_counts_both_branches_beside_fm():
    """``--method dmf``: the JVP step and the difference step, each with the fm step of the same preset measured in
    the same run. Counted FLOPs: the JVP step is the diagonal branch's forward + backward plus a forward with its
    tangents and a backward (more than 2x fm's one pass, less than 4x); the difference adds two no-grad forwards
    (one third of a pass each) to the same two passes."""
    out = bench_train("ditdh-tiny", batch=4, steps=1, warmup=1, in_channels=12, num_tokens=16, device="cpu",
                      method="dmf")
    assert out["method"] == "dmf-jvp" and out["host_syncs_per_step"] == 0 and out["fd"]["host_syncs_per_step"] == 0
    fm = out["fm"]["flops_per_sample"]
    assert 2.0 < out["overhead"]["flops_per_sample"] < 4.0, out["overhead"]
    assert out["fd_overhead"]["flops_per_sample"] == pytest.approx(2 + 2 / 3, rel=0.05)
    assert out["fd"]["flops_per_sample"] == pytest.approx(fm * out["fd_overhead"]["flops_per_sample"])
    # the flow map adds only the log-variance head (257 weights) to fm's parameters
    assert out["parameters"] - out["fm"]["parameters"] == 257
