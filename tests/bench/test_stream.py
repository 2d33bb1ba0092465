import json

import pytest
import torch

from mmfm.bench.stream import bench_stream, sample_flops
from mmfm.bench.train import count_flops
from mmfm.cli import main
from mmfm.models.ditdh import build_ditdh
from mmfm.plan.gpus import GPUS


def test_sample_flops_on_fake_tensors_equal_a_real_count():
    torch.manual_seed(0)
    model = build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16)
    x = torch.randn(2, 16, 8)
    assert sample_flops("ditdh-tiny", 16, 8) == count_flops(model, (x, torch.rand(2), x)) / 2


def test_stream_rate_beside_the_gpus_need(capsys):
    assert main(["bench", "stream", "--rows", "96", "--side", "2", "--channels", "8", "--cls-dim", "4", "--batch",
                 "8", "--buffer-rows", "16", "--batches", "5", "--preset", "ditdh-tiny", "--gpu", "a100-40gb",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rows"] == 96 and res["latent"] == [4, 8] and res["rows_per_s"] > 0
    assert res["need_rows_per_s"] == pytest.approx(0.4 * GPUS["a100-40gb"].bf16 / sample_flops("ditdh-tiny", 4, 8))
    assert res["headroom"] == pytest.approx(res["rows_per_s"] / res["need_rows_per_s"])


def test_unknown_gpu_is_named():
    with pytest.raises(ValueError, match="unknown GPU 'v100'.*a100-40gb"):
        bench_stream(rows=8, side=2, token_dim=4, cls_dim=2, batch=4, gpu="v100")
