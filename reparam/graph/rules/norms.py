"""Normalisation layers: batch, group and layer norm, as modules or functions on their own tensors."""

from __future__ import annotations

import numpy as np
from torch import nn
from torch.fx import Node

from .coupler import Coupler, Kept, Unsupported, arg

__all__ = [
    "rule_aten_batch_norm",
    "rule_batch_norm_function",
    "rule_batch_norm_module",
    "rule_group_norm_module",
    "rule_layer_norm_function",
    "rule_layer_norm_module",
]


def rule_batch_norm_module(c: Coupler, node: Node) -> None:
    x = node.args[0]
    c.union_all(x, node, node)
    for name in ("weight", "bias", "running_mean", "running_var"):
        p = c.module_param(node.target, name)
        if p is not None:
            c.union(c.sp(node, 1), p[0], node)

    def fix(m: nn.Module, kept: Kept) -> None:
        ref = m.running_mean if m.running_mean is not None else m.weight
        if ref is not None:
            m.num_features = ref.shape[0]

    c.module_fixups[node.target] = fix


def rule_batch_norm_function(
    c: Coupler, node: Node, order: tuple[str, ...] = ("running_mean", "running_var", "weight", "bias")
) -> None:
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): each per-channel tensor, given by
    position or by keyword, holds the channels of dim 1."""
    c.union_all(node.args[0], node, node)
    for i, name in enumerate(order, start=1):
        p = arg(node, i, name)
        if isinstance(p, Node) and c.shape(p) is not None:
            c.union(c.sp(node, 1), c.sp(p, 0), node)


def rule_aten_batch_norm(c: Coupler, node: Node) -> None:
    """aten.batch_norm(x, weight, bias, running_mean, running_var, ...), the exported form."""
    rule_batch_norm_function(c, node, ("weight", "bias", "running_mean", "running_var"))


def rule_group_norm_module(c: Coupler, node: Node) -> None:
    m = c.modules[node.target]
    c.union_all(node.args[0], node, node)
    ch = c.sp(node, 1)
    for name in ("weight", "bias"):
        p = c.module_param(node.target, name)
        if p is not None:
            c.union(ch, p[0], node)
    n, g = m.num_channels, m.num_groups
    if 1 < g < n:  # statistics per group: prune the same positions in every group
        k = np.arange(n)
        c.s.link(ch, k, ch, k % (n // g))

    def fix(m: nn.Module, kept: Kept) -> None:
        m.num_channels = int(kept(ch).sum())

    c.module_fixups[node.target] = fix


def rule_layer_norm_module(c: Coupler, node: Node) -> None:
    m = c.modules[node.target]
    k = len(m.normalized_shape)
    c.union_all(node.args[0], node, node)
    for name in ("weight", "bias"):
        p = c.module_param(node.target, name)
        if p is not None:
            for j in range(k):
                c.union(c.sp(node, j - k), p[j], node)
    out = c.dims(node)[-k:]

    def fix(m: nn.Module, kept: Kept) -> None:
        m.normalized_shape = tuple(int(kept(s).sum()) for s in out)

    c.module_fixups[node.target] = fix


def rule_layer_norm_function(c: Coupler, node: Node) -> None:
    shape = arg(node, 1, "normalized_shape")
    if not all(isinstance(v, int) for v in shape):
        raise Unsupported("normalized_shape is not constant")
    k = len(shape)
    c.union_all(node.args[0], node, node)
    for p in (arg(node, 2, "weight"), arg(node, 3, "bias")):
        if isinstance(p, Node):
            for j in range(k):
                c.union(c.sp(node, j - k), c.sp(p, j), node)
    out = c.dims(node)[-k:]

    def fix(n: Node, kept: Kept) -> None:
        new = [int(kept(s).sum()) for s in out]
        if len(n.args) > 1:
            n.args = (n.args[0], new, *n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "normalized_shape": new}

    c.node_fixups[node.name] = fix
