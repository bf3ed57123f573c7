"""ResRep's channel scores and per-round mask budget; the selection itself is
`apps.engine.selection.select_masks` (every round of the paper recipe starts from the full widths, so a
channel masked earlier can come back)."""

from __future__ import annotations

from collections.abc import Sequence

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


def mask_budget(num_masked: int, current_macs: int, target_macs: float, granularity: int) -> int | None:
    """Channels the next round may mask: ``num_masked + granularity`` while the current MACs are
    above the target, unlimited (``None``) once it is met."""
    return num_masked + granularity if current_macs > target_macs else None
