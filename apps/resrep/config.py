"""`ResRepConfig`: every knob of ResRep, with the published recipe as defaults.

Defaults follow the ResRep training recipe (ResNet-56 / CIFAR-10 operating point):

* optimizer groups: SGD, base ``lr`` 0.01, ``momentum`` 0.9, ``weight_decay`` 1e-4 on conv/linear
  kernels, no decay on norm weights, biases at ``bias_lr_factor`` x lr, compactors with
  ``compactor_momentum`` 0.99 and no decay;
* gradient rule: group-lasso strength ``lasso_strength`` 1e-4 on every compactor row;
* mask schedule: masks stay all-ones for ``before_mask_iters`` iterations (``None`` = 5 epochs of
  iterations, resolved from ``iters_per_epoch`` given to `ResRep`), then a global re-selection every
  ``mask_interval`` 200 iterations that masks at most ``begin_granularity`` 4 more channels per round
  until the MACs reach ``flops_target`` 0.471 of the original; no group goes below ``num_at_least`` 1;
* ``mask_stop_iters`` None: masks are re-selected until the end, as in the published recipe. A short
  run should stop re-selecting well before its end (e.g. at half of its iterations) so that the
  rows masked last have time to decay before the conversion removes them;
* conversion: masked compactor rows are expected to have decayed below ``threshold`` 1e-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Mode = Literal["residual", "paper"]


@dataclass(frozen=True)
class ResRepConfig:
    """Hyper-parameters of ResRep.

    ``flops_target`` is the fraction of the original MACs to *keep* (0.471 = 52.9% reduction).
    ``mode="residual"`` puts compactors on every prunable channel group, residual-coupled ones
    included (stem, projection shortcuts, last conv of each block); ``mode="paper"`` restricts them
    to groups with a single producer (the internal layers of residual blocks), as in the paper.
    ``verify_tolerance`` bounds the conversion's max error relative to max|y| (``None``: 1e-10 for
    float64 models, 1e-5 otherwise); ``on_inexact`` says whether a larger error raises or warns.
    ``round_to`` makes every group's kept width a multiple of it (e.g. 8, so that MAC savings become
    latency savings on vectorised kernels); 1, the paper's setting, keeps any width.
    """

    flops_target: float = 0.471
    lasso_strength: float = 1e-4
    mask_interval: int = 200
    before_mask_iters: int | None = None
    before_mask_epochs: int = 5
    mask_stop_iters: int | None = None
    begin_granularity: int = 4
    num_at_least: int = 1
    compactor_momentum: float = 0.99
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    mode: Mode = "residual"
    threshold: float = 1e-5
    verify_tolerance: float | None = None
    on_inexact: Literal["raise", "warn"] = "raise"
    round_to: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.flops_target, (int, float)) and 0.0 < self.flops_target < 1.0):
            raise ValueError(
                f"flops_target must lie in (0, 1) (the fraction of the original MACs to keep), "
                f"got {self.flops_target!r}; e.g. 0.471 keeps 47.1% (a 52.9% reduction)")
        if self.mode not in ("residual", "paper"):
            raise ValueError(f"mode must be 'residual' or 'paper', got {self.mode!r}")
        if self.on_inexact not in ("raise", "warn"):
            raise ValueError(f"on_inexact must be 'raise' or 'warn', got {self.on_inexact!r}")
        for name in ("mask_interval", "begin_granularity", "num_at_least", "before_mask_epochs", "round_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "before_mask_epochs" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.mask_stop_iters is not None and (
                not isinstance(self.mask_stop_iters, int) or self.mask_stop_iters < 0):
            raise ValueError(f"mask_stop_iters must be None or an integer >= 0, got {self.mask_stop_iters!r}")
        if self.before_mask_iters is not None and (
                not isinstance(self.before_mask_iters, int) or self.before_mask_iters < 0):
            raise ValueError(f"before_mask_iters must be None or an integer >= 0, got {self.before_mask_iters!r}")
        for name in ("lasso_strength", "lr", "momentum", "weight_decay", "bias_lr_factor",
                     "compactor_momentum", "threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def mask_start(self, iters_per_epoch: int | None) -> int:
        """Iterations before the first mask update: ``before_mask_iters``, else
        ``before_mask_epochs * iters_per_epoch``."""
        if self.before_mask_iters is not None:
            return self.before_mask_iters
        if iters_per_epoch is None or iters_per_epoch < 1:
            raise ValueError(
                "ResRepConfig.before_mask_iters is None (= before_mask_epochs epochs), so ResRep needs "
                "iters_per_epoch: pass ResRep(..., iters_per_epoch=len(train_loader)) or set before_mask_iters")
        return self.before_mask_epochs * iters_per_epoch

    def is_mask_update(self, iteration: int, iters_per_epoch: int | None) -> bool:
        """Whether a mask update runs after ``iteration``: ``iteration - start`` is a positive
        multiple of ``mask_interval``."""
        elapsed = iteration - self.mask_start(iters_per_epoch)
        if self.mask_stop_iters is not None and iteration > self.mask_stop_iters:
            return False
        return elapsed > 0 and elapsed % self.mask_interval == 0
