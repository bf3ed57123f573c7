"""`SFPConfig`: the knobs of Soft Filter Pruning and of its consistent-representation variant CR-SFP.

SFP zeroes, in every pruned channel group of `reparam.graph`, the ``prune_ratio`` share of channels whose
filters score lowest (``criterion``), once before training and after every epoch, and lets them regrow in
between (their weights keep their gradient); only the conv/linear filters are zeroed, the norm after them
is not. ``method="cr-sfp"`` trains the pruned network (P-NN: the filters times the mask, which also masks
their gradient, and its own head) and the unpruned one (R-NN: the raw filters and a second head) together
on two independently augmented views of every image, with ``CE + CE + alpha · ½ [KL(sg(p_R) ‖ p_P) +
KL(sg(p_P) ‖ p_R)]``; the P-NN is what is deployed. The norms' statistics are shared (both passes update
them).

The exported model is narrow: the zeroed channels are removed with `reparam.graph.prune` and what they
still emit (their norm's shift through the activation: a constant per channel) is folded into the bias
of every layer that reads them; `apps.sfp.export` says where that fold is not exact (a padded k > 1
consumer sees the constant only partly at the borders) with the measured error.

Defaults: the spec's 30% per layer, L2 norms, the published layer sets (``mode="paper"``: only groups
with one producer, the layers inside residual blocks, which is what the published small models narrow;
``"residual"`` also zeroes residual-coupled channels together so the streams narrow too), SGD with
Nesterov momentum 0.9 and weight decay 5e-4 (the CIFAR recipe) at lr 0.01 (the recipe's rate for a
pretrained start). ``flops_target`` replaces the ratio by the one (shared by every pruned group) that
brings the exported model to that fraction of the MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Variant = Literal["sfp", "cr-sfp"]
Criterion = Literal["l2", "fpgm", "taylor"]
Mode = Literal["paper", "residual"]


@dataclass(frozen=True)
class SFPConfig:
    """Hyper-parameters of SFP / CR-SFP (see the module docstring)."""

    method: Variant = "sfp"
    """``sfp``: one network, soft zeroing; ``cr-sfp``: the pruned and the unpruned network trained together."""
    prune_ratio: float = 0.3
    """Share of every pruned group's channels zeroed, in [0, 1): the spec's P (30%); unused with flops_target."""
    flops_target: float = 0.0
    """If > 0: the fraction of the original MACs the exported model keeps, in (0, 1); the prune ratio is then
    the one (the same for every pruned group) that reaches it."""
    criterion: Criterion = "l2"
    """How filters are ranked: ``l2`` (filter norm), ``fpgm`` (summed distance to the group's other filters:
    the most replaceable go), ``taylor`` (Σ|w · ∂L/∂w| of the last gradient; needs one before any zeroing)."""
    mode: Mode = "paper"
    """``paper``: groups with one producer (inside residual blocks); ``residual``: every prunable group,
    residual-coupled channels zeroed and removed together."""
    prune_stem: bool | None = None
    """Also prune groups that the stem (the layer reading the input) produces. None: the variant's (the
    spec's SFP does, its CR-SFP does not)."""
    skip: str = "*downsample*,*shortcut*"
    """Comma-separated fnmatch patterns of module names never zeroed; a group one of them produces stays at
    full width (the spec skips downsample convs)."""
    zero_before_training: bool = True
    """Zero the lowest-ranked filters once before the first step (the spec's schedule)."""
    rerank_at_end: bool | None = None
    """Re-rank at the zeroing after the last epoch too (the spec's schedule); off, that zeroing keeps the
    masks the last epoch trained with, so CR-SFP deploys exactly the P-NN it trained. None: on for sfp
    (its final ranking picks the regrown filters: 57.8% against 38.9% off, ResNet-20, 1 epoch), off for
    cr-sfp (77.3% against 53.2% on, same run up to that zeroing; benchmarks/RESULTS.md §1.6)."""
    alpha: float = 1.0
    """CR-SFP: weight of the bidirectional KL between the two networks' predictions."""
    lr: float = 0.01
    """Base learning rate (a cosine to 0 over the run)."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    weight_decay: float = 5e-4
    """L2 on every parameter (the spec's recipes decay all of them)."""
    num_at_least: int = 1
    """Channels every pruned group keeps at least."""
    export_tolerance: float = 1e-5
    """Largest relative error between the masked P-NN and the exported narrow model that counts as exact."""
    on_inexact: Literal["raise", "warn"] = "warn"
    """When the export is not exact to export_tolerance (a fold at padded borders): ``warn`` or ``raise``."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("method", ("sfp", "cr-sfp")),
            ("criterion", ("l2", "fpgm", "taylor")),
            ("mode", ("paper", "residual")),
            ("on_inexact", ("raise", "warn")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (isinstance(self.prune_ratio, (int, float)) and 0.0 <= self.prune_ratio < 1.0):
            raise ValueError(f"prune_ratio must lie in [0, 1) (the share of channels zeroed), got {self.prune_ratio!r}")
        if not (isinstance(self.flops_target, (int, float)) and 0.0 <= self.flops_target < 1.0):
            raise ValueError(
                f"flops_target must lie in (0, 1) (the fraction of the MACs kept), or be 0 to use prune_ratio; "
                f"got {self.flops_target!r}"
            )
        for name in ("alpha", "lr", "weight_decay", "export_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(f"momentum must lie in (0, 1) (Nesterov needs some), got {self.momentum!r}")
        if not isinstance(self.num_at_least, int) or self.num_at_least < 1:
            raise ValueError(f"num_at_least must be a positive integer, got {self.num_at_least!r}")

    @property
    def rerank_last(self) -> bool:
        """`rerank_at_end` resolved for the variant."""
        return self.method == "sfp" if self.rerank_at_end is None else bool(self.rerank_at_end)

    @property
    def prunes_stem(self) -> bool:
        """`prune_stem` resolved for the variant."""
        return self.method == "sfp" if self.prune_stem is None else bool(self.prune_stem)

    @property
    def skip_patterns(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.skip.split(",") if p.strip())
