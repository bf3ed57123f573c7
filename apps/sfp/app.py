"""SFP / CR-SFP on the shared command line: the `App` that ``python -m apps.sfp`` (``sfp``) runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.commands import App
from .config import SFPConfig
from .export import InexactExportError
from .method import SFP

__all__ = ["APP"]


def _make(model: nn.Module, example: torch.Tensor, config: SFPConfig, iters_per_epoch, total_iters) -> SFP:
    return SFP(model, example, config, iters_per_epoch=iters_per_epoch, total_iters=total_iters)


def _demo(out: str | None, quiet: bool) -> Any:
    from .demo import run_demo

    return run_demo(out=out, quiet=quiet)


APP = App(
    prog="sfp",
    title="SFP",
    description="SFP / CR-SFP: zero the weakest filters after every epoch, then export the narrow network exactly.",
    config=SFPConfig,
    make=_make,
    demo=_demo,
    errors=(InexactExportError,),
    views=lambda config: 2 if config.method == "cr-sfp" else 1,
)
