"""Shape and indexing: reshape / view / flatten, permute, expand, concatenation, stacking, split, getitem, reductions."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx import Node
from torch.fx.passes.shape_prop import TensorMetadata

from .coupler import Coupler, Kept, Unsupported, arg, first_tensor, tensor_metas

__all__ = [
    "rule_aten_index",
    "rule_aten_slice",
    "rule_cat",
    "rule_expand",
    "rule_getitem",
    "rule_permute",
    "rule_reduce",
    "rule_reshape",
    "rule_split",
    "rule_stack",
]


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


def size_sources(c: Coupler, value: Any, depth: int = 8) -> list[int]:
    """The spaces a size computed at run time reads (``x.shape[d]``, ``x.size(d)``, arithmetic on them)."""
    if not isinstance(value, Node) or depth == 0:
        return []
    if value.op == "call_method" and value.target == "size" and len(value.args) > 1:
        x, d = value.args[0], value.args[1]
        return [c.sp(x, d)] if isinstance(d, int) and c.shape(x) is not None else []
    if value.op == "call_function" and value.target is operator.getitem and isinstance(value.args[0], Node):
        whole, d = value.args
        shaped = (whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1) or (
            whole.op == "call_function" and whole.target is getattr and whole.args[1:] == ("shape",)
        )
        if shaped and isinstance(d, int):
            return [c.sp(whole.args[0], d)] if c.shape(whole.args[0]) is not None else []
    found: list[int] = []
    fx.node.map_arg((value.args, value.kwargs), lambda n: found.extend(size_sources(c, n, depth - 1)))
    return found


def _resized(c: Coupler, vals: Sequence[Any], old: Sequence[int], new: Sequence[int], kept: Kept) -> list[Any]:
    """Size arguments after surgery: every dim whose size changed gets its new size as a constant, and so
    does every size computed from a dim that surgery changes (e.g. ``C // heads`` read from a pruned
    tensor, for a dim that keeps its size); -1 and other sizes stay (a batch size stays dynamic)."""

    def stale(v: Any) -> bool:
        return any(int(kept(s).sum()) != c.s.size[s] for s in size_sources(c, v))

    return [
        new[k] if not (isinstance(v, int) and v == -1) and (new[k] != old[k] or stale(v)) else v
        for k, v in enumerate(vals)
    ]


_aten = torch.ops.aten
# functions whose sizes come as one sequence argument after the tensor: torch.reshape and its ATen forms
_SIZED = (torch.reshape, _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)
# (x, dim, sizes): the method and its ATen form
_UNFLATTEN = ("unflatten", _aten.unflatten.int)


def rule_reshape(c: Coupler, node: Node) -> None:
    """view / reshape / flatten / squeeze / unsqueeze: one dim of each merged or split run carries the
    channels; the others keep their size. Constant sizes in the arguments are rewritten by surgery."""
    x = first_tensor(c, node)
    _reshape_coupling(c, x, node)
    if node.op == "call_module":
        if isinstance(c.modules[node.target], nn.Unflatten):
            _fix_unflatten_module(c, x, node)
        return
    if node.target in ("view", "reshape", *_UNFLATTEN, *_SIZED):
        out, old = c.dims(node), c.shape(node)

        def fix(n: Node, kept: Kept) -> None:
            new = [int(kept(s).sum()) for s in out]
            if n.target in _UNFLATTEN:
                dim, sizes = n.args[1], n.args[2]
                start = dim % len(c.shape(n.args[0]))
                n.args = (n.args[0], dim, tuple(_resized(c, sizes, old[start:], new[start:], kept)))
                return
            sized = n.target in _SIZED
            spec = n.args[1] if sized else n.args[1:]
            packed = sized or (len(spec) == 1 and isinstance(spec[0], (tuple, list)))
            vals = list(spec if sized else (spec[0] if packed else spec))
            vals = _resized(c, vals, old, new, kept)
            n.args = (n.args[0], vals) if packed else (n.args[0], *vals)

        c.node_fixups[node.name] = fix


def _fix_unflatten_module(c: Coupler, x: Node, node: Node) -> None:
    """An ``nn.Unflatten`` holds its sizes: surgery rewrites ``unflattened_size`` as it does a call's."""
    out, old = c.dims(node), c.shape(node)
    start = c.modules[node.target].dim % len(c.shape(x))

    def fix(m: nn.Module, kept: Kept) -> None:
        new = [int(kept(s).sum()) for s in out]
        m.unflattened_size = tuple(_resized(c, list(m.unflattened_size), old[start:], new[start:], kept))

    c.module_fixups[node.target] = fix


def rule_permute(c: Coupler, node: Node) -> None:
    x = node.args[0]
    n = len(c.shape(x))
    if node.target in ("permute", torch.permute, _aten.permute.default):
        rest = node.args[1:] if node.target == "permute" else (node.args[1],)
        perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else list(rest)
        perm = [p % n for p in perm]
    elif node.target in ("t", _aten.t.default):
        perm = list(range(n))[::-1]
    else:  # transpose / swapaxes
        d0, d1 = arg(node, 1, "dim0") % n, arg(node, 2, "dim1") % n
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
            vals = _resized(c, list(spec[0] if packed else spec), old, [int(kept(s).sum()) for s in out], kept)
            n.args = (n.args[0], vals) if packed else (n.args[0], *vals)

        c.node_fixups[node.name] = fix


def rule_cat(c: Coupler, node: Node) -> None:
    tensors = node.args[0]
    dim = arg(node, 1, "dim", 0)
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
    dim = arg(node, 1, "dim", 0) % len(c.shape(node))
    for t in tensors:
        for d in range(len(c.shape(t))):
            c.union(c.sp(t, d), c.sp(node, d if d < dim else d + 1), node)


def rule_split(c: Coupler, node: Node) -> None:
    """split / chunk / unbind: output i holds a contiguous range of the input dim. Surgery rewrites
    the sizes (chunk becomes split with explicit sizes, since kept counts may differ per piece)."""
    x = node.args[0]
    xs = c.shape(x)
    if node.target in ("unbind", torch.unbind, _aten.unbind.int):
        dim = arg(node, 1, "dim", 0) % len(xs)
        c.s.poison_space(c.sp(x, dim), f"unbind at node '{node.name}' fixes its size")
        for i in range(len(tensor_metas(node))):
            for d in range(len(xs)):
                if d != dim:
                    c.union(c.sp(x, d), c.sp(node, d if d < dim else d - 1, i), node)
        return
    dim = arg(node, 2, "dim", 0) % len(xs)
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
        _gather_coupling(c, x, node, items)
        return
    if Ellipsis in items:
        e = items.index(Ellipsis)
        explicit = sum(1 for it in items if it is not None and it is not Ellipsis)
        items[e : e + 1] = [slice(None)] * (len(xs) - explicit)
    items += [slice(None)] * (len(xs) - sum(1 for it in items if it is not None))
    d_in, d_out, slices = 0, 0, {}
    for it in items:
        if it is None:
            d_out += 1
        elif isinstance(it, int):
            c.s.poison_space(c.sp(x, d_in), f"indexed at a constant position at node '{node.name}'")
            d_in += 1
        elif isinstance(it, slice) and any(isinstance(v, Node) for v in (it.start, it.stop, it.step)):
            why = f"sliced with bounds computed at run time at node '{node.name}'"
            c.s.poison_space(c.sp(x, d_in), why)
            c.s.poison_space(c.sp(node, d_out), why)
            d_in, d_out = d_in + 1, d_out + 1
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
                        start = int(m[: rng.start].sum())
                        new.append(slice(start, start + int(m[np.asarray(rng)].sum()), None))
                else:
                    new.append(it)
                d += it is not None
            n.args = (n.args[0], tuple(new))

        c.node_fixups[node.name] = fix


def _gather_coupling(c: Coupler, x: Node, node: Node, items: Sequence[Any]) -> None:
    """``x[:, idx]`` (LeViT's attention biases, gathered from a table by a position index): dims taken whole
    pass through; the dims a tensor indexes are gathered (positions, never channels) and so are the dims the
    index's shape puts in the output — where the first index stands when the indices are adjacent, first
    otherwise (the NumPy rule). Other mixes (ints, partial slices, None, boolean masks) stay unsupported."""
    xs, out = c.shape(x), c.shape(node)
    tensors = [k for k, it in enumerate(items) if isinstance(it, Node)]
    for it in items:
        if isinstance(it, Node):
            meta = it.meta.get("tensor_meta")
            if not isinstance(meta, TensorMetadata) or meta.dtype in (torch.bool, torch.uint8):
                raise Unsupported("indexing with a boolean mask")
        elif it != slice(None):
            raise Unsupported(f"index {it!r} beside a tensor index")
    whole = [d for d in range(len(xs)) if d >= len(items) or not isinstance(items[d], Node)]
    gathered = len(out) - len(whole)
    first = tensors[0] if tensors == list(range(tensors[0], tensors[-1] + 1)) else 0
    why = f"gathered by a tensor index at node '{node.name}'"
    for d in tensors:
        c.s.poison_space(c.sp(x, d), why)
    for d in range(first, first + gathered):
        c.s.poison_space(c.sp(node, d), why)
    for d_in, d_out in zip(whole, [d for d in range(len(out)) if not first <= d < first + gathered]):
        c.union(c.sp(x, d_in), c.sp(node, d_out), node)


def rule_aten_index(c: Coupler, node: Node) -> None:
    """aten.index.Tensor(x, indices), the exported form of ``x[:, idx]`` (``None`` for a dim taken whole)."""
    x, indices = node.args[0], node.args[1]
    _gather_coupling(c, x, node, [slice(None) if i is None else i for i in indices])


def rule_aten_slice(c: Coupler, node: Node) -> None:
    """aten.slice(x, dim, start, end, step), the exported form of ``x[..., a:b:s]``: the kept range of
    ``dim`` links to the output; surgery rewrites the bounds (a strided slice fixes the input's size)."""
    x = node.args[0]
    xs = c.shape(x)
    dim = arg(node, 1, "dim", 0) % len(xs)
    rng = range(*slice(arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)).indices(xs[dim]))
    for d in range(len(xs)):
        if d != dim:
            c.union(c.sp(x, d), c.sp(node, d), node)
    a, b = c.sp(x, dim), c.sp(node, dim)
    if len(rng) == xs[dim] and rng.step == 1:
        c.union(a, b, node)
        return
    if rng.step != 1:
        c.s.poison_space(a, f"strided slice at node '{node.name}'")
    c.s.link(a, np.asarray(rng), b, np.arange(len(rng)))

    def fix(n: Node, kept: Kept) -> None:
        m = kept(a)
        if not m.all():
            start = int(m[: rng.start].sum())
            n.args, n.kwargs = (n.args[0], dim, start, start + int(m[np.asarray(rng)].sum())), {}

    c.node_fixups[node.name] = fix


def rule_reduce(c: Coupler, node: Node) -> None:
    x = node.args[0]
    xs = c.shape(x)
    dim = arg(node, 1, "dim")
    keep = arg(node, 2, "keepdim", False)
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
