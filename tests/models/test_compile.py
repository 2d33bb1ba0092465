"""DiTDH compiles without graph breaks: its input checks read no values while traced."""

import pytest
import torch

from mmfm.bench.train import graph_breaks
from mmfm.models.ditdh import build_ditdh


@pytest.mark.parametrize("conditioning", ["none", "class", "mode"])
def test_no_graph_break(conditioning):
    labels = {"none": 0, "class": 10, "mode": 6}[conditioning]
    model = build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16, conditioning=conditioning, num_classes=labels,
                        class_dropout_prob=0.1 if conditioning == "class" else 0.0)
    x, t = torch.randn(3, 16, 8), torch.rand(3)
    y = None if conditioning == "none" else torch.tensor([0, 2, labels - 1])
    kw = {"drop": torch.tensor([True, False, False])} if conditioning == "class" else {}
    assert graph_breaks(model, x, t, y, **kw) == 0
    # the same checks still stop bad labels in eager mode
    if conditioning != "none":
        with pytest.raises(ValueError, match=r"y: expected values in \[0, "):
            model(x, t, torch.tensor([0, 1, labels + 1]))
