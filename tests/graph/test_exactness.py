"""Removing channels that a BatchNorm silences (gamma = beta = 0) leaves the function unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reparam.graph import prune, trace

from .helpers import bn_groups, max_rel_err, randomize_bn, zero_channels
from .nets import TRICKY


class RandomNet(nn.Module):
    """A random stack of conv-BN blocks: plain, residual, grouped, dilated, strided, concatenated."""

    def __init__(self, spec: list[dict], cin: int = 3):
        super().__init__()
        self.spec = spec
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        c = cin
        for s in spec:
            cout = s["cout"] if not s["residual"] else c
            groups = s["groups"] if c % s["groups"] == 0 and cout % s["groups"] == 0 else 1
            self.convs.append(
                nn.Conv2d(
                    c,
                    cout,
                    s["k"],
                    s["stride"] if not s["residual"] else 1,
                    s["padding"] if not s["residual"] else s["dilation"] * (s["k"] // 2),
                    dilation=s["dilation"],
                    groups=groups,
                    bias=s["bias"],
                )
            )
            self.bns.append(nn.BatchNorm2d(cout))
            c = cout + (c if s["concat"] and not s["residual"] else 0)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        for s, conv, bn in zip(self.spec, self.convs, self.bns):
            y = F.relu(bn(conv(x)))
            if s["residual"]:
                x = x + y
            elif s["concat"]:
                x = torch.cat([y, x], 1)
            else:
                x = y
        return self.head(x).mean((2, 3))


block = st.fixed_dictionaries(
    dict(
        cout=st.integers(2, 6),
        k=st.sampled_from([1, 3]),
        stride=st.integers(1, 2),
        padding=st.integers(0, 1),
        dilation=st.integers(1, 2),
        groups=st.sampled_from([1, 2]),
        bias=st.booleans(),
        residual=st.booleans(),
        concat=st.booleans(),
    )
)


def _build(spec: list[dict], hw: int) -> nn.Module:
    for s in spec:
        # a concat needs equal spatial sizes: only unstrided, size-preserving blocks may concatenate;
        # a block whose kernel would not fit the remaining map falls back to the same
        reach = s["dilation"] * (s["k"] - 1) + 1
        if s["concat"] or (hw + 2 * s["padding"] - reach) // s["stride"] + 1 < 1:
            s["stride"], s["padding"], s["dilation"] = 1, s["k"] // 2, 1
        if not s["residual"]:
            hw = (hw + 2 * s["padding"] - (s["dilation"] * (s["k"] - 1) + 1)) // s["stride"] + 1
    return RandomNet(spec)


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(spec=st.lists(block, min_size=1, max_size=4), hw=st.integers(5, 8), seed=st.integers(0, 2**16))
def test_random_nets_float64(spec, hw, seed):
    gen = torch.Generator().manual_seed(seed)
    model = _build(spec, hw).double().eval()
    randomize_bn(model, gen)
    x = torch.randn(2, 3, hw, hw, generator=gen, dtype=torch.float64)
    graph = trace(model, x)
    keep = zero_channels(model, graph, np.random.default_rng(seed))
    y = model(x)
    small = prune(model, x, keep, graph=graph)
    assert max_rel_err(small(x), y) <= 1e-10


@pytest.mark.parametrize("name", sorted(TRICKY))
@pytest.mark.parametrize("seed", range(3))
def test_tricky_nets(name, seed):
    cls, shape = TRICKY[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = cls().double().eval()
    randomize_bn(model, gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    graph = trace(model, x)
    keep = zero_channels(model, graph, np.random.default_rng(seed))
    if not bn_groups(graph):
        pytest.skip("no BN-produced groups")
    assert keep
    y = model(x)
    assert max_rel_err(prune(model, x, keep, graph=graph)(x), y) <= 1e-10


@pytest.mark.parametrize("seed", range(3))
def test_tensors_that_reach_ops_through_get_attr_shrink_with_their_channels(seed):
    """Functional BN on a module's own tensors (running statistics by position), a custom conv through
    F.conv2d and a layer-scale vector: all join the residual group and are sliced by the surgery."""
    from .nets import FunctionalNorms

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FunctionalNorms().double().eval()
    randomize_bn(model, gen)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    graph = trace(model, x)
    (group,) = [g for g in graph.groups if any(p.module == "stem" for p in g.producers)]
    names = {m.name for m in group.members}
    assert {
        "stem_bn.running_mean",
        "stem_bn.running_var",
        "stem_bn.weight",
        "bn.bias",
        "gamma",
        "conv.weight",
        "head.weight",
    } <= names and group.prunable
    drop = np.random.default_rng(seed).choice(group.size, 2, replace=False).tolist()
    with torch.no_grad():  # silence the dropped channels at both norms: the residual stream carries zeros
        for bn in (model.stem_bn, model.bn):
            bn.weight[drop] = 0
            bn.bias[drop] = 0
    keep = {group.id: sorted(set(range(group.size)) - set(drop))}
    small = prune(model, x, keep, graph=graph)
    assert small.gamma.shape == (group.size - 2,) and small.bn.running_var.shape == (group.size - 2,)
    assert max_rel_err(small(x), model(x)) <= 1e-10


class FusedAttention(nn.Module):
    """q, k, v projections, heads, `F.scaled_dot_product_attention` with its default scale 1/√E."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attention_with_its_default_scale_keeps_it_when_the_head_width_shrinks(frontend):
    """Removing a query/key channel that is 0 leaves q·kᵀ as it was; the default scale would read the
    narrower width, so surgery pins the original one."""
    torch.manual_seed(0)
    model = FusedAttention().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    graph = trace(model, x, frontend=frontend)
    head = graph.group_of("q")
    assert head.prunable and head.size == 4
    with torch.no_grad():
        model.q.weight[[0, 4]] = 0  # head-dim channel 0 of the query, in both heads
    pruned = prune(model, x, {head.id: [1, 2, 3]}, graph=graph)
    assert max_rel_err(model(x), pruned(x)) <= 1e-10
