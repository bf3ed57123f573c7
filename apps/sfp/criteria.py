"""How SFP ranks the channels of a group: pure functions of the producers' filter rows (low score: zeroed).

Every function takes ``blocks``, one ``(rows, channels)`` pair per producer of the group: ``rows`` the
producer's filter rows (P, D) that hold group channels and ``channels`` the group channel of each row
(a channel may own several rows, and a residual-coupled channel one row in every producer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fpgm_scores", "l2_scores", "taylor_scores"]

Blocks = Sequence[tuple[Tensor, Tensor]]


def _per_channel(values: Blocks, size: int) -> Tensor:
    first = values[0][0]
    out = torch.zeros(size, dtype=torch.float64, device=first.device)
    for v, channels in values:
        out.index_add_(0, channels, v.double())
    return out


def l2_scores(blocks: Blocks, size: int) -> Tensor:
    """The L2 norm of every channel's filters, all its rows in every producer together."""
    return _per_channel(
        [(rows.double().reshape(len(rows), -1).square().sum(1), ch) for rows, ch in blocks], size
    ).sqrt()


def fpgm_scores(blocks: Blocks, size: int) -> Tensor:
    """FPGM's geometric-median criterion: the summed Euclidean distance from each channel's filter vector
    (its rows in every producer side by side) to every other channel's; the channels nearest the
    median, the most replaceable, score lowest."""
    vectors = []
    for rows, channels in blocks:
        flat = rows.double().reshape(len(rows), -1)
        by_channel = torch.zeros(size, flat.shape[1], dtype=torch.float64, device=flat.device)
        vectors.append(by_channel.index_add_(0, channels, flat))
    v = torch.cat(vectors, dim=1)
    return torch.cdist(v[None], v[None])[0].sum(1)


def taylor_scores(blocks: Blocks, grads: Sequence[Tensor], size: int) -> Tensor:
    """The first-order Taylor criterion Σ|w · ∂L/∂w| over each channel's filter entries, from one gradient
    per producer (``grads[i]`` matches ``blocks[i]``'s rows)."""
    return _per_channel(
        [
            (
                (rows.double() * g.double()).abs().reshape(len(rows), -1).sum(1),
                ch,
            )
            for (rows, ch), g in zip(blocks, grads)
        ],
        size,
    )
