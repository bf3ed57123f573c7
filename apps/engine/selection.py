"""Global channel ranking and MACs-targeted selection, shared by the pruning methods.

All channels of all candidate groups are ranked together by score, ascending (ties broken by group
position, then channel index, so every process computes the same selection). Walking that list, a channel
is taken unless its group would fall below its minimum width; skipped channels do not consume the budget.
The walk stops when the MACs model says the widths meet the target, or when ``budget`` channels are taken.
A channel whose removal takes a large bite of MACs (a wide residual stream) can carry that walk well below
the target; ``fill_to_target`` then gives back the dearest removed channels that still fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["fill_to_target", "global_order", "select_masks"]


def global_order(scores: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """All ``(group position, channel)`` pairs sorted by ascending score, ties by position."""
    flat = torch.cat([s.detach().to("cpu", torch.float64).flatten() for s in scores]) if scores else torch.zeros(0)
    owner = [(g, c) for g, s in enumerate(scores) for c in range(s.numel())]
    order = torch.sort(flat, stable=True).indices.tolist()
    return [owner[i] for i in order]


def select_masks(
    scores: Sequence[torch.Tensor],
    *,
    macs: Callable[[Sequence[int]], int],
    target_macs: float,
    min_keep: Sequence[int],
    multiple: Sequence[int] | None = None,
    budget: int | None = None,
) -> list[torch.Tensor]:
    """Keep-masks (``True`` = kept) per group for one selection round.

    ``scores[g]`` ranks the channels of group g; ``macs(widths)`` is the model's MACs at the given
    per-group widths; a group keeps at least ``min_keep[g]`` channels and removes channels in whole
    multiples of ``multiple[g]`` (default 1). Channels are taken in global ascending score order; a
    group's removed count is the largest multiple of ``multiple[g]`` not above the channels taken from
    it. The selection is the shortest prefix of that walk whose widths meet ``target_macs`` (the
    MACs only decrease along it, so it is found by bisection), capped at ``budget`` taken channels.
    """
    sizes = [int(s.numel()) for s in scores]
    multiple = [1] * len(scores) if multiple is None else [int(m) for m in multiple]
    if not (len(min_keep) == len(multiple) == len(scores)):
        raise ValueError("scores, min_keep and multiple need one entry per group")
    taken: list[list[int]] = [[] for _ in scores]
    walk: list[tuple[int, int]] = []  # accepted (group, channel) in order
    for g, c in global_order(scores):
        if budget is not None and len(walk) >= budget:
            break
        removed_if_taken = (len(taken[g]) + 1) // multiple[g] * multiple[g]
        if sizes[g] - removed_if_taken < min_keep[g]:
            continue  # skipped: this group is at its minimum; the budget is not consumed
        taken[g].append(c)
        walk.append((g, c))

    def widths_after(k: int) -> list[int]:
        counts = [0] * len(scores)
        for g, _ in walk[:k]:
            counts[g] += 1
        return [sizes[g] - counts[g] // multiple[g] * multiple[g] for g in range(len(scores))]

    lo, hi = 0, len(walk)  # smallest k in [0, len(walk)] with macs(widths_after(k)) <= target, else len(walk)
    if macs(widths_after(hi)) <= target_macs:
        while lo < hi:
            mid = (lo + hi) // 2
            if macs(widths_after(mid)) <= target_macs:
                hi = mid
            else:
                lo = mid + 1
    widths = widths_after(hi)
    chosen: list[list[int]] = [[] for _ in scores]
    for g, c in walk[:hi]:
        chosen[g].append(c)
    masks = []
    for g, size in enumerate(sizes):
        keep = torch.ones(size, dtype=torch.bool)
        keep[chosen[g][: size - widths[g]]] = False
        masks.append(keep)
    return masks


def fill_to_target(
    widths: Sequence[int],
    scores: Sequence[torch.Tensor],
    *,
    macs: Callable[[Sequence[int]], int],
    target_macs: float,
    multiple: Sequence[int] | None = None,
) -> list[int]:
    """Widths grown back towards ``target_macs`` without crossing it. The channels ``widths`` removes are
    taken as each group's lowest-scored ones; walking them from the highest score down, each group regains
    ``multiple[g]`` channels at a time wherever the MACs still meet the target. Widths that already exceed
    the target come back unchanged."""
    sizes = [int(s.numel()) for s in scores]
    multiple = [1] * len(scores) if multiple is None else [int(m) for m in multiple]
    out = [int(w) for w in widths]
    if macs(out) > target_macs:
        return out
    removed = [
        (float(v), g)
        for g, s in enumerate(scores)
        for v in torch.sort(s.detach().to("cpu", torch.float64).flatten()).values[: sizes[g] - out[g]].tolist()
    ]
    for _, g in sorted(removed, key=lambda r: (-r[0], r[1])):
        grown = out[g] + multiple[g]
        if grown <= sizes[g] and macs([grown if i == g else w for i, w in enumerate(out)]) <= target_macs:
            out[g] = grown
    return out
