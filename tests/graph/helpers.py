"""Shared test helpers: random keep-sets, BN randomisation and zeroing, output comparison."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reparam.graph import ChannelGraph
from reparam.verify import relative_error


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm random affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def random_keep(graph: ChannelGraph, fraction: float, rng: np.random.Generator) -> dict[int, list[int]]:
    """Keep about `fraction` of every prunable group, respecting its multiple."""
    keep = {}
    for g in graph.groups:
        if g.prunable and g.size > 1:
            n = max(g.min_channels, int(round(g.size * fraction)) // g.multiple * g.multiple, g.multiple)
            if n < g.size:
                keep[g.id] = sorted(rng.choice(g.size, n, replace=False).tolist())
    return keep


def bn_groups(graph: ChannelGraph) -> list:
    """Prunable groups whose every producer is followed by its own BatchNorm."""
    return [
        g
        for g in graph.groups
        if g.prunable and g.size > 1 and g.producers and all(p.norm is not None for p in g.producers)
    ]


def zero_channels(model: nn.Module, graph: ChannelGraph, rng: np.random.Generator) -> dict[int, list[int]]:
    """Silence a random subset of every BN-produced group (gamma = beta = 0 on every BatchNorm of the
    group: the producers' and any applied later, e.g. after a concat) and return the keep-set that
    removes exactly those channels."""
    keep = {}
    mods = dict(model.named_modules())
    with torch.no_grad():
        for g in bn_groups(graph):
            drop_n = int(rng.integers(1, g.size)) // g.multiple * g.multiple
            if drop_n == 0:
                continue
            drop = rng.choice(g.size, drop_n, replace=False)
            for m in g.members:
                owner = m.name.rpartition(".")[0]
                if (
                    m.kind == "param"
                    and m.name.endswith(".weight")
                    and isinstance(mods.get(owner), nn.modules.batchnorm._BatchNorm)
                ):
                    idx = torch.as_tensor(m.positions[np.isin(m.channels, drop)])
                    mods[owner].weight[idx] = 0
                    mods[owner].bias[idx] = 0
            keep[g.id] = sorted(set(range(g.size)) - set(drop.tolist()))
    return keep


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """`reparam.verify.relative_error` of `a` against the reference `b`."""
    return relative_error(b, a)
