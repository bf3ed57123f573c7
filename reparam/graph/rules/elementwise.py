"""Elementwise ops: activations and other shape-preserving ops, PReLU's slopes, broadcasting n-ary ops."""

from __future__ import annotations

from torch import nn
from torch.fx import Node

from .coupler import Coupler, Kept, Unsupported, first_tensor

__all__ = ["rule_broadcast", "rule_prelu_module", "rule_unary"]


def rule_unary(c: Coupler, node: Node) -> None:
    """y = f(x) elementwise (activations, dropout, norms without params, softmax over a dim)."""
    x = first_tensor(c, node)
    if c.shape(x) != c.shape(node):
        raise Unsupported(f"output shape {c.shape(node)} differs from input shape {c.shape(x)}")
    c.union_all(x, node, node)


def rule_prelu_module(c: Coupler, node: Node) -> None:
    """nn.PReLU: elementwise; with one slope per channel (``num_parameters = C``) the slopes are
    channels of dim 1 and shrink with them."""
    rule_unary(c, node)
    weight = c.param(f"{node.target}.weight")
    if c.s.size[weight[0]] > 1:
        c.union(c.sp(node, 1), weight[0], node)

        def fix(m: nn.Module, kept: Kept) -> None:
            m.num_parameters = m.weight.shape[0]

        c.module_fixups[node.target] = fix


def rule_broadcast(c: Coupler, node: Node) -> None:
    """Elementwise n-ary op with numpy broadcasting: dims aligned from the right with equal size are
    the same channels; a size-1 dim broadcasts and couples nothing."""
    out = c.shape(node)
    for x in c.tensor_inputs(node):
        shape = c.shape(x)
        if shape is None or len(shape) > len(out):
            raise Unsupported("input rank exceeds output rank")
        for d in range(1, len(shape) + 1):
            if shape[-d] == out[-d]:
                c.union(c.sp(x, -d), c.sp(node, -d), node)
