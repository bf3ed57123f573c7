"""The MACs model agrees with torch.utils.flop_counter and predicts pruned costs without surgery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from reparam.graph import flops, trace

from .nets import TRICKY


def counted_macs(model, x) -> int:
    with FlopCounterMode(display=False) as counter:  # grad on: fused no-grad fast paths hide their MACs
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_totals_match_flop_counter(name):
    cls, shape = TRICKY[name]
    model, x = cls().eval(), torch.randn(shape)
    report = flops(model, x)
    assert report.total_macs == counted_macs(model, x)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert sum(c.macs for c in report.per_node.values()) == report.total_macs
    assert sum(c.params for c in report.per_node.values()) == report.total_params


@pytest.mark.parametrize("name", ["cifar_resnet", "shuffle", "transformer", "flatten_linear"])
def test_widths_predict_counts_of_the_pruned_model(name):
    from reparam.graph import prune

    from .helpers import random_keep

    cls, shape = TRICKY[name]
    model, x = cls().eval(), torch.randn(shape)
    g = trace(model, x)
    rng = np.random.default_rng(0)
    for _ in range(3):
        keep = random_keep(g, rng.uniform(0.2, 0.9), rng)
        widths = {k: len(v) for k, v in keep.items()}
        small = prune(model, x, keep, graph=g)
        assert g.macs(widths) == counted_macs(small, x)
        assert g.params(widths) == sum(p.numel() for p in small.parameters())


def test_widths_default_to_the_full_model():
    cls, shape = TRICKY["cifar_resnet"]
    g = trace(cls().eval(), torch.randn(shape))
    assert g.macs({}) == g.macs() == g.macs({grp.id: grp.size for grp in g.groups})
    grp = g.group_of("layer1.0.a.0")
    assert g.macs({grp.id: 4}) < g.macs()
    assert g.macs({grp: 4}) == g.macs({grp.id: 4})


class Refused(torch.nn.Module):
    """Ops whose rules model MACs but refuse these forms: a transposed conv, a 1-D matmul operand,
    an einsum with an ellipsis. Their MACs are measured instead of dropped."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.w = torch.nn.Parameter(torch.randn(8))
        self.m = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        y = self.up(self.conv(x))  # (B, 4, 8, 8)
        z = torch.matmul(y, self.w)  # 1-D operand
        return torch.einsum("...ij,jk->...ik", z.unsqueeze(-1).expand(-1, -1, -1, 8), self.m).sum()


def test_ops_their_rules_refuse_are_measured():
    model, x = Refused().eval(), torch.randn(2, 3, 4, 4)
    g = trace(model, x)
    assert g.macs() == counted_macs(model, x)
    assert {"up", "einsum"} <= {n for n, v in g.node_macs().items() if v > 0}
