"""The `Coupler`: the context every channel rule receives, and what rules record in it.

The coupler walks an fx graph in topological order and hands every node to its rule (found by the
registry's ``rule_for``). A rule declares identity unions and index links between *spaces* (tensor
dims), records producers (layers whose weight rows define channels), consumers, MACs terms, and the
fix-ups surgery needs (module attributes, hard-coded sizes in node arguments). An op without a rule
poisons every space it touches, so its channels are never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx import Node
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import GraphTraceError
from ..spaces import SpaceSet

__all__ = [
    "Coupler",
    "Kept",
    "MacsTerm",
    "ProducerRecord",
    "Rule",
    "RuleFor",
    "Unsupported",
    "arg",
    "describe",
    "first_tensor",
    "owner",
    "tensor_metas",
]

Kept = Callable[[int], np.ndarray]  # space id -> boolean keep mask along that space


class Unsupported(Exception):
    """Raised by a rule for a configuration it does not handle; the node's spaces are poisoned."""


@dataclass(frozen=True)
class ProducerRecord:
    module: str  # qualified name of the layer owning the weight
    node: str  # fx node that applies it
    space: int  # space id of the weight's output-row dim


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

    def __init__(
        self, root: nn.Module, graph: fx.Graph, rule_for: RuleFor, modules: dict[str, nn.Module] | None = None
    ) -> None:
        self.root, self.graph, self.rule_for = root, graph, rule_for
        self.s = SpaceSet()
        self.modules = modules if modules is not None else dict(root.named_modules())
        self.producers: list[ProducerRecord] = []
        self.consumers: list[tuple[str, int]] = []
        self.macs_terms: list[MacsTerm] = []
        self.params: dict[str, tuple[int, ...]] = {}  # parameter/buffer name -> its dim spaces
        self.module_fixups: dict[str, Callable[[nn.Module, Kept], None]] = {}
        self.node_fixups: dict[str, Callable[[Node, Kept], None]] = {}
        self.refused: list[Node] = []  # nodes whose rule raised `Unsupported` (channels fixed)
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
    def run(self) -> Coupler:
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
        rule = self.rule_for(node, self.modules)
        if isinstance(rule, str):
            self.poison_node(node, f"{describe(node, self.modules)} at node '{node.name}' {rule}")
            return
        try:
            rule(self, node)
        except Unsupported as exc:
            self.refused.append(node)
            self.poison_node(node, f"{describe(node, self.modules)} at node '{node.name}': {exc}")
        except Exception as exc:  # a rule meeting a form it does not expect: name the node, not a traceback
            raise GraphTraceError(
                f"the channel rule for {describe(node, self.modules)} at node '{node.name}' failed on this "
                f"call ({type(exc).__name__}: {exc}); register a rule for it with reparam.graph.register_rule "
                "or make its module a leaf (trace(..., leaf_modules=...))"
            ) from exc


Rule = Callable[[Coupler, Node], None]
RuleFor = Callable[[Node, dict], "Rule | str"]  # a node's rule, or why it has none


# ---------------------------------------------------------------------------------------------
# helpers shared by the rule families
def arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def owner(c: Coupler, w: Any) -> str | None:
    """Module owning a weight given as a get_attr node."""
    if isinstance(w, Node) and w.op == "get_attr":
        return w.target.rpartition(".")[0]
    return None


def first_tensor(c: Coupler, node: Node) -> Node:
    ins = c.tensor_inputs(node)
    if not ins:
        raise Unsupported("no tensor input")
    return ins[0]
