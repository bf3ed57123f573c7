"""Coupling rules: how each traced op ties the channel spaces of its inputs, outputs and parameters.

Every rule receives the `Coupler` and one fx node. It declares identity unions and index links
between spaces, records producers (layers whose weight rows define channels), consumers, MACs
terms, and the fix-ups surgery needs (module attributes, hard-coded sizes in node arguments).
An op without a rule poisons every space it touches, so its channels are never changed.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx import Node
from torch.fx.passes.shape_prop import TensorMetadata

from .spaces import SpaceSet

Kept = Callable[[int], np.ndarray]  # space id -> boolean keep mask along that space


class Unsupported(Exception):
    """Raised by a rule for a configuration it does not handle; the node's spaces are poisoned."""


@dataclass(frozen=True)
class ProducerRecord:
    module: str      # qualified name of the layer owning the weight
    node: str        # fx node that applies it
    space: int       # space id of the weight's output-row dim


@dataclass(frozen=True)
class MacsTerm:
    node: str
    factors: tuple[int, ...]  # MACs = product of these spaces' sizes


def tensor_metas(node: Node) -> list[TensorMetadata | None]:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return [meta]
    if isinstance(meta, (tuple, list)):
        return [m if isinstance(m, TensorMetadata) else None for m in meta]
    return []


def describe(node: Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
    return f"method .{node.target}()"


class Coupler:
    """Walks an fx graph in topological order and applies the rule of every node."""

    def __init__(self, root: nn.Module, graph: fx.Graph, modules: dict[str, nn.Module] | None = None) -> None:
        self.root, self.graph = root, graph
        self.s = SpaceSet()
        self.modules = modules if modules is not None else dict(root.named_modules())
        self.producers: list[ProducerRecord] = []
        self.consumers: list[tuple[str, int]] = []
        self.macs_terms: list[MacsTerm] = []
        self.params: dict[str, tuple[int, ...]] = {}          # parameter/buffer name -> its dim spaces
        self.module_fixups: dict[str, Callable[[nn.Module, Kept], None]] = {}
        self.node_fixups: dict[str, Callable[[Node, Kept], None]] = {}
        self._tensors = {**dict(root.named_buffers()), **dict(root.named_parameters())}
        self._dims: dict[tuple[str, int], list[int]] = {}

    # -- spaces --------------------------------------------------------------------------------
    def key(self, node: Node) -> str:
        return "@" + node.target if node.op == "get_attr" else node.name

    def shape(self, node: Any, i: int = 0) -> tuple[int, ...] | None:
        if not isinstance(node, Node):
            return None
        metas = tensor_metas(node)
        if i >= len(metas) or metas[i] is None:
            return None
        return tuple(metas[i].shape)

    def sp(self, node: Node, dim: int, i: int = 0) -> int:
        d = self.dims(node, i)
        assert d, node
        return d[dim]

    def dims(self, node: Node, i: int = 0) -> list[int]:
        """Space ids of every dim of output `i` of `node` (created on first use; a negative `i` counts
        from the end, so `out[-1]` and `out[n - 1]` are the same spaces)."""
        if i < 0:
            i += len(tensor_metas(node))
        key = (node.name, i)
        found = self._dims.get(key)
        if found is None:
            shape = self.shape(node, i)
            k = self.key(node)
            found = [] if shape is None else [self.s.space((k, i, d), n) for d, n in enumerate(shape)]
            self._dims[key] = found
        return found

    def param(self, qualname: str) -> tuple[int, ...]:
        """Spaces of a parameter or buffer of the traced model (created on first use)."""
        if qualname not in self.params:
            tensor = self._tensors.get(qualname)
            if tensor is None:
                prefix, _, leaf = qualname.rpartition(".")
                tensor = getattr(self.root.get_submodule(prefix) if prefix else self.root, leaf)
            self.params[qualname] = tuple(self.s.space(("@" + qualname, 0, d), n) for d, n in enumerate(tensor.shape))
        return self.params[qualname]

    def module_param(self, path: str, name: str) -> tuple[int, ...] | None:
        qualname = f"{path}.{name}" if path else name
        if qualname in self._tensors:
            return self.param(qualname)
        t = getattr(self.modules[path], name, None)
        return self.param(qualname) if isinstance(t, torch.Tensor) else None

    def tensor_inputs(self, node: Node) -> list[Node]:
        found: list[Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if tensor_metas(n) else None)
        return found

    def union(self, a: int, b: int, node: Node) -> None:
        self.s.union(a, b, f"node '{node.name}'")

    def union_all(self, x: Node, out: Node, node: Node, skip: Sequence[int] = ()) -> None:
        xs, os_ = self.dims(x), self.dims(node)
        if len(xs) != len(os_):
            raise Unsupported(f"rank changes from {len(xs)} to {len(os_)}")
        for d, (a, b) in enumerate(zip(xs, os_)):
            if d not in skip and d - len(xs) not in skip and self.s.size[a] == self.s.size[b]:
                self.union(a, b, node)

    def poison_node(self, node: Node, reason: str) -> None:
        for n in [*self.tensor_inputs(node)]:
            for s in self.dims(n):
                self.s.poison_space(s, reason)
        for i in range(len(tensor_metas(node))):
            for s in self.dims(node, i):
                self.s.poison_space(s, reason)
        if node.op == "call_module":
            for name, _ in self.modules[node.target].named_parameters(recurse=True):
                for s in self.param(f"{node.target}.{name}"):
                    self.s.poison_space(s, reason)

    # -- walk ----------------------------------------------------------------------------------
    def run(self) -> "Coupler":
        for node in self.graph.nodes:
            self.visit(node)
        return self

    def visit(self, node: Node) -> None:
        if node.op == "placeholder":
            for i in range(len(tensor_metas(node))):
                for s in self.dims(node, i):
                    self.s.poison_space(s, f"it is a model input ('{node.name}')")
            return
        if node.op == "output":
            for n in self.tensor_inputs(node):
                for i in range(len(tensor_metas(n))):
                    for s in self.dims(n, i):
                        self.s.poison_space(s, f"it is a model output ('{n.name}')")
            return
        metas = tensor_metas(node)
        if not any(m is not None for m in metas):
            return  # shape queries (x.size(), x.shape, ...) and python values couple nothing
        for i in range(len(metas)):
            self.dims(node, i)
        if node.op == "get_attr":
            self.params.setdefault(node.target, tuple(self.dims(node)))
            return
        rule = lookup_rule(node, self.modules)
        if rule is None:
            why = next((r for t, r in NO_RULE_REASONS.items()
                        if node.op == "call_module" and isinstance(self.modules[node.target], t)),
                       "has no channel rule (teach it one with reparam.graph.register_rule)")
            self.poison_node(node, f"{describe(node, self.modules)} at node '{node.name}' {why}")
            return
        try:
            rule(self, node)
        except Unsupported as exc:
            self.poison_node(node, f"{describe(node, self.modules)} at node '{node.name}': {exc}")


# ---------------------------------------------------------------------------------------------
# helpers
def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _owner(c: Coupler, w: Any) -> str | None:
    """Module owning a weight given as a get_attr node."""
    if isinstance(w, Node) and w.op == "get_attr":
        return w.target.rpartition(".")[0]
    return None


def _first_tensor(c: Coupler, node: Node) -> Node:
    ins = c.tensor_inputs(node)
    if not ins:
        raise Unsupported("no tensor input")
    return ins[0]


# ---------------------------------------------------------------------------------------------
# shape-preserving ops
def rule_unary(c: Coupler, node: Node) -> None:
    """y = f(x) elementwise (activations, dropout, norms without params, softmax over a dim)."""
    x = _first_tensor(c, node)
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


def _batch_channel_rule(c: Coupler, node: Node, x: Node) -> None:
    """Pooling / resampling: batch and channel dims pass through, spatial dims are new."""
    xs, ys = c.shape(x), c.shape(node)
    if len(xs) != len(ys) or len(xs) < 2:
        raise Unsupported("unexpected rank")
    for d in range(len(xs) - (len(xs) - 2)):
        c.union(c.sp(x, d), c.sp(node, d), node)


def rule_pool(c: Coupler, node: Node) -> None:
    _batch_channel_rule(c, node, _first_tensor(c, node))


def rule_pad(c: Coupler, node: Node) -> None:
    """F.pad(x, pad, mode, value). Along a dim padded by (b, a) in constant mode, output element
    `b + k` is input element `k` (an index link, as for a concat of [b pad, x, a pad]); the pad
    positions are channels of their own, holding `value`, and a negative amount crops input
    elements. Surgery rewrites each amount to the kept pad positions (or kept cropped elements), so
    a zero pad channel is removed by shrinking the pad. Fixed: every padded dim of a non-constant
    mode (it copies input channels into the pad) or with a computed amount, and pad channels of a
    non-zero `value` (removing a constant non-zero channel changes its consumers)."""
    x = node.args[0]
    pad, mode, value = list(_arg(node, 1, "pad")), _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
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
            why = (f"F.pad mode {mode!r} at node '{node.name}' copies channels of dim {d} into its pad"
                   if mode != "constant" else f"the pad amount along dim {d} at node '{node.name}' is computed")
            c.s.poison_space(xd, why)
            c.s.poison_space(yd, why)
            continue
        if xs[d] + b + a != ys[d]:
            raise Unsupported(f"dim {d}: {xs[d]} padded by ({b}, {a}) is not {ys[d]}")
        k = np.arange(max(0, -b), xs[d] - max(0, -a))
        c.s.link(xd, k, yd, k + b)
        if value is not None and not (isinstance(value, (int, float)) and value == 0):
            pads = np.r_[np.arange(max(0, b)), np.arange(ys[d] - max(0, a), ys[d])]
            c.s.poison_elements(yd, pads, f"F.pad at node '{node.name}' fills dim {d} with the constant "
                                          f"{value!r}, which is not zero: its pad channels cannot be removed")
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
            new[j + 1] = int(mo[len(mo) - a:].sum()) if a >= 0 else -int(mi[len(mi) + a:].sum())
        new = type(_arg(n, 1, "pad"))(new)
        if len(n.args) > 1:
            n.args = (n.args[0], new, *n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "pad": new}
    c.node_fixups[node.name] = fix


# ---------------------------------------------------------------------------------------------
# layers with weights
def _conv(c: Coupler, node: Node, x: Node, w: tuple[int, ...], b: tuple[int, ...] | None, groups: int,
          owner: str | None, path_for_fixup: str | None) -> None:
    xs, ys = c.shape(x), c.shape(node)
    if len(xs) != len(ys) or len(xs) < 3:
        raise Unsupported("convolutions need a batch dim")
    c.union(c.sp(x, 0), c.sp(node, 0), node)
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
    _conv(c, node, node.args[0], c.param(f"{node.target}.weight"), c.module_param(node.target, "bias"),
          m.groups, node.target, node.target)


def rule_conv_function(c: Coupler, node: Node) -> None:
    x, w, b = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1)
    if not isinstance(groups, int):
        raise Unsupported("groups is not a constant")
    _conv(c, node, x, tuple(c.dims(w)), tuple(c.dims(b)) if isinstance(b, Node) else None, groups, _owner(c, w), None)


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
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    _linear(c, node, node.args[0], tuple(c.dims(w)), tuple(c.dims(b)) if isinstance(b, Node) else None, _owner(c, w))


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


def rule_batch_norm_function(c: Coupler, node: Node) -> None:
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): each per-channel tensor, given by
    position or by keyword, holds the channels of dim 1."""
    c.union_all(node.args[0], node, node)
    for i, name in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
        p = _arg(node, i, name)
        if isinstance(p, Node) and c.shape(p) is not None:
            c.union(c.sp(node, 1), c.sp(p, 0), node)


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
    shape = _arg(node, 1, "normalized_shape")
    if not all(isinstance(v, int) for v in shape):
        raise Unsupported("normalized_shape is not constant")
    k = len(shape)
    c.union_all(node.args[0], node, node)
    for p in (_arg(node, 2, "weight"), _arg(node, 3, "bias")):
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


# ---------------------------------------------------------------------------------------------
# contractions
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
    lead = tuple(c.dims(node)[:-1])
    c.macs_terms.append(MacsTerm(node.name, lead + (c.sp(k, -2), c.sp(q, -1))))
    c.macs_terms.append(MacsTerm(node.name, lead + (c.sp(k, -2), c.sp(v, -1))))


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


# ---------------------------------------------------------------------------------------------
# layout ops
def _align(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims of equal element count (row-major reshape)."""
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == 1:
            i += 1
            continue
        if b[j] == 1:
            j += 1
            continue
        ia, jb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ia.append(i)
                pa *= a[i]
                i += 1
            else:
                jb.append(j)
                pb *= b[j]
                j += 1
        groups.append((ia, jb))
    return groups


def _carrier(c: Coupler, node: Node, dims: list[int], shape: Sequence[int]) -> int:
    """The one dim of a reshaped run whose channels may be pruned: a produced one, else the largest."""
    cands = [d for d in dims if shape[d] > 1]
    return max(cands, key=lambda d: (c.s.is_produced(c.sp(node, d)), shape[d], -d))


def _reshape_coupling(c: Coupler, x: Node, node: Node) -> None:
    xs, ys = c.shape(x), c.shape(node)
    for ia, jb in _align(xs, ys):
        if len(ia) == 1 and len(jb) == 1:
            c.union(c.sp(x, ia[0]), c.sp(node, jb[0]), node)
            continue
        ci, co = _carrier(c, x, ia, xs), _carrier(c, node, jb, ys)
        flat = np.arange(math.prod(xs[d] for d in ia))
        in_idx = np.unravel_index(flat, [xs[d] for d in ia])[ia.index(ci)]
        out_idx = np.unravel_index(flat, [ys[d] for d in jb])[jb.index(co)]
        c.s.link(c.sp(x, ci), in_idx, c.sp(node, co), out_idx)
        why = f"its size is fixed by the reshape at node '{node.name}'"
        for d in ia:
            if d != ci:
                c.s.poison_space(c.sp(x, d), why)
        for d in jb:
            if d != co:
                c.s.poison_space(c.sp(node, d), why)


def _resized(vals: Sequence[Any], old: Sequence[int], new: Sequence[int]) -> list[Any]:
    """Size arguments after surgery: every dim whose size changed gets its new size as a constant
    (whether it was a constant or computed from another tensor's shape); -1 and unchanged dims stay."""
    return [new[k] if new[k] != old[k] and not (isinstance(v, int) and v == -1) else v for k, v in enumerate(vals)]


def rule_reshape(c: Coupler, node: Node) -> None:
    """view / reshape / flatten / squeeze / unsqueeze: one dim of each merged or split run carries the
    channels; the others keep their size. Constant sizes in the arguments are rewritten by surgery."""
    x = _first_tensor(c, node)
    _reshape_coupling(c, x, node)
    if node.target in ("view", "reshape", torch.reshape) or node.target == "unflatten":
        out, old = c.dims(node), c.shape(node)

        def fix(n: Node, kept: Kept) -> None:
            new = [int(kept(s).sum()) for s in out]
            if n.target == "unflatten":
                dim, sizes = n.args[1], n.args[2]
                start = dim % len(c.shape(n.args[0]))
                n.args = (n.args[0], dim, tuple(_resized(sizes, old[start:], new[start:])))
                return
            spec = n.args[1:] if n.target != torch.reshape else n.args[1]
            packed = n.target == torch.reshape or (len(spec) == 1 and isinstance(spec[0], (tuple, list)))
            vals = list(spec if n.target == torch.reshape else (spec[0] if packed else spec))
            vals = _resized(vals, old, new)
            n.args = (n.args[0], vals) if packed else (n.args[0], *vals)
        c.node_fixups[node.name] = fix


def rule_permute(c: Coupler, node: Node) -> None:
    x = node.args[0]
    n = len(c.shape(x))
    if node.target in ("permute", torch.permute):
        rest = node.args[1:] if node.target == "permute" else (node.args[1],)
        perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else list(rest)
        perm = [p % n for p in perm]
    elif node.target in ("t",):
        perm = list(range(n))[::-1]
    else:  # transpose / swapaxes
        d0, d1 = _arg(node, 1, "dim0") % n, _arg(node, 2, "dim1") % n
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    for d, p in enumerate(perm):
        c.union(c.sp(node, d), c.sp(x, p), node)


def rule_expand(c: Coupler, node: Node) -> None:
    x = node.args[0]
    xs, ys = c.shape(x), c.shape(node)
    for d in range(1, len(xs) + 1):
        if xs[-d] == ys[-d]:
            c.union(c.sp(x, -d), c.sp(node, -d), node)
    if node.target == "expand":
        out, old = c.dims(node), c.shape(node)

        def fix(n: Node, kept: Kept) -> None:
            spec = n.args[1:]
            packed = len(spec) == 1 and isinstance(spec[0], (tuple, list))
            vals = _resized(list(spec[0] if packed else spec), old, [int(kept(s).sum()) for s in out])
            n.args = (n.args[0], vals) if packed else (n.args[0], *vals)
        c.node_fixups[node.name] = fix


def rule_cat(c: Coupler, node: Node) -> None:
    tensors = node.args[0]
    dim = _arg(node, 1, "dim", 0)
    ys = c.shape(node)
    dim %= len(ys)
    offset = 0
    for t in tensors:
        ts = c.shape(t)
        for d in range(len(ys)):
            if d != dim:
                c.union(c.sp(t, d), c.sp(node, d), node)
        k = np.arange(ts[dim])
        if len(tensors) == 1:
            c.union(c.sp(t, dim), c.sp(node, dim), node)
        else:
            c.s.link(c.sp(t, dim), k, c.sp(node, dim), offset + k)
        offset += ts[dim]


def rule_stack(c: Coupler, node: Node) -> None:
    tensors = node.args[0]
    dim = _arg(node, 1, "dim", 0) % len(c.shape(node))
    for t in tensors:
        for d in range(len(c.shape(t))):
            c.union(c.sp(t, d), c.sp(node, d if d < dim else d + 1), node)


def rule_split(c: Coupler, node: Node) -> None:
    """split / chunk / unbind: output i holds a contiguous range of the input dim. Surgery rewrites
    the sizes (chunk becomes split with explicit sizes, since kept counts may differ per piece)."""
    x = node.args[0]
    xs = c.shape(x)
    if node.target in ("unbind", torch.unbind):
        dim = _arg(node, 1, "dim", 0) % len(xs)
        c.s.poison_space(c.sp(x, dim), f"unbind at node '{node.name}' fixes its size")
        for i in range(len(tensor_metas(node))):
            for d in range(len(xs)):
                if d != dim:
                    c.union(c.sp(x, d), c.sp(node, d if d < dim else d - 1, i), node)
        return
    dim = _arg(node, 2, "dim", 0) % len(xs)
    offset, pieces = 0, []
    for i in range(len(tensor_metas(node))):
        ps = c.shape(node, i)
        for d in range(len(xs)):
            if d != dim:
                c.union(c.sp(x, d), c.sp(node, d, i), node)
        k = np.arange(ps[dim])
        c.s.link(c.sp(x, dim), offset + k, c.sp(node, dim, i), k)
        pieces.append(c.sp(node, dim, i))
        offset += ps[dim]

    def fix(n: Node, kept: Kept) -> None:
        sizes = [int(kept(s).sum()) for s in pieces]
        if n.op == "call_method":
            n.target = "split"
        else:
            n.target = torch.split
        n.args, n.kwargs = (n.args[0], sizes), {"dim": dim}
    c.node_fixups[node.name] = fix


def rule_getitem(c: Coupler, node: Node) -> None:
    x, idx = node.args
    metas = tensor_metas(x)
    if len(metas) > 1 or not isinstance(x.meta.get("tensor_meta"), TensorMetadata):
        if not isinstance(idx, int):
            raise Unsupported("non-constant index into a tuple")
        for d in range(len(c.shape(node))):
            c.union(c.sp(x, d, idx), c.sp(node, d), node)
        return
    xs = c.shape(x)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(it, Node) for it in items):
        raise Unsupported("indexing with a tensor")
    if Ellipsis in items:
        e = items.index(Ellipsis)
        explicit = sum(1 for it in items if it is not None and it is not Ellipsis)
        items[e:e + 1] = [slice(None)] * (len(xs) - explicit)
    items += [slice(None)] * (len(xs) - sum(1 for it in items if it is not None))
    d_in, d_out, slices = 0, 0, {}
    for it in items:
        if it is None:
            d_out += 1
        elif isinstance(it, int):
            c.s.poison_space(c.sp(x, d_in), f"indexed at a constant position at node '{node.name}'")
            d_in += 1
        elif isinstance(it, slice):
            rng = range(*it.indices(xs[d_in]))
            a, b = c.sp(x, d_in), c.sp(node, d_out)
            if len(rng) == xs[d_in] and rng.step == 1:
                c.union(a, b, node)
            else:
                if rng.step != 1:
                    c.s.poison_space(a, f"strided slice at node '{node.name}'")
                c.s.link(a, np.asarray(rng), b, np.arange(len(rng)))
                slices[d_in] = (a, rng)
            d_in, d_out = d_in + 1, d_out + 1
        else:
            raise Unsupported(f"index {it!r}")
    if slices:
        def fix(n: Node, kept: Kept) -> None:
            new, d = [], 0
            for it in items:
                if isinstance(it, slice) and d in slices:
                    a, rng = slices[d]
                    m = kept(a)
                    if m.all():
                        new.append(it)
                    else:
                        start = int(m[:rng.start].sum())
                        new.append(slice(start, start + int(m[np.asarray(rng)].sum()), None))
                else:
                    new.append(it)
                d += it is not None
            n.args = (n.args[0], tuple(new))
        c.node_fixups[node.name] = fix


def rule_reduce(c: Coupler, node: Node) -> None:
    x = node.args[0]
    xs = c.shape(x)
    dim = _arg(node, 1, "dim")
    keep = _arg(node, 2, "keepdim", False)
    if dim is None:
        return
    dims = {d % len(xs) for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
    j = 0
    for d in range(len(xs)):
        if d in dims:
            j += 1 if keep else 0
            continue
        c.union(c.sp(x, d), c.sp(node, j), node)
        j += 1


# ---------------------------------------------------------------------------------------------
# torchvision helpers traced as leaf functions
def rule_patch_merging_pad(c: Coupler, node: Node) -> None:
    """(..., H, W, C) -> (..., H/2, W/2, 4C): the four 2x2 neighbours concatenated along channels."""
    x = node.args[0]
    xs = c.shape(x)
    for d in range(len(xs) - 3):
        c.union(c.sp(x, d), c.sp(node, d), node)
    ch = xs[-1]
    k = np.arange(4 * ch)
    c.s.link(c.sp(node, -1), k, c.sp(x, -1), k % ch)


def rule_pad_module(c: Coupler, node: Node) -> None:
    """nn.ZeroPad/ConstantPad/ReflectionPad/ReplicationPad/CircularPad: pads the trailing dims by the
    module's fixed ``padding``. Unpadded dims pass through; a padded dim keeps its size fixed (the
    module's amounts are not rewritten), which never touches a channel dim of batched input."""
    x = _first_tensor(c, node)
    pad = c.modules[node.target].padding
    xs = c.shape(x)
    padded = tuple(len(xs) - 1 - k for k in range(len(pad) // 2) if (pad[2 * k], pad[2 * k + 1]) != (0, 0))
    c.union_all(x, node, node, skip=padded)
    for d in padded:
        why = f"{type(c.modules[node.target]).__name__} '{node.target}' pads dim {d} by a fixed amount"
        c.s.poison_space(c.sp(x, d), why)
        c.s.poison_space(c.sp(node, d), why)


# ---------------------------------------------------------------------------------------------
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                  nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax, nn.LogSoftmax, nn.Identity,
                  nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Hardtanh,
                  nn.Softplus, nn.Softsign, nn.LocalResponseNorm)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
                 nn.UpsamplingBilinear2d)

MODULE_RULES: dict[type, Callable[[Coupler, Node], None]] = {
    **{t: rule_unary for t in _UNARY_MODULES},
    **{t: rule_pool for t in _POOL_MODULES},
    **{t: rule_pad_module for t in _PAD_MODULES},
    nn.PReLU: rule_prelu_module,
    nn.Conv1d: rule_conv_module, nn.Conv2d: rule_conv_module, nn.Conv3d: rule_conv_module,
    nn.ConvTranspose1d: rule_conv_module, nn.ConvTranspose2d: rule_conv_module, nn.ConvTranspose3d: rule_conv_module,
    nn.Linear: rule_linear_module,
    nn.BatchNorm1d: rule_batch_norm_module, nn.BatchNorm2d: rule_batch_norm_module, nn.BatchNorm3d: rule_batch_norm_module,
    nn.SyncBatchNorm: rule_batch_norm_module,
    nn.GroupNorm: rule_group_norm_module,
    nn.LayerNorm: rule_layer_norm_module,
    nn.Flatten: rule_reshape, nn.Unflatten: rule_reshape,
}

_UNARY_FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
                    F.elu, F.mish, F.softmax, F.log_softmax, F.dropout, F.dropout1d, F.dropout2d, F.hardtanh,
                    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt,
                    torch.rsqrt, torch.softmax, torch.clamp, torch.clone, torch.nn.functional.relu_,
                    operator.neg, torch.erf)
_BROADCAST_FUNCTIONS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
                        operator.isub, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                        torch.maximum, torch.minimum, torch.where, torch.pow, operator.pow)

FUNCTION_RULES: dict[Any, Callable[[Coupler, Node], None]] = {
    **{f: rule_unary for f in _UNARY_FUNCTIONS},
    **{f: rule_broadcast for f in _BROADCAST_FUNCTIONS},
    F.conv1d: rule_conv_function, F.conv2d: rule_conv_function, F.conv3d: rule_conv_function,
    F.linear: rule_linear_function, F.batch_norm: rule_batch_norm_function, F.layer_norm: rule_layer_norm_function,
    F.adaptive_avg_pool1d: rule_pool, F.adaptive_avg_pool2d: rule_pool, F.adaptive_max_pool2d: rule_pool,
    F.max_pool2d: rule_pool, F.avg_pool2d: rule_pool, F.interpolate: rule_pool, F.pad: rule_pad,
    torch.flatten: rule_reshape, torch.reshape: rule_reshape, torch.squeeze: rule_reshape, torch.unsqueeze: rule_reshape,
    torch.permute: rule_permute, torch.transpose: rule_permute, torch.swapaxes: rule_permute,
    torch.cat: rule_cat, torch.concat: rule_cat, torch.stack: rule_stack,
    torch.split: rule_split, torch.chunk: rule_split, torch.unbind: rule_split,
    operator.getitem: rule_getitem,
    torch.mean: rule_reduce, torch.sum: rule_reduce, torch.amax: rule_reduce,
    torch.matmul: rule_matmul, torch.bmm: rule_matmul, operator.matmul: rule_matmul,
    F.scaled_dot_product_attention: rule_sdpa, torch.einsum: rule_einsum,
}

METHOD_RULES: dict[str, Callable[[Coupler, Node], None]] = {
    **{m: rule_unary for m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt",
                               "softmax", "log_softmax", "contiguous", "clone", "detach", "float", "double", "half",
                               "to", "type", "type_as", "clamp", "clamp_", "requires_grad_", "erf")},
    **{m: rule_broadcast for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow")},
    **{m: rule_reshape for m in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten")},
    **{m: rule_permute for m in ("permute", "transpose", "swapaxes", "t")},
    **{m: rule_split for m in ("split", "chunk", "unbind")},
    "expand": rule_expand, "expand_as": rule_expand,
    "mean": rule_reduce, "sum": rule_reduce, "amax": rule_reduce,
    "matmul": rule_matmul, "bmm": rule_matmul,
}


def _torchvision_rules() -> dict[Any, Callable[[Coupler, Node], None]]:
    """Rules for torchvision's fx-wrapped helpers (leaf functions in a trace)."""
    rules: dict[Any, Callable[[Coupler, Node], None]] = {}
    try:
        from torchvision.ops import stochastic_depth
        from torchvision.models import swin_transformer
    except ImportError:  # torchvision is optional for the graph package
        return rules
    rules[stochastic_depth] = rule_unary
    rules[swin_transformer._patch_merging_pad] = rule_patch_merging_pad
    return rules


FUNCTION_RULES.update(_torchvision_rules())


NO_RULE_REASONS: dict[type, str] = {
    nn.MultiheadAttention: "ties embed_dim to its input width and its head count, so its input and output "
                           "channels stay unpruned (its fused in-projection is not split)",
}


Rule = Callable[[Coupler, Node], None]
_USER_MODULE_TYPES: set[type] = set()


def register_rule(target: type[nn.Module] | Callable[..., Any] | str, rule: Rule) -> None:
    """Teach the channel graph an op: ``rule(c, node)`` is called for every traced node of ``target``.

    ``target`` is a module class (matched along the MRO; its instances become leaves of the trace, so
    the rule sees the whole module as one ``call_module`` node), a function (a ``call_function``
    target: a torch function, or a function of your own made a leaf with ``torch.fx.wrap``), or a
    tensor method name (``call_method``, e.g. ``"roll"``). A later registration for the same target
    replaces the earlier one, built-in rules included.

    The rule declares how the node ties its channels, through the `Coupler` ``c``:
    ``c.dims(n, i)`` / ``c.sp(n, dim, i)`` are the space ids of the dims of output ``i`` of node ``n``;
    ``c.param(qualname)`` those of a parameter or buffer; ``c.union(a, b, node)`` says two spaces hold
    the same channels; ``c.union_all(x, node, node)`` passes every dim of ``x`` through;
    ``c.s.link(a, ia, b, ib)`` ties single elements; ``c.s.poison_space(a, reason)`` fixes a space's
    size; ``c.module_fixups[node.target] = fix`` lets surgery update module attributes after slicing
    (``fix(module, kept)``). Raise `Unsupported` to fix every space the node touches, with a reason.
    """
    if isinstance(target, type) and issubclass(target, nn.Module):
        MODULE_RULES[target] = rule
        _USER_MODULE_TYPES.add(target)
    elif isinstance(target, str):
        METHOD_RULES[target] = rule
    elif callable(target):
        FUNCTION_RULES[target] = rule
    else:
        raise TypeError(f"register_rule: target must be an nn.Module class, a function or a method name, got {target!r}")


def is_rule_leaf(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a class given to `register_rule` (traced as one node)."""
    return any(t in _USER_MODULE_TYPES for t in type(module).__mro__)


def is_opaque(node: Node, modules: dict[str, nn.Module]) -> bool:
    """Nodes whose MACs the rules do not model: ops without a rule (measured instead, and fixed)."""
    return lookup_rule(node, modules) is None


def lookup_rule(node: Node, modules: dict[str, nn.Module]) -> Callable[[Coupler, Node], None] | None:
    if node.op == "call_module":
        for t in type(modules[node.target]).__mro__:
            if t in MODULE_RULES:
                return MODULE_RULES[t]
        return None
    if node.op == "call_function":
        try:
            return FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None
