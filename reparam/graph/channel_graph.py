"""`trace(model, inputs) -> ChannelGraph`: the traced program, its coupled channel groups and a MACs model.

Channels are found per element: every tensor dimension is a *space*; rules (the `rules` package) join spaces by
identity and link single elements (concat, slicing, reshapes, grouped convs). The connected
components of the element graph are the *logical channels*: removing one removes every element
in it. Logical channels that occur in exactly the same spaces, the same number of times, form a
*group*: they are interchangeable, so any keep-set of `n` of them gives every space in the group
the same size, and MACs become a polynomial in the group widths.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import networkx as nx
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import fx, nn

from .errors import GraphTraceError
from .export_frontend import export_graph
from .rules import Coupler, describe, is_opaque, models_macs, rule_for, tensor_metas
from .tracing import LeafSpec, as_tuple, propagate_shapes, symbolic_trace


@dataclass(frozen=True, eq=False)
class Member:
    """A slice of one tensor dimension that shrinks with a group.

    `positions[k]` (an index along `dim` of `name`) holds group channel `channels[k]`; a channel may
    own several positions (e.g. the H*W columns of a linear layer after a flatten)."""

    name: str  # parameter/buffer qualified name, or fx node name
    kind: str  # "param", "buffer" or "node"
    dim: int
    positions: np.ndarray
    channels: np.ndarray


@dataclass(frozen=True, eq=False)
class Producer:
    """A layer whose weight rows define channels of a group (`member` holds its row mapping)."""

    module: str
    norm: str | None
    offset: int
    member: Member


@dataclass(eq=False)
class ChannelGroup:
    """Channels that must be removed together; `keep` sets index `range(size)`."""

    id: int
    size: int
    prunable: bool
    reason: str | None
    min_channels: int
    multiple: int
    producers: tuple[Producer, ...]
    _graph: ChannelGraph = field(repr=False)
    _roots: tuple[int, ...] = field(repr=False)

    @cached_property
    def members(self) -> tuple[Member, ...]:
        return self._graph._members(self)

    @cached_property
    def consumers(self) -> tuple[Member, ...]:
        names = {f"{m}.weight" for m in self._graph._consumer_modules}
        return tuple(m for m in self.members if m.name in names and m.dim == 1)

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"fixed: {self.reason}"
        return (
            f"ChannelGroup(id={self.id}, size={self.size}, producers={[p.module for p in self.producers]}, "
            f"multiple={self.multiple}, {state})"
        )


# where a functional batch norm takes its weight: (position, keyword)
_BN_WEIGHT_ARG = {torch.nn.functional.batch_norm: (3, "weight"), torch.ops.aten.batch_norm.default: (1, "weight")}


class ChannelGraph:
    """A traced model: `nx` (the program), `groups` (coupled channels), `macs()` / `params()`."""

    def __init__(
        self,
        model: nn.Module,
        graph: fx.Graph,
        example_inputs: tuple,
        round_to: int = 1,
        leaf_modules: tuple = (),
        modules: dict[str, nn.Module] | None = None,
        frontend: str = "fx",
        concrete_args: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.graph = graph
        self.leaf_modules = leaf_modules
        self.frontend = frontend  # the front end that made `graph`: "fx" or "export"
        self.concrete_args = dict(concrete_args or {})
        self.example_inputs = example_inputs
        self.round_to = int(round_to)
        c = Coupler(model, graph, rule_for, modules).run()
        unmodelled = {n.name for n in c.refused if models_macs(n, c.modules)}
        if unmodelled:  # a conv / matmul / attention its rule refused: its MACs are measured instead
            propagate_shapes(model, graph, example_inputs, opaque=lambda n: n.name in unmodelled)
        self.coupler = c
        self._consumer_modules = {m for m, _ in c.consumers}
        self._build_elements(c)
        self._build_groups(c)
        self._build_cost_model(c)

    # -- construction ------------------------------------------------------------------------
    def _build_elements(self, c: Coupler) -> None:
        s = c.s
        roots = s.roots()
        uniq = np.unique(roots)
        slot = np.full(len(s.keys), -1, dtype=np.int64)
        slot[uniq] = np.arange(len(uniq))
        self._space_root = slot[roots]  # space id -> root slot
        sizes = np.asarray(s.size, dtype=np.int64)[uniq]
        self._root_size = sizes
        self._base = np.concatenate([[0], np.cumsum(sizes)])  # root slot -> first element id
        n_elem = int(self._base[-1])
        if s.links:
            src = np.concatenate([self._base[self._space_root[a]] + ia for a, ia, _, _ in s.links])
            dst = np.concatenate([self._base[self._space_root[b]] + ib for _, _, b, ib in s.links])
            adj = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n_elem, n_elem))
            n_comp, comp = connected_components(adj, directed=False)
        else:
            n_comp, comp = n_elem, np.arange(n_elem)
        self._comp = comp
        self._n_comp = n_comp
        self._elem_root = np.repeat(np.arange(len(uniq)), sizes)  # element -> root slot

    def _build_groups(self, c: Coupler) -> None:
        s, comp, n_comp = c.s, self._comp, self._n_comp
        # signature of a logical channel: the multiset of root spaces holding it, as a sum of random
        # 64-bit keys (wrapping); two different multisets collide with probability ~2^-64
        rng = np.random.default_rng(0)
        keys = rng.integers(0, 2**63, size=len(self._root_size), dtype=np.int64).astype(np.uint64) * np.uint64(
            2
        ) + np.uint64(1)
        sig = np.zeros(n_comp, dtype=np.uint64)
        np.add.at(sig, comp, keys[self._elem_root])
        comp_first = np.full(n_comp, len(comp), dtype=np.int64)  # first element of each channel
        np.minimum.at(comp_first, comp, np.arange(len(comp)))
        _, raw_group = np.unique(sig, return_inverse=True)
        raw_group = raw_group.reshape(-1)
        n_raw = int(raw_group.max()) + 1 if n_comp else 0
        group_first = np.full(n_raw, np.iinfo(np.int64).max)
        np.minimum.at(group_first, raw_group, comp_first)
        # which groups carry parameters: those are listed, the rest (spatial, batch, ...) are internal
        # (a parameter dim that never meets an activation, like a kernel's height, is not a channel)
        param_space = np.fromiter((k[0].startswith("@") for k in s.keys), dtype=bool, count=len(s.keys))
        param_roots = np.zeros(len(self._root_size), dtype=bool)
        param_roots[self._space_root[param_space]] = True
        node_space = np.fromiter((k[0][:1] not in ("@", "#") for k in s.keys), dtype=bool, count=len(s.keys))
        node_roots = np.zeros(len(self._root_size), dtype=bool)
        node_roots[self._space_root[node_space]] = True
        elem_group_raw = raw_group[comp]
        has_param = np.zeros(n_raw, dtype=bool)
        has_param[elem_group_raw[param_roots[self._elem_root]]] = True
        has_node = np.zeros(n_raw, dtype=bool)
        has_node[elem_group_raw[node_roots[self._elem_root]]] = True
        has_param &= has_node
        order = np.lexsort((group_first, ~has_param))
        rank = np.empty(n_raw, dtype=np.int64)
        rank[order] = np.arange(n_raw)
        self._n_listed = int(has_param.sum())
        comp_group = rank[raw_group]
        # logical index of each channel inside its group: by first appearance
        chan_order = np.lexsort((comp_first, comp_group))
        counts = np.bincount(comp_group, minlength=n_raw)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        comp_lidx = np.empty(n_comp, dtype=np.int64)
        comp_lidx[chan_order] = np.arange(n_comp) - np.repeat(starts, counts)
        self._comp_group, self._comp_lidx, self._group_size = comp_group, comp_lidx, counts
        self._group_offset = np.concatenate([[0], np.cumsum(counts)])
        self._elem_group = comp_group[comp]
        self._elem_lidx = comp_lidx[comp]
        # (root, group, multiplicity): how many elements of a root space each channel of the group owns
        pair = self._elem_root * n_raw + self._elem_group
        upair, cnt = np.unique(pair, return_counts=True)
        self._rg_root, self._rg_group = upair // n_raw, upair % n_raw
        self._rg_mult = cnt // counts[self._rg_group]
        roots_of_group: dict[int, list[int]] = {}
        for r, g in zip(self._rg_root.tolist(), self._rg_group.tolist()):
            roots_of_group.setdefault(g, []).append(r)
        # poison and producers per listed group
        poison_root: dict[int, str] = {}
        for sid, reason in s.poison.items():
            poison_root.setdefault(int(self._space_root[sid]), reason)
        prod_by_group: dict[int, list[Producer]] = {}
        multiple: dict[int, int] = {}  # keep counts in producer rows must be multiples of round_to
        node_users = {n.name: n for n in self.graph.nodes}
        for rec in c.producers:
            root = int(self._space_root[rec.space])
            norm = self._sole_bn(node_users[rec.node])
            for g in self._groups_in_root(root):
                member = self._member_of_space(rec.space, g)
                if member is not None:
                    prod_by_group.setdefault(g, []).append(
                        Producer(rec.module, norm, int(member.channels.min()), member)
                    )
                    rows_per_channel = self._mult(root, g)
                    multiple[g] = math.lcm(
                        multiple.get(g, 1), self.round_to // math.gcd(self.round_to, rows_per_channel)
                    )
        groups: list[ChannelGroup] = []
        for g in range(self._n_listed):
            roots = tuple(roots_of_group.get(g, ()))
            producers = tuple(prod_by_group.get(g, ()))
            reason = next((poison_root[r] for r in roots if r in poison_root), None)
            if reason is None and not producers:
                reason = "no convolution or linear layer produces these channels"
            mult = multiple.get(g, 1)
            size = int(counts[g])
            groups.append(ChannelGroup(g, size, reason is None, reason, min(mult, size), mult, producers, self, roots))
        self.groups: list[ChannelGroup] = groups

    def _sole_bn(self, node: fx.Node) -> str | None:
        """The BatchNorm module that alone reads `node`'s output: a module call, or the functional /
        ATen batch norm (the export front end) on the tensors of a plain `nn.BatchNorm*` module."""
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_module":
            m = self.coupler.modules[user.target]
            return user.target if isinstance(m, nn.modules.batchnorm._BatchNorm) else None
        weight = _BN_WEIGHT_ARG.get(user.target) if user.op == "call_function" else None
        if weight is None or not user.args or user.args[0] is not node:
            return None
        w = user.args[weight[0]] if len(user.args) > weight[0] else user.kwargs.get(weight[1])
        if isinstance(w, fx.Node) and w.op == "get_attr":
            owner = w.target.rpartition(".")[0]
            if type(self.coupler.modules.get(owner)) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                return owner  # a subclass may add to the functional call (e.g. an activation): not a plain BN
        return None

    def _groups_in_root(self, root: int) -> list[int]:
        lo, hi = self._base[root], self._base[root + 1]
        return sorted(set(np.unique(self._elem_group[lo:hi]).tolist()))

    def _mult(self, root: int, g: int) -> int:
        hit = np.nonzero((self._rg_root == root) & (self._rg_group == g))[0]
        return int(self._rg_mult[hit[0]]) if len(hit) else 0

    def _member_of_space(self, sid: int, g: int) -> Member | None:
        key, out_i, dim = self.coupler.s.keys[sid]
        if key.startswith("#"):
            return None  # synthetic (see SpaceSet.poison_elements): no tensor to slice
        root = int(self._space_root[sid])
        lo, hi = self._base[root], self._base[root + 1]
        sel = np.nonzero(self._elem_group[lo:hi] == g)[0]
        if len(sel) == 0:
            return None
        if key.startswith("@"):
            name = key[1:]
            kind = "buffer" if self._is_buffer(name) else "param"
        else:
            name, kind = key if out_i == 0 else f"{key}[{out_i}]", "node"
        return Member(name, kind, dim, sel, self._elem_lidx[lo + sel])

    @cached_property
    def _buffer_names(self) -> set[str]:
        return {n for n, _ in self.model.named_buffers()}

    def _is_buffer(self, name: str) -> bool:
        return name in self._buffer_names

    @cached_property
    def _spaces_of_root(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for sid, r in enumerate(self._space_root.tolist()):
            out.setdefault(r, []).append(sid)
        return out

    def _members(self, group: ChannelGroup) -> tuple[Member, ...]:
        members = []
        for r in group._roots:
            for sid in self._spaces_of_root[r]:
                m = self._member_of_space(sid, group.id)
                if m is not None:
                    members.append(m)
        return tuple(members)

    def _build_cost_model(self, c: Coupler) -> None:
        """MACs and params as sums of products of space sizes; a space's size is linear in the widths."""
        n_roots = len(self._root_size)
        self._one = n_roots  # index of a constant 1 appended to the root sizes

        def pack(rows: list[tuple[int, ...]]) -> np.ndarray:
            width = max((len(r) for r in rows), default=1)
            out = np.full((len(rows), max(width, 1)), self._one, dtype=np.int64)
            for i, r in enumerate(rows):
                out[i, : len(r)] = self._space_root[list(r)] if r else []
            return out

        self._opaque_macs = {n.name: int(n.meta["opaque_macs"]) for n in self.graph.nodes if n.meta.get("opaque_macs")}
        self._macs_nodes = [t.node for t in c.macs_terms]
        self._macs_factors = pack([t.factors for t in c.macs_terms])
        names = list(c.params)
        program = self.program_parameters()
        used = [n for n in names if n in program]
        self._param_names = used
        self._param_factors = pack([c.params[n] for n in used])
        self._unused_params = sum(p.numel() for n, p in program.items() if n not in c.params)
        self._default_widths = self._group_size.astype(np.float64)

    def program_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters the traced program uses (modules it calls and attributes it reads), by name."""
        out: dict[str, torch.Tensor] = {}
        modules = self.coupler.modules
        for n in self.graph.nodes:
            if n.op == "call_module":
                out.update((f"{n.target}.{k}", p) for k, p in modules[n.target].named_parameters())
            elif n.op == "get_attr" and isinstance(self.coupler._tensors.get(n.target), nn.Parameter):
                out[n.target] = self.coupler._tensors[n.target]
        return out

    @cached_property
    def gm(self) -> fx.GraphModule:
        """The traced program as a `torch.fx.GraphModule` (sharing the model's modules)."""
        return fx.GraphModule(self.model, self.graph, type(self.model).__name__)

    # -- public API --------------------------------------------------------------------------
    @cached_property
    def nx(self) -> nx.DiGraph:
        """The traced program: nodes are fx node names with op kind, target, module path and shapes."""
        g = nx.DiGraph()
        modules = self.coupler.modules
        for n in self.graph.nodes:
            shapes = [tuple(m.shape) if m is not None else None for m in tensor_metas(n)]
            g.add_node(
                n.name,
                op=n.op,
                target=str(n.target) if n.op != "call_function" else getattr(n.target, "__name__", str(n.target)),
                module=n.target if n.op == "call_module" else None,
                kind=describe(n, modules) if n.op.startswith("call") else n.op,
                shapes=shapes,
            )
            for a in n.all_input_nodes:
                g.add_edge(a.name, n.name)
        return g

    def group_of(self, module_name: str, dim: str = "out") -> ChannelGroup | None:
        """Group holding a conv/linear's output channels (`dim="out"`) or input channels (`dim="in"`);
        when those channels span several groups (e.g. after a concat), the one holding channel 0."""
        groups = self.groups_of(module_name, dim)
        return groups[0] if groups else None

    def groups_of(self, module_name: str, dim: str = "out") -> list[ChannelGroup]:
        if dim not in ("out", "in"):
            raise ValueError("dim must be 'out' or 'in'")
        p = self.coupler.params.get(f"{module_name}.weight")
        if p is None:
            return []
        m = self.coupler.modules.get(module_name)
        if dim == "in" and isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels:
            sid = next(s for mod, s in self.coupler.consumers if mod == module_name)
        else:
            sid = p[0] if dim == "out" else p[1]
        root = int(self._space_root[sid])
        lo = self._base[root]
        first = int(self._elem_group[lo])
        found = [g for g in self._groups_in_root(root) if g < self._n_listed]
        found.sort(key=lambda g: g != first)
        return [self.groups[g] for g in found]

    def _widths(self, widths: Mapping[int, int] | None) -> np.ndarray:
        w = self._default_widths
        if widths:
            w = w.copy()
            for gid, n in widths.items():
                w[int(gid.id if isinstance(gid, ChannelGroup) else gid)] = n
        return w

    def _root_sizes(self, w: np.ndarray) -> np.ndarray:
        sizes = np.bincount(
            self._rg_root, weights=self._rg_mult * w[self._rg_group], minlength=len(self._root_size) + 1
        )
        sizes[self._one] = 1.0
        return sizes

    def macs(self, widths: Mapping[int, int] | None = None) -> int:
        """Total multiply-accumulates of conv / linear / matmul / attention for the example input, if
        group `id` had `widths[id]` channels (other groups unchanged). Papers call these FLOPs."""
        sizes = self._root_sizes(self._widths(widths))
        modelled = float(np.prod(sizes[self._macs_factors], axis=1).sum())
        return int(round(modelled)) + sum(self._opaque_macs.values())

    def params(self, widths: Mapping[int, int] | None = None) -> int:
        """Total parameter count if group `id` had `widths[id]` channels."""
        sizes = self._root_sizes(self._widths(widths))
        return int(round(float(np.prod(sizes[self._param_factors], axis=1).sum()))) + self._unused_params

    def node_macs(self, widths: Mapping[int, int] | None = None) -> dict[str, int]:
        sizes = self._root_sizes(self._widths(widths))
        out: dict[str, int] = {}
        for name, v in zip(self._macs_nodes, np.prod(sizes[self._macs_factors], axis=1).tolist()):
            out[name] = out.get(name, 0) + int(round(v))
        for name, v in self._opaque_macs.items():
            out[name] = out.get(name, 0) + v
        return out

    def keep_mask(self, keep: Mapping[Any, Sequence[int]]) -> np.ndarray:
        """Per-element keep flags for a validated keep-set (see `surgery.prune`)."""
        flags = np.ones(int(self._group_offset[-1]), dtype=bool)
        for gid, idx in keep.items():
            g = self.groups[int(gid.id if isinstance(gid, ChannelGroup) else gid)]
            sel = np.zeros(g.size, dtype=bool)
            sel[np.asarray(list(idx), dtype=np.int64)] = True
            flags[self._group_offset[g.id] : self._group_offset[g.id] + g.size] = sel
        return flags[self._group_offset[self._elem_group] + self._elem_lidx]

    def space_mask(self, elem_keep: np.ndarray, sid: int) -> np.ndarray:
        root = int(self._space_root[sid])
        return elem_keep[self._base[root] : self._base[root + 1]]

    def __repr__(self) -> str:
        n = sum(g.prunable for g in self.groups)
        return f"ChannelGraph({len(self.graph.nodes)} nodes, {len(self.groups)} groups, {n} prunable)"


Frontend = Literal["auto", "fx", "export"]


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple | list,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    round_to: int = 1,
    concrete_args: Mapping[str, Any] | None = None,
    frontend: Frontend = "auto",
) -> ChannelGraph:
    """Trace `model`, propagate shapes from `example_inputs` and find its channel groups.

    `frontend`: ``"fx"`` traces with torch.fx (module-level nodes, `leaf_modules`, `concrete_args`);
    ``"export"`` captures the ATen graph with `torch.export` (handles Python on sizes that fx cannot
    trace; shapes are specialised to the example inputs); ``"auto"`` tries torch.fx and falls back to
    torch.export when symbolic tracing fails (and no `leaf_modules` are asked for).
    `leaf_modules` (qualified names or classes) are kept whole; their channels stay unpruned.
    `round_to` makes every group's keep count a multiple of it (in producer channels).
    """
    if frontend not in ("auto", "fx", "export"):
        raise ValueError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    inputs = as_tuple(example_inputs)
    leaf_modules = tuple(leaf_modules)
    if frontend == "export" and (leaf_modules or concrete_args):
        raise GraphTraceError(
            "frontend='export' flattens every module, so leaf_modules and concrete_args do not "
            "apply; use frontend='fx' for them"
        )
    used = "export" if frontend == "export" else "fx"
    if frontend == "export":
        graph = export_graph(model, inputs)
    else:
        try:
            graph = symbolic_trace(model, leaf_modules, concrete_args)
        except GraphTraceError as fx_error:
            if frontend == "fx" or leaf_modules or concrete_args:
                raise
            try:
                graph, used = export_graph(model, inputs), "export"
            except GraphTraceError as export_error:
                raise GraphTraceError(f"{fx_error} The torch.export fallback failed too: {export_error}") from fx_error
    modules = dict(model.named_modules())
    propagate_shapes(model, graph, inputs, opaque=lambda n: is_opaque(n, modules))
    return ChannelGraph(model, graph, inputs, round_to, leaf_modules, modules, used, concrete_args)
