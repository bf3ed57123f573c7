"""`flops(model, inputs) -> FlopsReport`: per-node MACs and parameter counts from traced shapes.

MACs count one multiply-accumulate per weight use in conv / linear / matmul / einsum / attention
(what `torch.utils.flop_counter` reports as FLOPs = 2 x MACs); papers usually call MACs "FLOPs".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .channel_graph import ChannelGraph, trace
from .tracing import LeafSpec


@dataclass(frozen=True)
class NodeCost:
    macs: int
    params: int


@dataclass(frozen=True)
class FlopsReport:
    total_macs: int
    total_params: int
    per_node: dict[str, NodeCost]  # fx node name -> its MACs and the parameters it owns (first use)


def flops(
    model: nn.Module | ChannelGraph,
    example_inputs: torch.Tensor | tuple | list | None = None,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
) -> FlopsReport:
    """MACs and parameters of `model` on `example_inputs` (or of an already traced `ChannelGraph`)."""
    g = model if isinstance(model, ChannelGraph) else trace(model, example_inputs, leaf_modules=leaf_modules)
    macs = g.node_macs()
    owned: dict[str, int] = {}
    seen: set[str] = set()
    params = g.program_parameters()
    for node in g.graph.nodes:
        if node.op == "call_module":
            names = [f"{node.target}.{n}" for n, _ in g.model.get_submodule(node.target).named_parameters()]
        elif node.op == "get_attr":
            names = [node.target] if node.target in params else []
        else:
            continue
        fresh = [n for n in names if n not in seen]
        seen.update(fresh)
        if fresh:
            owned[node.name] = sum(params[n].numel() for n in fresh)
    per_node = {
        n.name: NodeCost(macs.get(n.name, 0), owned.get(n.name, 0))
        for n in g.graph.nodes
        if n.name in macs or n.name in owned
    }
    return FlopsReport(g.macs(), g.params(), per_node)
