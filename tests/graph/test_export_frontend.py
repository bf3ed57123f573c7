"""The torch.export front end: the same channel groups and MACs as torch.fx wherever both trace, the same
pruned function, and the fallback for programs torch.fx cannot trace symbolically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reparam.graph import GraphTraceError, prune, trace

from .helpers import max_rel_err, random_keep, randomize_bn
from .nets import TRICKY, conv_bn


def signature(group) -> tuple:
    return group.size, group.prunable, tuple(sorted(p.module for p in group.producers))


def matched_ids(a, b) -> dict[int, int]:
    """Group ids of graph `a` -> the group of graph `b` with the same signature (in order of appearance)."""
    pool: dict[tuple, list[int]] = {}
    for g in b.groups:
        pool.setdefault(signature(g), []).append(g.id)
    return {g.id: pool[signature(g)].pop(0) for g in a.groups}


CASES = {
    **{name: (lambda cls=cls: cls(), shape) for name, (cls, shape) in TRICKY.items()},
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (1, 3, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_finds_the_groups_and_macs_of_fx_and_prunes_to_the_same_function(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    randomize_bn(model, torch.Generator().manual_seed(0))
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fx_graph, ex_graph = trace(model, x, frontend="fx"), trace(model, x, frontend="export")
    assert sorted(map(signature, fx_graph.groups)) == sorted(map(signature, ex_graph.groups))
    assert fx_graph.macs() == ex_graph.macs() and fx_graph.params() == ex_graph.params()
    norms = lambda g: sorted((p.module, p.norm) for gr in g.groups for p in gr.producers)  # noqa: E731
    assert norms(fx_graph) == norms(ex_graph)  # each producer's BatchNorm is found through the ATen call too
    keep = random_keep(fx_graph, 0.6, np.random.default_rng(0))
    if not keep:
        pytest.skip("nothing prunable")
    ids = matched_ids(fx_graph, ex_graph)
    small_fx = prune(model, x, keep, graph=fx_graph)
    small_ex = prune(model, x, {ids[g]: k for g, k in keep.items()}, graph=ex_graph)
    assert ex_graph.macs({ids[g]: len(k) for g, k in keep.items()}) == fx_graph.macs(
        {g: len(k) for g, k in keep.items()}
    )
    assert max_rel_err(small_ex(x), small_fx(x)) <= 1e-10


class SizeArithmetic(nn.Module):
    """Python on sizes, which symbolic tracing cannot follow (`len` of a proxy, a loop over a size)."""

    def __init__(self):
        super().__init__()
        self.stem, self.body = conv_bn(3, 8), conv_bn(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for _ in range(len(x) // len(x)):  # one pass; `len` needs a concrete size
            x = x + F.relu(self.body(x))
        return self.head(x.mean((2, 3)))


def test_auto_falls_back_to_export_and_prunes_exactly():
    torch.manual_seed(0)
    model = SizeArithmetic().double().eval()
    randomize_bn(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(GraphTraceError, match="torch.fx could not trace"):
        trace(model, x, frontend="fx")
    graph = trace(model, x)  # auto
    (group,) = [g for g in graph.groups if g.prunable and any(p.module == "stem.0" for p in g.producers)]
    drop = [1, 4, 6]
    with torch.no_grad():  # silence the dropped channels of the residual stream at both norms
        for bn in (model.stem[1], model.body[1]):
            bn.weight[drop] = 0
            bn.bias[drop] = 0
    small = prune(model, x, {group.id: sorted(set(range(8)) - set(drop))}, graph=graph)
    assert max_rel_err(small(x), model(x)) <= 1e-10
    assert small.get_submodule("head").weight.shape == (3, 5)


def test_front_end_choices_are_checked():
    model, x = TRICKY["cifar_resnet"][0]().eval(), torch.randn(TRICKY["cifar_resnet"][1])
    with pytest.raises(ValueError, match="frontend must be"):
        trace(model, x, frontend="onnx")
    with pytest.raises(GraphTraceError, match="leaf_modules and concrete_args do not apply"):
        trace(model, x, frontend="export", leaf_modules=("stem",))

    class Branchy(nn.Module):  # data-dependent control flow: neither front end can capture it
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(GraphTraceError, match="torch.export fallback failed too"):
        trace(Branchy(), torch.randn(1, 3, 4, 4))
