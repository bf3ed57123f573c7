"""`ResRepConfig`: every knob of ResRep and the two recipes it chooses between.

Two recipes (``recipe``), resolved for a run of N iterations into a `apps.resrep.recipe.Plan`:

* ``"paper"`` — the published recipe, exactly as the spec states it (ResNet-56 / CIFAR-10 operating
  point): SGD, base ``lr`` 0.01, ``momentum`` 0.9, ``weight_decay`` 1e-4 on conv/linear kernels, no decay
  on norm weights, biases at 2 x lr, compactors with momentum 0.99 and no decay; group lasso
  ``lasso_strength`` 1e-4 on *every* compactor row (masked rows feel only it); masks all-ones for
  ``before_mask_iters`` iterations (``None`` = ``before_mask_epochs`` 5 epochs), then a global
  re-selection of compactor-row norms every ``mask_interval`` 200 iterations masking at most
  ``begin_granularity`` 4 more channels per round until the MACs reach ``flops_target``; masks may be
  re-selected until ``mask_stop_iters`` (``None``: the end). Masked rows decay by the lasso alone.
* ``"budget"`` — ours, for runs far shorter than the paper's 480 epochs. Remembering and forgetting are
  decoupled in strength as well as in gradient:

  - kept rows feel at most the paper's ``lasso_strength`` (1e-4), none on residual-coupled groups
    (``residual_lasso`` False), and no penalty at all once the masks are frozen;
  - the kept rows of residual-coupled compactors get no task gradient either
    (``train_residual_compactors`` False): they stay identity rows, so the residual streams the
    classifier reads are only ever cut, never rescaled (the paper recipe trains them);
  - a masked row gets no task gradient and no penalty; it is *written*, not stepped: from the round that
    masks it, it fades linearly to exactly 0 over ``freeze - mask_end`` iterations (its momentum entries
    are cleared when the optimizer is known), so every removed row is exactly zero at the freeze and the
    conversion is exact by construction;
  - channels are ranked by ``score`` (default ``"taylor"``: the first-order loss change of removing the
    channel, |Σ_i Q_ji ∂L/∂Q_ji| squared and averaged over iterations with momentum ``score_momentum``
    0.95, or with ``score_round_average`` over at least the iterations between two rounds (measured
    worse at 30 epochs, so off); ``"fused"``: the norm of the fused filter row (Q·diag(γ/σ)·W)_j;
    ``"norm"``: the paper's raw compactor-row norm), divided by the MACs one channel of its group costs
    (``score_per_mac``), one global MACs-targeted ranking; the magnitude scores, which share no unit
    across layers, are first divided by their group's mean
    (``score_normalize`` None: for ``fused`` and ``norm``, not for ``taylor``, a loss change);
  - masking is cumulative and front-loaded: ``mask_rounds`` 20 rounds between ``mask_start_fraction``
    0.02 and ``mask_end_fraction`` 0.25 of the run, the kept MACs following a cubic from 1 to
    ``flops_target`` (most channels go early), the last round meeting the target exactly;
  - masks frozen at ``freeze_fraction`` 0.30 of the run; the rest is fine-tuning with every penalty off,
    the lr constant until the freeze and a cosine to 0 after it;
  - compactor momentum 0.9 and bias lr factor 1.

* ``"auto"`` (default) — ``"paper"`` when the run is long enough for the paper's own timeline (lasso
  warm-up, 4 channels per 200 iterations, ~(1-0.99)/(lr·λ) iterations for a masked row to decay) to fit
  in the first ``freeze_fraction`` of it, ``"budget"`` otherwise; ``auto_switch_iters`` overrides that
  switch point. ``bias_lr_factor``, ``compactor_momentum``, ``residual_lasso``,
  ``train_residual_compactors`` and ``score`` left at ``None`` take the chosen recipe's value.

Both recipes must end at or below ``flops_target``; `ResRep.check_target` says by how much a run
missed it and what to change. Conversion: ``threshold`` 1e-5 is the largest removed-row norm that counts
as decayed; ``verify_tolerance`` (``None``: 1e-10) bounds the converted model's error, checked in float64 whatever the
training dtype; ``round_to`` makes kept widths multiples of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Mode = Literal["residual", "paper"]
Recipe = Literal["auto", "paper", "budget"]
Score = Literal["taylor", "fused", "norm"]


@dataclass(frozen=True)
class ResRepConfig:
    """Hyper-parameters of ResRep (see the module docstring for what each recipe does).

    ``flops_target`` is the fraction of the original MACs to *keep* (0.471 = 52.9% reduction).
    ``mode="residual"`` puts compactors on every prunable channel group, residual-coupled ones
    included (stem, projection shortcuts, last conv of each block); ``mode="paper"`` restricts them
    to groups with a single producer (the internal layers of residual blocks), as in the paper.
    """

    flops_target: float = 0.471
    """Fraction of the original MACs to keep, in (0, 1): 0.471 is a 52.9% reduction."""
    recipe: Recipe = "auto"
    """``auto`` (paper when the run is long enough for its timeline, else budget), ``paper`` (the published recipe) or ``budget`` (ours, for short runs)."""
    mode: Mode = "residual"
    """``residual``: compactors on every prunable channel group, residual-coupled ones included; ``paper``: only groups with one producer (the internal layers of residual blocks)."""
    lr: float = 0.01
    """Base learning rate of the SGD ResRep builds."""
    momentum: float = 0.9
    """SGD momentum of everything but the compactors."""
    weight_decay: float = 1e-4
    """L2 on conv/linear kernels (not on norm weights, biases or compactors)."""
    bias_lr_factor: float | None = None
    """Learning-rate factor of biases (none: the recipe's, 2 paper / 1 budget)."""
    compactor_momentum: float | None = None
    """SGD momentum of the compactors (none: the recipe's, 0.99 paper / 0.9 budget)."""
    lasso_strength: float = 1e-4
    """Group-lasso strength on kept compactor rows (the paper's 1e-4)."""
    residual_lasso: bool | None = None
    """Lasso on residual-coupled compactors too (none: the recipe's, yes paper / no budget)."""
    train_residual_compactors: bool | None = None
    """Task gradient on kept rows of residual-coupled compactors (none: the recipe's, yes paper / no budget)."""
    # the paper recipe's schedule
    mask_interval: int = 200
    """Paper recipe: iterations between mask re-selections."""
    before_mask_iters: int | None = None
    """Paper recipe: iterations of lasso before the first mask (none: before_mask_epochs epochs)."""
    before_mask_epochs: int = 5
    """Paper recipe: epochs of lasso before the first mask when before_mask_iters is none."""
    mask_stop_iters: int | None = None
    """Paper recipe: last iteration that may re-select masks (none: the end of the run)."""
    begin_granularity: int = 4
    """Paper recipe: most channels masked per round."""
    # the budget recipe's schedule
    score: Score | None = None
    """Channel score: ``taylor`` (first-order loss change), ``fused`` (fused filter-row norm) or ``norm`` (raw compactor-row norm); none: the recipe's (paper norm, budget taylor)."""
    score_momentum: float = 0.95
    """Running-average factor of the Taylor score (its horizon: 1/(1 - score_momentum) iterations)."""
    score_round_average: bool = False
    """Taylor score: lengthen the average's horizon to the iterations between two mask rounds where that is longer than 1/(1 - score_momentum)."""
    score_normalize: bool | None = None
    """Budget recipe: divide scores by their group's mean (none: for fused and norm, not for taylor)."""
    score_per_mac: bool = True
    """Budget recipe: divide each score by the MACs one channel of its group costs."""
    mask_rounds: int = 20
    """Budget recipe: rounds of cumulative masking."""
    mask_start_fraction: float = 0.02
    """Budget recipe: fraction of the run at the first mask round."""
    mask_end_fraction: float = 0.25
    """Budget recipe: fraction of the run at the last mask round (the target reached)."""
    freeze_fraction: float = 0.30
    """Budget recipe: fraction of the run at which masks freeze and masked rows are exactly 0; the rest fine-tunes."""
    auto_switch_iters: int | None = None
    """Total iterations from which auto picks the paper recipe (none: when the paper's timeline fits before the freeze)."""
    # both
    num_at_least: int = 1
    """Channels every group keeps at least."""
    threshold: float = 1e-5
    """Largest removed compactor-row norm that counts as decayed at conversion."""
    verify_tolerance: float | None = None
    """Bound on the converted model's relative error, checked in float64 (none: 1e-10)."""
    on_inexact: Literal["raise", "warn"] = "raise"
    """What an inexact conversion does: ``raise`` or ``warn``."""
    round_to: int = 1
    """Kept widths are multiples of this."""

    def __post_init__(self) -> None:
        if not (isinstance(self.flops_target, (int, float)) and 0.0 < self.flops_target < 1.0):
            raise ValueError(
                f"flops_target must lie in (0, 1) (the fraction of the original MACs to keep), "
                f"got {self.flops_target!r}; e.g. 0.471 keeps 47.1% (a 52.9% reduction)"
            )
        for name, allowed in (
            ("mode", ("residual", "paper")),
            ("recipe", ("auto", "paper", "budget")),
            ("on_inexact", ("raise", "warn")),
            ("score", (None, "taylor", "fused", "norm")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in (
            "mask_interval",
            "begin_granularity",
            "num_at_least",
            "before_mask_epochs",
            "round_to",
            "mask_rounds",
        ):
            value, least = getattr(self, name), 0 if name == "before_mask_epochs" else 1
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("mask_stop_iters", "before_mask_iters", "auto_switch_iters"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
        for name in (
            "lasso_strength",
            "lr",
            "momentum",
            "weight_decay",
            "bias_lr_factor",
            "compactor_momentum",
            "threshold",
            "verify_tolerance",
        ):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("score_momentum", "compactor_momentum"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
        fractions = (self.mask_start_fraction, self.mask_end_fraction, self.freeze_fraction)
        if not (0.0 <= fractions[0] < fractions[1] < fractions[2] <= 1.0):
            raise ValueError(
                "the budget schedule needs 0 <= mask_start_fraction < mask_end_fraction < freeze_fraction <= 1, "
                f"got {fractions}"
            )

    def mask_start(self, iters_per_epoch: int | None) -> int:
        """Paper recipe: iterations before the first mask update: ``before_mask_iters``, else
        ``before_mask_epochs * iters_per_epoch``."""
        if self.before_mask_iters is not None:
            return self.before_mask_iters
        if iters_per_epoch is None or iters_per_epoch < 1:
            raise ValueError(
                "ResRepConfig.before_mask_iters is None (= before_mask_epochs epochs), so the paper recipe needs "
                "iters_per_epoch: pass ResRep(..., iters_per_epoch=len(train_loader)) or set before_mask_iters"
            )
        return self.before_mask_epochs * iters_per_epoch

    def is_mask_update(self, iteration: int, iters_per_epoch: int | None) -> bool:
        """Paper recipe: whether a mask update runs after ``iteration``: ``iteration - start`` is a
        positive multiple of ``mask_interval`` (and ``iteration`` is not past ``mask_stop_iters``)."""
        elapsed = iteration - self.mask_start(iters_per_epoch)
        if self.mask_stop_iters is not None and iteration > self.mask_stop_iters:
            return False
        return elapsed > 0 and elapsed % self.mask_interval == 0
