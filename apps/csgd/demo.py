"""The C-SGD demo (``python -m apps.csgd demo``): C-SGD on scikit-learn's digits, offline, in about a minute.

1. Train a small residual CNN (`DigitsResNet`), the same base as the ResRep demo.
2. C-SGD to half the MACs: k-means clusters on every channel group, residual-coupled ones sharing one
   clustering, trained to collapse with the centripetal rule (the budget rule's strength).
3. Merge every cluster into one channel and verify the narrow network against the trained one.
4. Evaluate both networks on the held-out digits and print the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..engine.demo import convert_verified, digits_base, one_thread, speaker, train_method
from .config import CSGDConfig
from .method import CSGD

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = CSGDConfig(flops_target=0.5, lr=0.03)
BASE_EPOCHS, PRUNE_EPOCHS = 20, 30


def run_demo(
    out: str | Path | None = None,
    quiet: bool = False,
    *,
    base_epochs: int = BASE_EPOCHS,
    prune_epochs: int = PRUNE_EPOCHS,
    config: CSGDConfig = DEMO_CONFIG,
) -> dict[str, Any]:
    """Run the demo and return its summary (also printed, and written to ``out/summary.json`` if given)."""

    say = speaker(quiet)
    with one_thread():
        t0 = time.perf_counter()
        model, train_loader, test_loader, base = digits_base(say, base_epochs)
        say(f"[2/4] C-SGD to {config.flops_target:.0%} of the MACs ({prune_epochs} epochs)")
        example = next(iter(test_loader))[0][:1]  # MACs are counted for the traced batch: one image
        cs = CSGD(model, example, config, total_iters=prune_epochs * len(train_loader))
        train_method(cs, train_loader, test_loader, prune_epochs)
        _, report, merged = convert_verified(cs, test_loader, say)
    summary = {
        "base_accuracy": base["acc"],
        "pruned_accuracy": merged["acc"],
        "accuracy_drop": base["acc"] - merged["acc"],
        **report.as_dict(),
        "centripetal_strength": cs.strength,
        "wall_time_s": time.perf_counter() - t0,
        "config": dataclasses.asdict(config),
    }
    say(
        f"\nbase accuracy     {base['acc']:6.2f} %\n"
        f"merged accuracy   {merged['acc']:6.2f} %   (drop {summary['accuracy_drop']:+.2f} points)\n"
        f"MACs              {report.macs_before:,} -> {report.macs_after:,}   (-{report.macs_reduction:.1%})\n"
        f"params            {report.params_before:,} -> {report.params_after:,}\n"
        f"merge error       {report.max_rel_error:.2e} in float64 (clusters set to their kept member), "
        f"{report.max_rel_error_vs_trained:.2e} vs the trained model; cluster spread {report.spread:.1e}\n"
        f"wall time         {summary['wall_time_s']:.0f} s"
    )
    if out is not None:
        from reparam.atomic import atomic_write_text

        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(summary, indent=2) + "\n", path / "summary.json")
    return summary
