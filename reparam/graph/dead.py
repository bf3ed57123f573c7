"""Dead channels: a BatchNorm channel with gamma = 0 outputs the constant beta whatever its input.

Such a channel can be removed exactly when the constant reaches its consumers unchanged in space,
i.e. through elementwise ops only, into linear layers or unpadded convolutions: each output then
receives the same constant contribution `sum_k W[o, c, k] * f(beta_c)`, which moves into the
consumer's bias. A padded consumer sees zeros at the borders instead, so the channel is not constant
there and folding is refused, as it is for groups fed by several producers or by training-mode BN.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from ..ops.modules import geometry_from_module
from ..ops.norm import propagate_bias
from .channel_graph import ChannelGraph, ChannelGroup, trace
from .rules import describe, lookup_rule, rule_unary
from .surgery import prune
from .tracing import as_tuple


@dataclass(frozen=True)
class DeadChannelReport:
    model: nn.Module  # pruned copy with the constants folded into consumer biases
    removed: dict[int, list[int]]  # group id -> removed (dead) channels
    refused: dict[int, str]  # group id -> why its dead channels were kept


def _foldable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1:
        pad = m.padding if not isinstance(m.padding, str) else (0,) if m.padding == "valid" else (1,)
        return all(p == 0 for p in pad)
    return False


def _apply_unary(node: fx.Node, t: torch.Tensor, modules: dict[str, nn.Module]) -> torch.Tensor:
    rest, kwargs = node.args[1:], node.kwargs
    if node.op == "call_module":
        return modules[node.target](t)
    if node.op == "call_function":
        return node.target(t, *rest, **kwargs)
    return getattr(t, node.target)(*rest, **kwargs)


def _consumers(graph: ChannelGraph, bn_node: fx.Node, beta: torch.Tensor) -> list[tuple[str, torch.Tensor]] | str:
    """(consumer module, constant it receives per channel) for every path of elementwise ops from the
    BatchNorm, or the reason folding is not exact."""
    modules = graph.coupler.modules
    calls: dict[str, int] = {}
    for n in graph.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    out: list[tuple[str, torch.Tensor]] = []
    todo = [(bn_node, beta)]
    while todo:
        node, value = todo.pop()
        for user in node.users:
            if user.op == "call_module" and _foldable(modules[user.target]):
                if calls[user.target] > 1:
                    return f"consumer '{user.target}' is called more than once, so one bias cannot hold the constant"
                out.append((user.target, value))
            elif (
                user.op != "output"
                and lookup_rule(user, modules) is rule_unary
                and len(graph.coupler.tensor_inputs(user)) == 1
            ):
                with torch.no_grad():
                    todo.append((user, _apply_unary(user, value, modules)))
            else:
                what = "the model output" if user.op == "output" else describe(user, modules)
                return (
                    f"the constant reaches {what} at node '{user.name}', where it is not a bias "
                    f"(only elementwise ops into linear layers or unpadded convolutions fold exactly)"
                )
    return out


def fold_dead_channels(
    model: nn.Module, example_inputs: torch.Tensor | Sequence, *, graph: ChannelGraph | None = None
) -> DeadChannelReport:
    """Remove every BatchNorm-silenced (gamma == 0) channel whose constant output can be folded exactly
    into its consumers' biases; report the groups where it cannot."""
    inputs = as_tuple(example_inputs)
    g = graph if graph is not None else trace(model, inputs)
    modules = g.coupler.modules
    nodes = {n.name: n for n in g.graph.nodes}
    work = copy.deepcopy(model)
    removed: dict[int, list[int]] = {}
    refused: dict[int, str] = {}
    for grp in g.groups:
        dead = _dead_channels(grp, modules)
        if not len(dead):
            continue
        reason = _fold_group(g, grp, dead, nodes, modules, work)
        if reason is None:
            removed[grp.id] = dead.tolist()
        else:
            refused[grp.id] = reason
    if not removed:
        return DeadChannelReport(prune(work, inputs, {}), removed, refused)
    keep = {gid: sorted(set(range(g.groups[gid].size)) - set(d)) for gid, d in removed.items()}
    g2 = trace(work, inputs, leaf_modules=g.leaf_modules, round_to=g.round_to)
    return DeadChannelReport(prune(work, inputs, keep, graph=g2), removed, refused)


def _dead_channels(grp: ChannelGroup, modules: dict[str, nn.Module]) -> np.ndarray:
    if not grp.prunable or not grp.producers or any(p.norm is None for p in grp.producers):
        return np.zeros(0, dtype=np.int64)
    dead = None
    for p in grp.producers:
        bn = modules[p.norm]
        if not bn.affine:
            return np.zeros(0, dtype=np.int64)
        zero = (bn.weight.detach()[torch.as_tensor(p.member.positions)] == 0).cpu().numpy()
        here = set(p.member.channels[zero].tolist())
        dead = here if dead is None else dead & here
    return np.asarray(sorted(dead), dtype=np.int64)


def _fold_group(
    g: ChannelGraph,
    grp: ChannelGroup,
    dead: np.ndarray,
    nodes: dict[str, fx.Node],
    modules: dict[str, nn.Module],
    work: nn.Module,
) -> str | None:
    if len(grp.producers) > 1:
        return "several producers feed this group, so constants meet other values in an add"
    keep_n = grp.size - len(dead)
    if keep_n < max(grp.min_channels, 1) or keep_n % grp.multiple:
        return f"keeping {keep_n} channels breaks the group's constraints (multiple of {grp.multiple})"
    p = grp.producers[0]
    bn = modules[p.norm]
    if bn.training:
        return f"BatchNorm '{p.norm}' is in training mode (it normalises with batch statistics)"
    bn_node = next(n for n in nodes.values() if n.op == "call_module" and n.target == p.norm)
    rank = len(bn_node.meta["tensor_meta"].shape)
    beta = bn.bias.detach().clone()
    is_dead = torch.zeros(len(beta), dtype=beta.dtype, device=beta.device)
    is_dead[torch.as_tensor(p.member.positions[np.isin(p.member.channels, dead)])] = 1
    found = _consumers(g, bn_node, beta.reshape(1, -1, *([1] * (rank - 2))))
    if isinstance(found, str):
        return found
    with torch.no_grad():
        for name, value in found:
            m = work.get_submodule(name)
            v = (value.reshape(-1) * is_dead).to(m.weight.dtype)  # live channels stay inputs
            geometry = None if isinstance(m, nn.Linear) else geometry_from_module(m)
            bias = propagate_bias(m.weight.detach(), None if m.bias is None else m.bias.detach(), v, geometry)
            m.bias = nn.Parameter(bias)
    return None
