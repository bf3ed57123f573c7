"""Dead channels: a BatchNorm channel with gamma = 0 outputs the constant beta whatever its input.

Such a channel can be removed exactly when the constant reaches its consumers unchanged in space,
i.e. through channel-wise ops only (checked by probing each op), into the channel inputs of linear
layers or unpadded convolutions: each output then
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


def _channel_local(node: fx.Node, like: torch.Tensor, modules: dict[str, nn.Module]) -> bool:
    """Whether the one-input op at ``node`` maps every channel (dim 1) of a tensor shaped like ``like``
    on its own and keeps the shape: new values in the even channels must leave the odd channels'
    outputs as they were (a softmax or a local response norm over channels does not)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    y = x.clone()
    y[:, ::2] = torch.randn(y[:, ::2].shape, generator=gen, dtype=like.dtype).to(like.device)
    with torch.no_grad():
        fx_, fy = _apply_unary(node, x, modules), _apply_unary(node, y, modules)
    return fx_.shape == x.shape and bool(torch.equal(fx_[:, 1::2], fy[:, 1::2]))


def _consumers(
    graph: ChannelGraph, grp: ChannelGroup, bn_node: fx.Node, value: torch.Tensor
) -> list[tuple[str, torch.Tensor]] | str:
    """(consumer module, constant it receives per channel) for every path of channel-wise ops from the
    BatchNorm, or the reason folding is not exact. ``value`` is the BatchNorm's output for one example
    (its full shape: ops that mix positions see them)."""
    modules = graph.coupler.modules
    reads = {m.name.rpartition(".")[0] for m in grp.members if m.name.endswith(".weight") and m.dim == 1}
    calls: dict[str, int] = {}
    for n in graph.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    out: list[tuple[str, torch.Tensor]] = []
    todo = [(bn_node, value)]
    while todo:
        node, value = todo.pop()
        for user in node.users:
            if user.op == "call_module" and _foldable(modules[user.target]) and user.target in reads:
                if calls[user.target] > 1:
                    return f"consumer '{user.target}' is called more than once, so one bias cannot hold the constant"
                per_channel = value[0].reshape(value.shape[1], -1)
                if not bool((per_channel == per_channel[:, :1]).all()):
                    return f"the constant varies in space where it reaches '{user.target}', so no bias holds it"
                out.append((user.target, per_channel[:, 0]))
            elif (
                user.op != "output"
                and lookup_rule(user, modules) is rule_unary
                and len(graph.coupler.tensor_inputs(user)) == 1
                and _channel_local(user, value, modules)
            ):
                with torch.no_grad():
                    todo.append((user, _apply_unary(user, value, modules)))
            else:
                what = "the model output" if user.op == "output" else describe(user, modules)
                return (
                    f"the constant reaches {what} at node '{user.name}', where it is not a bias "
                    f"(only channel-wise ops into the channel inputs of linear layers or unpadded "
                    "convolutions fold exactly)"
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
    bn_node = next((n for n in nodes.values() if n.op == "call_module" and n.target == p.norm), None)
    if bn_node is None:
        return (
            f"BatchNorm '{p.norm}' is not called as a module in the traced graph, so its output has no node to follow"
        )
    shape = (1, *bn_node.meta["tensor_meta"].shape[1:])
    beta = bn.bias.detach()
    is_dead = torch.zeros(len(beta), dtype=torch.bool, device=beta.device)
    is_dead[torch.as_tensor(p.member.positions[np.isin(p.member.channels, dead)])] = True
    found = _consumers(g, grp, bn_node, beta.reshape(1, -1, *([1] * (len(shape) - 2))).expand(shape).clone())
    if isinstance(found, str):
        return found
    with torch.no_grad():
        for name, value in found:
            m = work.get_submodule(name)
            v = torch.where(is_dead, value, torch.zeros_like(value)).to(m.weight.dtype)  # live channels stay inputs
            geometry = None if isinstance(m, nn.Linear) else geometry_from_module(m)
            bias = propagate_bias(m.weight.detach(), None if m.bias is None else m.bias.detach(), v, geometry)
            m.bias = nn.Parameter(bias)
    return None
