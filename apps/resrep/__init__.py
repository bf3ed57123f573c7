"""ResRep: prune any traceable CNN to a MACs target by compactors, gradient resetting and an exact conversion.

`ResRep` wraps a model for any training loop; `prune` is the one-call version on top of the app's
training loop (`apps.engine.loop.fit`); `python -m apps.resrep` is the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..engine.loop import fit
from .app import restore_resrep
from .config import ResRepConfig
from .convert import ConversionError, ConversionReport
from .method import ResRep, TargetMissedError

__all__ = [
    "ConversionError",
    "ConversionReport",
    "ResRep",
    "ResRepConfig",
    "TargetMissedError",
    "prune",
    "restore_resrep",
]


def prune(
    model: nn.Module,
    train_loader: Any,
    *,
    epochs: int,
    config: ResRepConfig | None = None,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    val_loader: Any = None,
    **fit_options: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Train ``model`` with ResRep for ``epochs`` on ``train_loader`` (SGD with `ResRep.param_groups`,
    the recipe's per-iteration learning-rate shape), check that the MACs target was met
    (`TargetMissedError` otherwise), then convert: returns the narrow plain model and its report.

    ``example_inputs`` (default: the first training batch) trace the channel groups and verify the
    conversion; ``fit_options`` go to `apps.engine.loop.fit` (device, amp, checkpoint_dir, ...).
    The original ``model`` is not modified.
    """
    config = config if config is not None else ResRepConfig()
    if example_inputs is None:
        example_inputs = next(iter(train_loader))[0]
    rr = ResRep(
        model, example_inputs, config, iters_per_epoch=len(train_loader), total_iters=epochs * len(train_loader)
    )
    optimizer = rr.optimizer()
    fit(
        rr.model,
        train_loader,
        val_loader,
        epochs=epochs,
        optimizer=optimizer,
        scheduler=rr.lr_scheduler(optimizer),
        hooks=rr,
        **fit_options,
    )
    rr.check_target()
    return rr.convert()
