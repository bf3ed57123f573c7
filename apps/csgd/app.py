"""C-SGD on the shared command line: the `App` that ``python -m apps.csgd`` (``csgd``) runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.commands import App
from .config import CSGDConfig
from .method import CSGD, UnconvergedError

__all__ = ["APP"]


def _make(model: nn.Module, example: torch.Tensor, config: CSGDConfig, iters_per_epoch, total_iters) -> CSGD:
    return CSGD(model, example, config, total_iters=total_iters)


def _demo(out: str | None, quiet: bool) -> Any:
    from .demo import run_demo

    return run_demo(out=out, quiet=quiet)


APP = App(
    prog="csgd",
    title="C-SGD",
    description="C-SGD: train clusters of filters to become identical, then merge each cluster into one channel.",
    config=CSGDConfig,
    make=_make,
    demo=_demo,
    errors=(UnconvergedError,),
)
