"""`reparam.graph.register_rule`: a custom layer the graph cannot see through becomes prunable once it is
taught how its channels flow, and the pruned model is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam.graph import Coupler, GraphTraceError, prune, register_rule, trace

from .helpers import max_rel_err, randomize_bn


class GatedScale(nn.Module):
    """A per-channel scale whose forward fx cannot trace (a Python branch on a tensor value)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        if bool((x > 0).any()):  # data-dependent: fx would fail here without a rule (which makes it a leaf)
            x = F.relu(x)
        return x * self.scale.view(1, -1, 1, 1)


def gated_scale_rule(c: Coupler, node) -> None:
    """Shape in = shape out with the same channels; the scale vector holds the channels of dim 1."""
    x = node.args[0]
    c.union_all(x, node, node)
    c.union(c.sp(node, 1), c.param(f"{node.target}.scale")[0], node)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.gate = GatedScale(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.gate(self.bn(self.conv(x)))).mean((2, 3))


def test_a_registered_rule_makes_a_custom_layer_prunable_and_exact():
    torch.manual_seed(0)
    model = Net().double().eval()
    randomize_bn(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(Exception, match="gate"):  # untraceable as it is: the error names the module
        trace(model, x)
    unknown = trace(model, x, leaf_modules=(GatedScale,))  # kept whole: its channels are fixed, with a reason
    (fixed,) = [g for g in unknown.groups if any(p.module == "conv" for p in g.producers)]
    assert not fixed.prunable and "register_rule" in fixed.reason

    register_rule(GatedScale, gated_scale_rule)
    graph = trace(model, x)
    (group,) = [g for g in graph.groups if any(p.module == "conv" for p in g.producers)]
    assert group.prunable and "gate.scale" in {m.name for m in group.members}
    drop = np.random.default_rng(0).choice(8, 3, replace=False).tolist()
    with torch.no_grad():  # silence the dropped channels at the BN: removing them changes nothing
        model.bn.weight[drop] = 0
        model.bn.bias[drop] = 0
    small = prune(model, x, {group.id: sorted(set(range(8)) - set(drop))}, graph=graph)
    assert small.gate.scale.shape == (5,) and small.conv.out_channels == 5
    assert max_rel_err(small(x), model(x)) <= 1e-10


def test_register_rule_refuses_what_it_cannot_match():
    with pytest.raises(TypeError, match="an nn.Module class, a function or a method name"):
        register_rule(3, gated_scale_rule)


class Buggy(nn.Module):
    def forward(self, x):
        return x * 2


def test_a_rule_that_fails_names_its_node_and_the_remedy():
    def broken(c: Coupler, node) -> None:
        c.union(c.sp(node, 1), c.param(f"{node.target}.missing")[0], node)  # no such parameter

    register_rule(Buggy, broken)

    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.odd = nn.Conv2d(3, 4, 1), Buggy()

        def forward(self, x):
            return self.odd(self.conv(x))

    with pytest.raises(GraphTraceError, match=r"channel rule for .*Buggy.* at node 'odd' failed .*register_rule"):
        trace(Host().eval(), torch.randn(1, 3, 4, 4))
