"""A ResRep recipe resolved for one run: `Plan`, made by `resolve` from a `ResRepConfig` and the run's length.

The plan answers, for every iteration of the run, what ResRep does: whether masks are re-selected (and
to which MACs goal), how strong the penalty on kept rows is, how far a masked row has faded, and the
learning-rate factor. Iterations are 0-based indices of optimizer steps; "after iteration t" is
`ResRep.after_step(t)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .config import ResRepConfig, Score

__all__ = ["Plan", "resolve", "paper_min_iters"]

#: The two recipes' values for the fields a config leaves at None.
RECIPE_DEFAULTS: dict[str, dict[str, object]] = {
    "paper": {
        "bias_lr_factor": 2.0,
        "compactor_momentum": 0.99,
        "residual_lasso": True,
        "train_residual_compactors": True,
        "score": "norm",
    },
    "budget": {
        "bias_lr_factor": 1.0,
        "compactor_momentum": 0.9,
        "residual_lasso": False,
        "train_residual_compactors": False,
        "score": "taylor",
    },
}


def paper_min_iters(config: ResRepConfig, channels_to_mask: int, iters_per_epoch: int | None) -> float:
    """Iterations the paper recipe needs before its masks are final and its masked rows have decayed:
    the lasso warm-up, ``ceil(C / begin_granularity)`` rounds of ``mask_interval`` iterations for the
    ``channels_to_mask`` C, and the ``(1 - μ) / (lr·λ)`` iterations a unit row takes to reach 0 under the
    penalty alone (at the full lr; a cosine makes it longer). ``inf`` when λ or lr is 0."""
    momentum = config.compactor_momentum
    if momentum is None:
        momentum = float(RECIPE_DEFAULTS["paper"]["compactor_momentum"])
    pull = config.lr * config.lasso_strength
    if pull <= 0:
        return math.inf
    rounds = math.ceil(channels_to_mask / config.begin_granularity)
    return config.mask_start(iters_per_epoch) + rounds * config.mask_interval + (1.0 - momentum) / pull


@dataclass(frozen=True)
class Plan:
    """What one recipe does over a run of ``total_iters`` iterations (None: unknown, paper recipe only)."""

    recipe: Literal["paper", "budget"]
    config: ResRepConfig
    total_iters: int | None
    iters_per_epoch: int | None
    bias_lr_factor: float
    compactor_momentum: float
    residual_lasso: bool
    train_residual_compactors: bool
    score: Score
    #: budget recipe: ``{iteration: kept-MACs goal}`` of every mask round, in order
    rounds: dict[int, float] = field(default_factory=dict)
    mask_start: int = 0
    mask_end: int = 0
    freeze: int = 0

    @property
    def cumulative(self) -> bool:
        """Budget masks only grow; the paper's are re-selected from all-ones every round."""
        return self.recipe == "budget"

    @property
    def score_momentum(self) -> float:
        """Running-average factor of the Taylor score: ``score_momentum``, or with ``score_round_average``
        the factor whose horizon 1/(1 - β) spans the iterations between two mask rounds, whichever
        averages longer."""
        c = self.config
        interval = c.mask_interval if self.recipe == "paper" else (self.mask_end - self.mask_start) / c.mask_rounds
        if not c.score_round_average or interval <= 1.0:
            return c.score_momentum
        return max(c.score_momentum, 1.0 - 1.0 / interval)

    @property
    def forget_iters(self) -> int:
        """Budget recipe: iterations over which a masked row fades linearly to exactly 0."""
        return self.freeze - self.mask_end

    def is_mask_update(self, iteration: int) -> bool:
        if self.recipe == "paper":
            return self.config.is_mask_update(iteration, self.iters_per_epoch)
        return iteration in self.rounds

    def goal(self, iteration: int) -> float:
        """The kept-MACs fraction the round after ``iteration`` must reach."""
        return (
            self.rounds.get(iteration, self.config.flops_target)
            if self.recipe == "budget"
            else self.config.flops_target
        )

    def lasso(self, step: int) -> float:
        """Group-lasso strength on kept rows during ``step`` (budget: none once the masks are frozen)."""
        if self.recipe == "budget" and step >= self.freeze:
            return 0.0
        return self.config.lasso_strength

    def needs_scores(self, step: int) -> bool:
        """Whether the gradient of ``step`` still feeds a mask round (Taylor scores; the paper recipe
        may re-select masks at any round, the budget recipe not after its last)."""
        return self.score == "taylor" and (self.recipe == "paper" or step <= self.mask_end)

    def fade(self, age: Tensor) -> Tensor:
        """Budget recipe: the fraction of its value a row masked ``age`` iterations ago keeps,
        ``clamp(1 - age / forget_iters, 0, 1)``: exactly 0 from ``age = forget_iters`` on."""
        return (1.0 - age.to(torch.float64) / self.forget_iters).clamp(0.0, 1.0)

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier during ``step``: paper, a cosine from 1 to 0 over the run; budget, 1
        until the freeze and a cosine from 1 to 0 over the iterations after it."""
        if self.total_iters is None:
            raise ValueError("the learning-rate shape needs the run's length: pass ResRep(..., total_iters=...)")
        start = self.freeze if self.recipe == "budget" else 0
        if step < start:
            return 1.0
        span = max(1, self.total_iters - start)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - start, span) / span))

    def describe(self) -> dict[str, object]:
        """The resolved schedule, for logs and summaries."""
        out: dict[str, object] = {
            "recipe": self.recipe,
            "total_iters": self.total_iters,
            "bias_lr_factor": self.bias_lr_factor,
            "compactor_momentum": self.compactor_momentum,
            "residual_lasso": self.residual_lasso,
            "train_residual_compactors": self.train_residual_compactors,
            "score": self.score,
            "score_momentum": self.score_momentum,
        }
        if self.recipe == "budget":
            out.update(
                mask_start=self.mask_start,
                mask_end=self.mask_end,
                freeze=self.freeze,
                forget_iters=self.forget_iters,
                rounds=len(self.rounds),
            )
        return out


def resolve(
    config: ResRepConfig, total_iters: int | None, iters_per_epoch: int | None, paper_iters: float | None = None
) -> Plan:
    """The plan of ``config.recipe`` for a run of ``total_iters`` iterations.

    ``"auto"`` takes ``"paper"`` when ``total_iters >= config.auto_switch_iters`` or, when that is None,
    when ``freeze_fraction · total_iters`` covers ``paper_iters`` (the paper timeline, `paper_min_iters`);
    ``"budget"`` otherwise. ValueError when the run's length is needed and missing, or too short."""
    recipe = config.recipe
    if recipe == "auto":
        if total_iters is None:
            raise ValueError(
                "recipe='auto' chooses by the run's length: pass ResRep(..., total_iters=epochs * "
                "len(train_loader)), or set recipe='paper' or 'budget'"
            )
        if config.auto_switch_iters is not None:
            recipe = "paper" if total_iters >= config.auto_switch_iters else "budget"
        else:
            recipe = (
                "paper" if paper_iters is not None and config.freeze_fraction * total_iters >= paper_iters else "budget"
            )
    defaults = RECIPE_DEFAULTS[recipe]

    def pick(name: str):
        value = getattr(config, name)
        return defaults[name] if value is None else value

    common = dict(
        recipe=recipe,
        config=config,
        total_iters=total_iters,
        iters_per_epoch=iters_per_epoch,
        bias_lr_factor=float(pick("bias_lr_factor")),
        compactor_momentum=float(pick("compactor_momentum")),
        residual_lasso=bool(pick("residual_lasso")),
        train_residual_compactors=bool(pick("train_residual_compactors")),
        score=pick("score"),
    )
    if recipe == "paper":
        return Plan(**common)
    if total_iters is None or total_iters < 3:
        raise ValueError(
            f"recipe='budget' needs the run's length (at least 3 iterations), got total_iters="
            f"{total_iters!r}: pass ResRep(..., total_iters=epochs * len(train_loader))"
        )
    start = min(int(round(config.mask_start_fraction * total_iters)), total_iters - 3)
    end = min(max(start + 1, int(round(config.mask_end_fraction * total_iters))), total_iters - 2)
    freeze = min(max(end + 1, int(round(config.freeze_fraction * total_iters))), total_iters - 1)
    n, target = config.mask_rounds, config.flops_target
    rounds: dict[int, float] = {}
    for k in range(1, n + 1):  # cubic: the kept MACs fall fastest in the first rounds
        rounds[start + int(round(k * (end - start) / n))] = target + (1.0 - target) * (1.0 - k / n) ** 3
    return Plan(**common, rounds=rounds, mask_start=start, mask_end=end, freeze=freeze)
