"""ResRep on the shared command line: the `App` that ``python -m apps.resrep`` (``resrep``) runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..engine.commands import App, restore
from ..engine.data import DataInfo
from ..engine.models import ModelConfig
from .config import ResRepConfig
from .convert import ConversionError
from .method import ResRep

__all__ = ["APP", "restore_resrep"]


def _make(model: nn.Module, example: torch.Tensor, config: ResRepConfig, iters_per_epoch, total_iters) -> ResRep:
    return ResRep(model, example, config, iters_per_epoch=iters_per_epoch, total_iters=total_iters)


def _demo(out: str | None, quiet: bool) -> Any:
    from .demo import run_demo

    return run_demo(out=out, quiet=quiet)


APP = App(
    prog="resrep",
    title="ResRep",
    description="ResRep: prune a CNN to a MACs target with compactors, then convert it exactly.",
    config=ResRepConfig,
    make=_make,
    demo=_demo,
    errors=(ConversionError,),
)


def restore_resrep(
    checkpoint: Mapping[str, Any],
    model_cfg: ModelConfig,
    info: DataInfo,
    example: torch.Tensor,
    source: str = "checkpoint",
) -> ResRep:
    """The `ResRep` of a prune run's checkpoint (``OUT/last.pt``, already loaded): the model rebuilt,
    compactors and masks restored, ready for ``convert()``. CheckpointError for any other file."""
    return restore(APP, checkpoint, model_cfg, info, example, source)
