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
    "rule_group_norm_function",
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


def _group_norm(c: Coupler, node: Node, groups: int, params: list[int]) -> int:
    """Couple a group norm's input, output and per-channel ``params`` spaces; with 1 < groups < C the
    statistics are per group, so the same positions go in every group. Returns the channel space."""
    c.union_all(node.args[0], node, node)
    ch = c.sp(node, 1)
    for p in params:
        c.union(ch, p, node)
    n = c.shape(node)[1]
    if 1 < groups < n:
        k = np.arange(n)
        c.s.link(ch, k, ch, k % (n // groups))
    return ch


def rule_group_norm_module(c: Coupler, node: Node) -> None:
    m = c.modules[node.target]
    params = [p[0] for name in ("weight", "bias") if (p := c.module_param(node.target, name)) is not None]
    ch = _group_norm(c, node, m.num_groups, params)
    per_channel = m.num_groups == m.num_channels

    def fix(m: nn.Module, kept: Kept) -> None:
        m.num_channels = int(kept(ch).sum())
        if per_channel:  # one channel per group: the groups go with the channels
            m.num_groups = m.num_channels

    c.module_fixups[node.target] = fix


def rule_group_norm_function(c: Coupler, node: Node) -> None:
    """F.group_norm(x, num_groups, weight, bias, eps) and its ATen form (same leading arguments)."""
    groups = arg(node, 1, "num_groups")
    if not isinstance(groups, int):
        raise Unsupported("num_groups is not constant")
    params = [c.sp(p, 0) for p in (arg(node, 2, "weight"), arg(node, 3, "bias")) if isinstance(p, Node) and c.shape(p)]
    ch = _group_norm(c, node, groups, params)
    if groups != c.shape(node)[1]:
        return

    def fix(n: Node, kept: Kept) -> None:  # one channel per group: the groups go with the channels
        k = int(kept(ch).sum())
        if len(n.args) > 1:
            n.args = (n.args[0], k, *n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "num_groups": k}

    c.node_fixups[node.name] = fix


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
