"""`CSGDConfig`: the knobs of Centripetal SGD, with the spec's defaults (ResNet-56 / CIFAR-10 operating point).

C-SGD fixes, per prunable channel group, clusters of channels (k-means on the filters, or even runs of
indices) whose number is the group's target width, then trains every cluster's filters to become
identical: after backward each clustered row's gradient becomes the cluster-mean task gradient plus
``weight_decay`` · W plus ``centripetal_strength`` · (W − cluster center), the center being the
importance-weighted mean (``center``, the default) or the plain mean (the spec's); the norm's γ/β and
biases get ``vector_strength_factor`` · ε, or their own budget ε, and no decay. Identical filters with identical norms emit identical
channels, so all but one per cluster are removed exactly, the consumers summing the removed members'
input slices; a residual-coupled group shares one clustering across all its producers.

The target widths come from ``flops_target`` by ``widths``: fewest clusters where the group's filters are
most alike (``redundancy``: every group's agglomerative merge costs ranked across the network, the default)
or one fraction of every candidate group's width (``uniform``, the spec's "×5/8 of all layers"). The
paper's strength (3e-3) collapses a cluster by a factor
``(1 − lr·(η+ε)/(1 − μ))`` per step under momentum μ, ~1e-3 at lr 0.03: hundreds of epochs to reach float32
precision. A run of N iterations therefore raises ε to what collapses the clusters by ``collapse_factor``
within its first ``collapse_fraction`` (``centripetal_strength=None``, the default); a number fixes ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Clustering = Literal["kmeans", "even"]
Mode = Literal["residual", "paper"]
Widths = Literal["redundancy", "uniform"]
ClusterGradient = Literal["mean", "sum"]
Center = Literal["mean", "importance"]


@dataclass(frozen=True)
class CSGDConfig:
    """Hyper-parameters of Centripetal SGD (see the module docstring)."""

    flops_target: float = 0.391
    """Fraction of the original MACs to keep, in (0, 1): 0.391 is the spec's C-SGD-5/8 operating point on
    ResNet-56 (a 60.9% reduction)."""
    mode: Mode = "residual"
    """``residual``: every prunable group, residual-coupled ones sharing one clustering; ``paper``: only
    groups with one producer (the internal layers of residual blocks)."""
    clustering: Clustering = "kmeans"
    """``kmeans`` (scikit-learn, k-means++, seeded) on the group's filters, or ``even`` (runs of
    consecutive indices, sizes differing by at most 1)."""
    cluster_seed: int = 0
    """Seed of the k-means clustering."""
    widths: Widths = "redundancy"
    """How ``flops_target`` becomes per-group widths. ``redundancy``: per group, the Ward merge heights of
    its filters (the cost of each further merge, relative to the group's RMS filter norm), ranked across
    all groups and taken cheapest first until the MACs meet the target, then the dearest removed channels
    that still fit given back (measured on ResNet-20, 8 epochs: 85.82% against 85.45% for filter L1 norms
    ranked the same way and 85.28% for ``uniform``); ``uniform``: one fraction of every group's width,
    the largest whose MACs meet the target (the spec's per-layer fractions, for reproduction)."""
    cluster_gradient: ClusterGradient = "mean"
    """The task gradient of a clustered row: ``mean``, the cluster-mean gradient (the spec's); ``sum``, the
    cluster's summed gradient, with every consumer column that reads a cluster of k channels at 1/k of its
    gradient. Once a cluster has collapsed, the model then trains exactly as the merged narrow model would
    under the same optimizer, where with ``mean`` a cluster of k learns k times slower in its producers
    and k times faster in the sum of its consumer columns."""
    center: Center = "importance"
    """The point every cluster collapses to: ``importance``, its members' mean weighted by each channel's
    importance a_c = Σ_consumers ‖C[:, c]‖² · mean_producers (γ_c/σ_c)² (the energy of what the channel
    contributes downstream, at the start; the k-means weights its members alike), so the channels that
    matter move least and a dead one (γ = 0) moves onto its cluster's live members (measured on ResNet-20,
    8 epochs, 0.471: 86.31 / 86.38 against 86.06 / 85.64 for the plain mean on seeds 0 / 1); ``mean``,
    the plain mean (the spec's)."""
    lr: float = 0.03
    """Base learning rate of the SGD C-SGD builds."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    weight_decay: float = 1e-4
    """η: L2 on conv/linear kernels, applied inside the centripetal rule on clustered layers."""
    bias_lr_factor: float = 2.0
    """Learning-rate factor of biases and norm parameters."""
    centripetal_strength: float | None = None
    """ε, the pull of every clustered row to its cluster mean (none: the budget rule; the paper: 3e-3)."""
    collapse_fraction: float = 0.3
    """Budget rule: the fraction of the run within which the clusters collapse."""
    collapse_factor: float = 1e-9
    """Budget rule: by how much the within-cluster differences shrink over that fraction."""
    collapse_ramp: float = 2.0
    """Budget rule: ε grows as (t / t_c)² (this power) up to the end t_c of the collapse and stays there, so
    the clusters merge gradually over the collapse instead of in its first few percent (0: constant ε
    from the first step, as the paper)."""
    vector_strength_factor: float = 0.1
    """Factor of a fixed ε on the norm's γ/β and on biases (the paper's 0.1); the budget rule solves their
    own ε instead (`vector_strength`)."""
    spread_every: int = 100
    """Iterations between two records of the within-cluster spread (``spread_log`` in the summary; 0: only
    the per-epoch column of ``log.csv``)."""
    num_at_least: int = 1
    """Clusters every group keeps at least."""
    merge_tolerance: float = 1e-5
    """Largest relative error between the merged model and the trained one that `convert` accepts."""
    on_unconverged: Literal["raise", "warn"] = "raise"
    """What `convert` does when the clusters have not converged that far: ``raise`` or ``warn``."""

    def __post_init__(self) -> None:
        if not (isinstance(self.flops_target, (int, float)) and 0.0 < self.flops_target < 1.0):
            raise ValueError(
                f"flops_target must lie in (0, 1) (the fraction of the original MACs to keep), got {self.flops_target!r}"
            )
        for name, allowed in (
            ("mode", ("residual", "paper")),
            ("clustering", ("kmeans", "even")),
            ("widths", ("redundancy", "uniform")),
            ("center", ("mean", "importance")),
            ("cluster_gradient", ("mean", "sum")),
            ("on_unconverged", ("raise", "warn")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in (
            "lr",
            "weight_decay",
            "bias_lr_factor",
            "centripetal_strength",
            "vector_strength_factor",
            "collapse_ramp",
        ):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not 0.0 < self.collapse_fraction <= 1.0 or not 0.0 < self.collapse_factor < 1.0:
            raise ValueError(
                f"collapse_fraction must lie in (0, 1] and collapse_factor in (0, 1), got "
                f"{self.collapse_fraction!r}, {self.collapse_factor!r}"
            )
        if not isinstance(self.spread_every, int) or self.spread_every < 0:
            raise ValueError(f"spread_every must be an integer >= 0, got {self.spread_every!r}")
        if not isinstance(self.num_at_least, int) or self.num_at_least < 1:
            raise ValueError(f"num_at_least must be a positive integer, got {self.num_at_least!r}")

    def strength(self, total_iters: int | None) -> float:
        """The largest ε of a run of `total_iters` on kernels: the configured one, or the budget rule's:
        the ε whose contraction of the within-cluster differences under this optimizer (SGD, Nesterov
        momentum μ, lr constant while collapsing, see `collapse_rate`), ramped by `ramp`, shrinks them by
        ``collapse_factor`` over ``collapse_fraction`` of the run; at least the paper's 3e-3 and at most
        ``0.05 / lr`` (a step then moves a member at most 5% of the way to its cluster mean, which keeps the
        momentum iteration stable). A run too short for that cap collapses later than planned (at μ = 0.9
        the fastest constant collapse takes ~270 iterations)."""
        if self.centripetal_strength is not None:
            return float(self.centripetal_strength)
        return self._budget_strength(total_iters, self.lr, self.weight_decay)

    def vector_strength(self, total_iters: int | None) -> float:
        """The largest ε of a run on the norm's γ/β and on biases: ``vector_strength_factor`` times a
        configured ε (the paper's rule), or under the budget rule their own solved ε for the same collapse
        at their learning rate (``bias_lr_factor`` x lr, no decay). The factor alone would shrink their
        differences by only ``collapse_factor ** (factor / bias_lr_factor)``-ish over the window, leaving
        the merge to the decaying tail of the run (measured on ResNet-20: spread 0.14 where 1e-9 was
        planned) or to no time at all."""
        if self.centripetal_strength is not None:
            return self.vector_strength_factor * float(self.centripetal_strength)
        return self._budget_strength(total_iters, self.lr * self.bias_lr_factor, 0.0)

    def _budget_strength(self, total_iters: int | None, lr: float, decay: float) -> float:
        """The budget rule's largest ε for rows trained at ``lr`` with L2 ``decay`` inside the rule."""
        if not total_iters:
            return 3e-3
        steps = self.collapse_fraction * total_iters
        needed = math.log(1.0 / self.collapse_factor)
        shape = [((k + 0.5) / 256) ** self.collapse_ramp for k in range(256)]  # midpoints of the ramp
        eta = lr * decay

        def shrink(h_max: float) -> float:  # ln of the total contraction over the collapse
            return steps * sum(collapse_rate(eta + (h_max - eta) * f, self.momentum) for f in shape) / len(shape)

        lo, hi = 0.0, 0.05  # bisect h = lr·(η + ε_max): the contraction is increasing in h on [0, 0.05]
        if shrink(hi) > needed:
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if shrink(mid) < needed else (lo, mid)
        return min(0.05 / lr, max(3e-3, hi / lr - decay))

    def ramp(self, iteration: int, total_iters: int | None) -> float:
        """The fraction of `strength` that step `iteration` (0-based) applies: the budget rule's
        ``min(1, (iteration + 1) / t_c) ** collapse_ramp``; 1 for a fixed ε or an unknown run length."""
        if self.centripetal_strength is not None or not total_iters or self.collapse_ramp == 0:
            return 1.0
        return min(1.0, (iteration + 1) / (self.collapse_fraction * total_iters)) ** self.collapse_ramp


def collapse_rate(h: float, momentum: float) -> float:
    """−ln of the factor by which one step of SGD with Nesterov momentum shrinks a difference ``d`` whose
    gradient is ``a·d`` (the centripetal pull), ``h = lr·a``: the spectral radius of the step's 2×2 map on
    (d, lr·velocity), ``[[1 − h(1+μ), −μ²], [h, μ]]``. Without momentum it is −ln(1 − h); with momentum
    ~h/(1 − μ) for small h, and ~−ln √(μ(1 − h)) once the iteration oscillates."""
    mu = momentum
    trace, det = 1.0 - h * (1.0 + mu) + mu, mu * (1.0 - h)
    disc = trace * trace - 4.0 * det
    radius = (abs(trace) + math.sqrt(disc)) / 2.0 if disc >= 0 else math.sqrt(det)
    return -math.log(radius)
