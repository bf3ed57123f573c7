"""Which channel groups a pruning method may shrink: a dry run of the surgery before any training."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from torch import Tensor, nn

from reparam.graph import ChannelGraph, ChannelGroup, PruneError, prune

__all__ = ["candidate_groups", "min_keep", "removable_or_why", "widths_for_target"]


def removable_or_why(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    graph: ChannelGraph,
    groups: Sequence[ChannelGroup],
    min_keep: Callable[[ChannelGroup], int],
    method: str,
) -> dict[int, str]:
    """Why each of `groups` that `reparam.graph.prune` cannot shrink (e.g. a size hard-coded in the model's
    code) must stay at full width, found before any training by a dry run that keeps a different fraction
    (30-70%) of every group, so that coupled sizes cannot match by coincidence. Failing groups are found
    by bisection; `method` names the app in the warning that lists them."""

    def keep_count(g: ChannelGroup) -> int:
        fraction = 0.3 + 0.4 * ((g.id * 0.6180339887) % 1.0)
        return max(min_keep(g), int(g.size * fraction) // g.multiple * g.multiple)

    def dry_run(subset: Sequence[ChannelGroup]) -> str | None:
        keep = {g.id: range(keep_count(g)) for g in subset if keep_count(g) < g.size}
        try:
            prune(model, inputs, keep, graph=graph)
        except PruneError as exc:
            return str(exc)
        return None

    failures: dict[int, str] = {}

    def bisect(subset: Sequence[ChannelGroup]) -> None:
        why = dry_run(subset)
        if why is None:
            return
        if len(subset) == 1:
            failures[subset[0].id] = f"reparam.graph.prune cannot remove its channels: {why}"
            return
        found = len(failures)
        bisect(subset[: len(subset) // 2])
        bisect(subset[len(subset) // 2 :])
        if len(failures) == found:  # only the combination fails: keep the whole subset unpruned
            failures.update(
                {
                    g.id: f"reparam.graph.prune cannot remove these channels together with "
                    f"groups {[h.id for h in subset]}: {why}"
                    for g in subset
                }
            )

    if groups:
        bisect(list(groups))
    if failures:
        warnings.warn(
            f"{method} leaves {len(failures)} channel group(s) at full width because the pruned "
            f"program would not run: {next(iter(failures.values()))}",
            RuntimeWarning,
            stacklevel=4,
        )
    return failures


def min_keep(group: ChannelGroup, num_at_least: int) -> int:
    """The fewest channels ``group`` may keep: ``num_at_least`` or the group's own minimum, at most its size."""
    return min(group.size, max(num_at_least, group.min_channels))


def candidate_groups(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    graph: ChannelGraph,
    reason: Callable[[ChannelGroup], str | None],
    min_keep: Callable[[ChannelGroup], int],
    method: str,
) -> tuple[list[ChannelGroup], dict[int, str]]:
    """``(groups, skipped)``: the groups of `graph` a method may shrink — those its own `reason` does not
    rule out and `removable_or_why` finds removable — and why each other group stays at full width."""
    reasons = {g.id: reason(g) for g in graph.groups}
    reasons.update(
        removable_or_why(model, inputs, graph, [g for g in graph.groups if reasons[g.id] is None], min_keep, method)
    )
    return [g for g in graph.groups if reasons[g.id] is None], {gid: r for gid, r in reasons.items() if r is not None}


def widths_for_target(
    sizes: Mapping[int, int],
    minimum: Mapping[int, int],
    multiple: Mapping[int, int],
    macs: Callable[[dict[int, int]], float],
    target: float,
) -> dict[int, int]:
    """Per group, ``ceil(r · size)`` rounded up to its `multiple` (at least its `minimum`), for the largest
    fraction r whose `macs` stay at or below `target` (bisection over r). ValueError if even the
    minimum widths exceed it."""

    def at(r: float) -> dict[int, int]:
        out = {}
        for gid, n in sizes.items():
            m = multiple.get(gid, 1)
            w = max(minimum.get(gid, 1), int(np.ceil(r * n / m)) * m)
            out[gid] = min(n, w)
        return out

    if macs(at(0.0)) > target:
        raise ValueError(
            f"the MACs target {target:.0f} is out of reach: with every group at its minimum width the model has "
            f"{macs(at(0.0)):.0f} MACs"
        )
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if macs(at(mid)) <= target else (low, mid)
    return at(low)
