"""Contractions: matmul / bmm, scaled dot-product attention, einsum."""

from __future__ import annotations

from torch.fx import Node

from .coupler import Coupler, Kept, MacsTerm, Unsupported, arg

__all__ = ["rule_einsum", "rule_matmul", "rule_sdpa"]


def rule_matmul(c: Coupler, node: Node) -> None:
    a, b = node.args[0], node.args[1]
    sa, sb, so = c.shape(a), c.shape(b), c.shape(node)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        raise Unsupported("matmul with a 1-D operand")
    c.union(c.sp(a, -2), c.sp(node, -2), node)
    c.union(c.sp(b, -1), c.sp(node, -1), node)
    c.union(c.sp(a, -1), c.sp(b, -2), node)
    for x, s in ((a, sa), (b, sb)):
        for d in range(3, len(s) + 1):
            if s[-d] == so[-d]:
                c.union(c.sp(x, -d), c.sp(node, -d), node)
    c.macs_terms.append(MacsTerm(node.name, tuple(c.dims(node)) + (c.sp(a, -1),)))


def rule_sdpa(c: Coupler, node: Node) -> None:
    q, k, v = node.args[0], node.args[1], node.args[2]
    sq, sk, sv, so = c.shape(q), c.shape(k), c.shape(v), c.shape(node)
    if any(kw in node.kwargs and node.kwargs[kw] for kw in ("enable_gqa",)):
        raise Unsupported("grouped-query attention")
    c.union(c.sp(q, -1), c.sp(k, -1), node)
    c.union(c.sp(k, -2), c.sp(v, -2), node)
    c.union(c.sp(node, -1), c.sp(v, -1), node)
    c.union(c.sp(node, -2), c.sp(q, -2), node)
    for x, s in ((q, sq), (k, sk), (v, sv)):
        for d in range(3, len(s) + 1):
            if s[-d] == so[-d]:
                c.union(c.sp(x, -d), c.sp(node, -d), node)
    if arg(node, 6, "scale") is None:
        _keep_default_scale(c, node, c.sp(q, -1), sq[-1])
    lead = tuple(c.dims(node)[:-1])
    c.macs_terms.append(MacsTerm(node.name, lead + (c.sp(k, -2), c.sp(q, -1))))
    c.macs_terms.append(MacsTerm(node.name, lead + (c.sp(k, -2), c.sp(v, -1))))


def _keep_default_scale(c: Coupler, node: Node, head: int, width: int) -> None:
    """Attention without a ``scale`` scales by 1/√E of the query's last dim E at run time: once surgery
    narrows that dim, the node gets the original ``scale=width**-0.5`` so that it computes what it did."""

    def fix(n: Node, kept: Kept) -> None:
        if int(kept(head).sum()) != width:
            n.kwargs = {**n.kwargs, "scale": width**-0.5}

    c.node_fixups[node.name] = fix


def rule_einsum(c: Coupler, node: Node) -> None:
    """Each subscript letter is one channel space shared by every operand and the output that use it;
    MACs are the product of all letter sizes (two operands)."""
    eq = node.args[0]
    ops = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        raise Unsupported("einsum needs an explicit equation without ellipsis")
    lhs, rhs = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        raise Unsupported("operand count")
    letters: dict[str, int] = {}
    for term, t in [*zip(terms, ops), (rhs, node)]:
        for d, ch in enumerate(term):
            s = c.sp(t, d)
            if ch in letters:
                if c.s.size[letters[ch]] == c.s.size[s]:
                    c.union(letters[ch], s, node)
            else:
                letters[ch] = s
    if len(ops) == 2:
        c.macs_terms.append(MacsTerm(node.name, tuple(letters.values())))
