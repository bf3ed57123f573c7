"""Global channel ranking and MACs-targeted mask selection (ResRep's mask schedule).

Every round starts from the full widths (masks are recomputed from all-ones, so a channel masked
earlier can come back). All channels of all candidate groups are ranked together by score,
ascending (ties broken by group position, then channel index, so every process computes the same
masks). Walking that list, a channel is masked unless its group would fall below its minimum width;
skipped channels do not consume the round's budget. The walk stops when the MACs model says the
widths meet the target, or when ``budget`` channels have been masked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def channel_scores(size: int, rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Score of each channel of a group of ``size`` channels from its compactors' row norms.

    ``rows`` holds ``(channels, norms)`` per compactor: ``norms[k]`` is ‖Q_r‖₂ of the compactor row
    that writes group channel ``channels[k]``. A channel written by n compactors scores
    s_j = sqrt(mean_n ‖Q^n_j‖²), the root-mean-square of its rows: one compactor gives its row norm,
    and coupled groups stay on the scale of single ones, so one global ranking compares them.
    Returned in float64 on the CPU.
    """
    total = torch.zeros(size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    for channels, norms in rows:
        channels = torch.as_tensor(channels, dtype=torch.long).cpu()
        total.index_add_(0, channels, norms.detach().to("cpu", torch.float64).square())
        count.index_add_(0, channels, torch.ones(channels.numel(), dtype=torch.float64))
    if bool((count == 0).any()):
        missing = (count == 0).nonzero().flatten().tolist()
        raise ValueError(f"channels {missing[:8]} of a {size}-channel group have no compactor row")
    return (total / count).sqrt()


def global_order(scores: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """All ``(group position, channel)`` pairs sorted by ascending score, ties by position."""
    flat = torch.cat([s.detach().to("cpu", torch.float64).flatten() for s in scores]) if scores else torch.zeros(0)
    owner = [(g, c) for g, s in enumerate(scores) for c in range(s.numel())]
    order = torch.sort(flat, stable=True).indices.tolist()
    return [owner[i] for i in order]


def mask_budget(num_masked: int, current_macs: int, target_macs: float, granularity: int) -> int | None:
    """Channels the next round may mask: ``num_masked + granularity`` while the current MACs are
    above the target, unlimited (``None``) once it is met."""
    return num_masked + granularity if current_macs > target_macs else None


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
