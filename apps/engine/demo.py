"""The steps every app's offline demo shares: a small residual CNN trained on scikit-learn's digits, the
method trained on it with the shared loop, its conversion verified on the whole test set."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from .data import DataConfig, build_loaders
from .loop import OptimConfig, evaluate, fit, sgd
from .models import DigitsResNet

__all__ = ["SEED", "convert_verified", "digits_base", "one_thread", "speaker", "train_method"]

SEED = 0


def speaker(quiet: bool) -> Callable[[str], None]:
    """``say(text)``: print a demo's progress line, unless `quiet`."""

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    return say


@contextmanager
def one_thread():
    """One intra-op thread for the block: the demo network is tiny, so it is as fast, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def digits_base(say: Callable[[str], None], epochs: int):
    """``(model, train_loader, test_loader, base_eval)``: `DigitsResNet` trained `epochs` on digits (seeded)."""
    torch.manual_seed(SEED)
    train_loader, test_loader, info = build_loaders(DataConfig(dataset="digits", batch_size=64), seed=SEED)
    model = DigitsResNet(info.num_classes, info.in_channels, width=16)
    say(
        f"[1/4] training the base model on digits ({len(train_loader.dataset)} train / "
        f"{len(test_loader.dataset)} test images, {epochs} epochs)"
    )
    fit(
        model,
        train_loader,
        test_loader,
        epochs=epochs,
        optimizer=sgd(model, OptimConfig(lr=0.1)),
        device="cpu",
        progress=False,
    )
    return model, train_loader, test_loader, evaluate(model, test_loader, device=torch.device("cpu"))


def train_method(method: Any, train_loader, test_loader, epochs: int) -> None:
    """`fit` with the method's optimizer, learning-rate shape (if it has one) and hooks, then its target check."""
    optimizer = method.optimizer()
    scheduler = method.lr_scheduler(optimizer) if hasattr(method, "lr_scheduler") else None
    fit(
        method.model,
        train_loader,
        test_loader,
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        hooks=method,
        device="cpu",
        progress=False,
        loss_fn=getattr(method, "loss", None),
    )
    if hasattr(method, "check_target"):
        method.check_target()


def convert_verified(method: Any, test_loader, say: Callable[[str], None]):
    """``(deploy, report, deploy_eval)``: the conversion verified on the whole test set (its warnings said)."""
    say("[3/4] converting to the plain narrow network and verifying it")
    verify = torch.cat([x for x, _ in test_loader])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deploy, report = method.convert(verify)
    for w in caught:
        say(f"      note: {w.message}")
    say("[4/4] evaluating")
    return deploy, report, evaluate(deploy, test_loader, device=torch.device("cpu"))
