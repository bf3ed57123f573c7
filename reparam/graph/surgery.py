"""`prune(model, inputs, keep)`: physically remove channels across whole groups.

Every parameter/buffer dim in a group is sliced with the same element keep-mask, module attributes
(`in_channels`, `num_features`, `groups`, ...) follow, and sizes baked into the traced program
(view/reshape/expand sizes, split sizes, slice bounds, layer-norm shapes) are rewritten. The result is
checked by re-running shape propagation: every node must have exactly the predicted shape.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..ops.slicing import select_axes
from .channel_graph import ChannelGraph, ChannelGroup, trace
from .errors import PruneError
from .plan import next_plan
from .rules import describe, tensor_metas
from .tracing import as_tuple, propagate_shapes

Keep = Mapping[int | ChannelGroup, Sequence[int]]


def validate_keep(graph: ChannelGraph, keep: Keep) -> dict[int, np.ndarray]:
    """Resolve group ids and check every keep-set against its group's constraints."""
    out: dict[int, np.ndarray] = {}
    for key, idx in keep.items():
        gid = key.id if isinstance(key, ChannelGroup) else int(key)
        if not 0 <= gid < len(graph.groups):
            raise PruneError(f"no channel group with id {gid} (the graph has {len(graph.groups)})")
        g = graph.groups[gid]
        sel = np.unique(np.asarray(list(idx), dtype=np.int64))
        if len(sel) != len(idx):
            raise PruneError(f"group {gid}: keep indices repeat")
        if len(sel) == g.size and (len(sel) == 0 or (sel[0] == 0 and sel[-1] == g.size - 1)):
            continue  # unchanged
        if not g.prunable:
            raise PruneError(f"group {gid} ({_who(g)}) cannot be pruned: {g.reason}")
        if len(sel) and (sel[0] < 0 or sel[-1] >= g.size):
            raise PruneError(f"group {gid} ({_who(g)}): keep indices must lie in [0, {g.size})")
        if len(sel) < max(g.min_channels, 1):
            raise PruneError(
                f"group {gid} ({_who(g)}): keeping {len(sel)} channels, at least {max(g.min_channels, 1)} required"
            )
        if len(sel) % g.multiple:
            raise PruneError(
                f"group {gid} ({_who(g)}): keeping {len(sel)} channels, but the count must be "
                f"a multiple of {g.multiple} (round_to={graph.round_to} and grouped layers)"
            )
        out[gid] = sel
    return out


def _who(g: ChannelGroup) -> str:
    return "producers " + ", ".join(p.module for p in g.producers) if g.producers else f"size {g.size}"


def prune(
    model: nn.Module, example_inputs: torch.Tensor | tuple | list, keep: Keep, *, graph: ChannelGraph | None = None
) -> fx.GraphModule:
    """A pruned copy of `model` (the original is untouched) as a `torch.fx.GraphModule` with the same
    module names: group `id` keeps channels `keep[id]` (indices into `range(group.size)`, any order);
    groups not in `keep` are unchanged. Raises `PruneError` for a keep-set that breaks a constraint."""
    inputs = as_tuple(example_inputs)
    g = graph if graph is not None else trace(model, inputs)
    validated = validate_keep(g, keep)
    elem = g.keep_mask(validated)

    def kept(sid: int) -> np.ndarray:
        return g.space_mask(elem, sid)

    c = g.coupler
    new = copy.deepcopy(g.gm)
    with torch.no_grad():
        for name, sids in c.params.items():
            masks = [kept(s) for s in sids]
            if all(m.all() for m in masks):
                continue
            prefix, _, leaf = name.rpartition(".")
            owner = new.get_submodule(prefix) if prefix else new
            old = getattr(owner, leaf)
            t = select_axes(old.detach(), [None if m.all() else np.nonzero(m)[0] for m in masks]).clone()
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
            elif leaf in owner._buffers:
                owner._buffers[leaf] = t
            else:
                setattr(owner, leaf, t)
    for path, fix in c.module_fixups.items():
        fix(new.get_submodule(path), kept)
    nodes = {n.name: n for n in new.graph.nodes}
    for name, fix in c.node_fixups.items():
        fix(nodes[name], kept)
    new.recompile()
    _verify_shapes(g, new, inputs, kept)
    new.meta["reparam.plan"] = next_plan(g, {k: v.tolist() for k, v in validated.items()})
    return new


def _verify_shapes(g: ChannelGraph, new: fx.GraphModule, inputs: tuple, kept: Any) -> None:
    """Every node of the pruned program must have exactly the shape the groups predict."""
    c = g.coupler
    try:
        propagate_shapes(new, new.graph, inputs)
    except Exception as exc:
        raise PruneError(
            f"the pruned program does not run: {exc}. A size is hard-coded where the graph "
            f"could not rewrite it; trace with leaf_modules=... around that code"
        ) from exc
    modules = dict(new.named_modules())
    for n in new.graph.nodes:
        if n.op in ("output", "get_attr"):
            continue
        for i, meta in enumerate(tensor_metas(n)):
            sids = [c.s.index.get((n.name, i, d)) for d in range(len(meta.shape))] if meta is not None else []
            if meta is None or any(s is None for s in sids):
                continue
            want = tuple(int(kept(s).sum()) for s in sids)
            if tuple(meta.shape) != want:
                raise PruneError(
                    f"after pruning, node '{n.name}' ({describe(n, modules) if n.op != 'placeholder' else 'input'}) "
                    f"has shape {tuple(meta.shape)} instead of {want}: a size is computed in a way "
                    f"the graph cannot follow; mark that code a leaf (trace(..., leaf_modules=...))"
                )
