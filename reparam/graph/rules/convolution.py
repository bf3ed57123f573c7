"""Layers with weights: convolutions (grouped, depthwise, transposed) and linear layers, as modules or functions."""

from __future__ import annotations

import numpy as np
from torch import nn
from torch.fx import Node

from .coupler import Coupler, Kept, MacsTerm, ProducerRecord, Unsupported, arg, owner

__all__ = ["rule_conv_function", "rule_conv_module", "rule_linear_function", "rule_linear_module"]


def _conv(
    c: Coupler,
    node: Node,
    x: Node,
    w: tuple[int, ...],
    b: tuple[int, ...] | None,
    groups: int,
    owner: str | None,
    path_for_fixup: str | None,
) -> None:
    xs, ys = c.shape(x), c.shape(node)
    if len(xs) != len(ys) or len(xs) < 3:
        raise Unsupported("convolutions need a batch dim")
    c.union(c.sp(x, 0), c.sp(node, 0), node)
    for d in range(2, len(ys)):  # positions, not channels: whatever reads them as features keeps them all
        c.s.poison_space(c.sp(node, d), f"its size is the spatial extent of the convolution at node '{node.name}'")
    cin, cout = xs[1], ys[1]
    x1, y1 = c.sp(x, 1), c.sp(node, 1)
    c.union(y1, w[0], node)
    if b is not None:
        c.union(y1, b[0], node)
    depthwise = groups > 1 and groups == cin
    if groups == 1:
        c.union(x1, w[1], node)
    elif depthwise:
        mult = cout // cin
        if mult == 1:
            c.union(x1, y1, node)
        else:  # output channel k*mult + j is computed from input channel k only
            k = np.arange(cout)
            c.s.link(y1, k, x1, k // mult)
    else:  # grouped: channels are pruned uniformly across groups, so the group count stays
        cin_g, cout_g = cin // groups, cout // groups
        k = np.arange(cin)
        c.s.link(x1, k, w[1], k % cin_g)
        k = np.arange(cout)
        c.s.link(y1, k, y1, k % cout_g)
    c.s.mark_produced(w[0])
    if owner is not None:
        c.producers.append(ProducerRecord(owner, node.name, w[0]))
        c.consumers.append((owner, w[1] if not depthwise else x1))
    c.macs_terms.append(MacsTerm(node.name, tuple(c.dims(node)) + tuple(w[1:])))
    if path_for_fixup is not None:

        def fix(m: nn.Module, kept: Kept, x1: int = x1, depthwise: bool = depthwise) -> None:
            m.out_channels = m.weight.shape[0]
            if depthwise:
                m.groups = int(kept(x1).sum())
            m.in_channels = m.weight.shape[1] * m.groups

        c.module_fixups[path_for_fixup] = fix


def rule_conv_module(c: Coupler, node: Node) -> None:
    m = c.modules[node.target]
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        raise Unsupported("transposed convolutions are not pruned")
    _conv(
        c,
        node,
        node.args[0],
        c.param(f"{node.target}.weight"),
        c.module_param(node.target, "bias"),
        m.groups,
        node.target,
        node.target,
    )


def rule_conv_function(c: Coupler, node: Node) -> None:
    x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    if not isinstance(groups, int):
        raise Unsupported("groups is not a constant")
    _conv(c, node, x, tuple(c.dims(w)), tuple(c.dims(b)) if isinstance(b, Node) else None, groups, owner(c, w), None)
    if groups > 1 and groups == c.shape(x)[1]:  # depthwise: the groups argument follows the kept channels
        x1 = c.sp(x, 1)

        def fix(n: Node, kept: Kept) -> None:
            kept_groups = int(kept(x1).sum())
            if len(n.args) > 6:
                n.args = (*n.args[:6], kept_groups, *n.args[7:])
            else:
                n.kwargs = {**n.kwargs, "groups": kept_groups}

        c.node_fixups[node.name] = fix


def _linear(c: Coupler, node: Node, x: Node, w: tuple[int, ...], b: tuple[int, ...] | None, owner: str | None) -> None:
    xs, ys = c.shape(x), c.shape(node)
    if len(xs) != len(ys):
        raise Unsupported("unexpected rank")
    for d in range(len(xs) - 1):
        c.union(c.sp(x, d), c.sp(node, d), node)
    c.union(c.sp(x, -1), w[1], node)
    c.union(c.sp(node, -1), w[0], node)
    if b is not None:
        c.union(c.sp(node, -1), b[0], node)
    c.s.mark_produced(w[0])
    if owner is not None:
        c.producers.append(ProducerRecord(owner, node.name, w[0]))
        c.consumers.append((owner, w[1]))
    c.macs_terms.append(MacsTerm(node.name, tuple(c.dims(node)) + (w[1],)))


def rule_linear_module(c: Coupler, node: Node) -> None:
    _linear(c, node, node.args[0], c.param(f"{node.target}.weight"), c.module_param(node.target, "bias"), node.target)

    def fix(m: nn.Module, kept: Kept) -> None:
        m.out_features, m.in_features = m.weight.shape

    c.module_fixups[node.target] = fix


def rule_linear_function(c: Coupler, node: Node) -> None:
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    _linear(c, node, node.args[0], tuple(c.dims(w)), tuple(c.dims(b)) if isinstance(b, Node) else None, owner(c, w))
