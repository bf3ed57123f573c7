"""Pooling, resampling and padding: batch and channels pass through, spatial dims are new or fixed."""

from __future__ import annotations

import numpy as np
from torch.fx import Node

from .coupler import Coupler, Kept, Unsupported, arg, first_tensor, tensor_metas

__all__ = ["rule_pad", "rule_pad_module", "rule_patch_merging_pad", "rule_pool"]


def _batch_channel_rule(c: Coupler, node: Node, x: Node) -> None:
    """Pooling / resampling: batch and channel dims pass through, spatial dims are new. Every output
    (a max-pool's indices too) carries the input's batch and channels."""
    xs = c.shape(x)
    for i in range(len(tensor_metas(node))):
        ys = c.shape(node, i)
        if ys is None or len(xs) != len(ys) or len(xs) < 2:
            raise Unsupported("unexpected rank")
        for d in range(2):
            c.union(c.sp(x, d), c.sp(node, d, i), node)
        for d in range(2, len(ys)):
            c.s.poison_space(c.sp(node, d, i), f"its size is the spatial extent of the pooling at node '{node.name}'")


def rule_pool(c: Coupler, node: Node) -> None:
    _batch_channel_rule(c, node, first_tensor(c, node))


def rule_pad(c: Coupler, node: Node) -> None:
    """F.pad(x, pad, mode, value). Along a dim padded by (b, a) in constant mode, output element
    `b + k` is input element `k` (an index link, as for a concat of [b pad, x, a pad]); the pad
    positions are channels of their own, holding `value`, and a negative amount crops input
    elements. Surgery rewrites each amount to the kept pad positions (or kept cropped elements), so
    a zero pad channel is removed by shrinking the pad. Fixed: every padded dim of a non-constant
    mode (it copies input channels into the pad) or with a computed amount, and pad channels of a
    non-zero `value` (removing a constant non-zero channel changes its consumers)."""
    x = node.args[0]
    pad, mode, value = list(arg(node, 1, "pad")), arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
    xs, ys = c.shape(x), c.shape(node)
    if len(pad) % 2 or len(pad) // 2 > len(xs) or len(xs) != len(ys):
        raise Unsupported(f"pad {pad} for a rank-{len(xs)} input")
    amounts = {len(xs) - 1 - k: (pad[2 * k], pad[2 * k + 1]) for k in range(len(pad) // 2)}
    padded = {d: ba for d, ba in amounts.items() if ba != (0, 0)}
    c.union_all(x, node, node, skip=tuple(padded))
    exact: dict[int, tuple[int, int]] = {}
    for d, (b, a) in padded.items():
        xd, yd = c.sp(x, d), c.sp(node, d)
        if mode != "constant" or not all(isinstance(v, int) for v in (b, a)):
            why = (
                f"F.pad mode {mode!r} at node '{node.name}' copies channels of dim {d} into its pad"
                if mode != "constant"
                else f"the pad amount along dim {d} at node '{node.name}' is computed"
            )
            c.s.poison_space(xd, why)
            c.s.poison_space(yd, why)
            continue
        if xs[d] + b + a != ys[d]:
            raise Unsupported(f"dim {d}: {xs[d]} padded by ({b}, {a}) is not {ys[d]}")
        k = np.arange(max(0, -b), xs[d] - max(0, -a))
        c.s.link(xd, k, yd, k + b)
        if value is not None and not (isinstance(value, (int, float)) and value == 0):
            pads = np.r_[np.arange(max(0, b)), np.arange(ys[d] - max(0, a), ys[d])]
            c.s.poison_elements(
                yd,
                pads,
                f"F.pad at node '{node.name}' fills dim {d} with the constant "
                f"{value!r}, which is not zero: its pad channels cannot be removed",
            )
        exact[d] = (b, a)
    if not exact:
        return
    spaces = {d: (c.sp(x, d), c.sp(node, d)) for d in exact}

    def fix(n: Node, kept: Kept) -> None:
        new = list(pad)
        for d, (b, a) in exact.items():
            mi, mo = kept(spaces[d][0]), kept(spaces[d][1])
            j = 2 * (len(xs) - 1 - d)
            new[j] = int(mo[:b].sum()) if b >= 0 else -int(mi[:-b].sum())
            new[j + 1] = int(mo[len(mo) - a :].sum()) if a >= 0 else -int(mi[len(mi) + a :].sum())
        new = type(arg(n, 1, "pad"))(new)
        if len(n.args) > 1:
            n.args = (n.args[0], new, *n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "pad": new}

    c.node_fixups[node.name] = fix


def rule_pad_module(c: Coupler, node: Node) -> None:
    """nn.ZeroPad/ConstantPad/ReflectionPad/ReplicationPad/CircularPad: pads the trailing dims by the
    module's fixed ``padding``. Unpadded dims pass through; a padded dim keeps its size fixed (the
    module's amounts are not rewritten), which never touches a channel dim of batched input."""
    x = first_tensor(c, node)
    pad = c.modules[node.target].padding
    xs = c.shape(x)
    padded = tuple(len(xs) - 1 - k for k in range(len(pad) // 2) if (pad[2 * k], pad[2 * k + 1]) != (0, 0))
    c.union_all(x, node, node, skip=padded)
    for d in padded:
        why = f"{type(c.modules[node.target]).__name__} '{node.target}' pads dim {d} by a fixed amount"
        c.s.poison_space(c.sp(x, d), why)
        c.s.poison_space(c.sp(node, d), why)


def rule_patch_merging_pad(c: Coupler, node: Node) -> None:
    """(..., H, W, C) -> (..., H/2, W/2, 4C): the four 2x2 neighbours concatenated along channels."""
    x = node.args[0]
    xs = c.shape(x)
    for d in range(len(xs) - 3):
        c.union(c.sp(x, d), c.sp(node, d), node)
    ch = xs[-1]
    k = np.arange(4 * ch)
    c.s.link(c.sp(node, -1), k, c.sp(x, -1), k % ch)
