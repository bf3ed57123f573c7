"""The README's demo (``make demo``): ResRep on scikit-learn's digits, offline, in about a minute on 2 CPU cores.

1. Train a small residual CNN (`DigitsResNet`: stem, two residual blocks, one projection block).
2. ResRep with compactors on every channel group, residual-coupled ones included, to a MACs target.
3. Convert to the plain narrow network (BN folded, compactors merged, channels removed) and verify it.
4. Evaluate both networks on the held-out digits and print the comparison.

ResRep runs its default recipe, ``auto``, which picks the budget recipe for the demo's 660 iterations:
Taylor-scored channels masked in 20 front-loaded rounds over the first quarter of the run, masked rows
fading to exactly 0 by 30% of it, then fine-tuning with every penalty off. The conversion is exact by
construction (largest removed compactor row 0) and verified.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..engine.demo import convert_verified, digits_base, one_thread, speaker, train_method
from .config import ResRepConfig
from .method import ResRep

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = ResRepConfig(flops_target=0.5, lr=0.03, weight_decay=1e-4)
BASE_EPOCHS, PRUNE_EPOCHS = 20, 30


def run_demo(
    out: str | Path | None = None,
    quiet: bool = False,
    *,
    base_epochs: int = BASE_EPOCHS,
    prune_epochs: int = PRUNE_EPOCHS,
    config: ResRepConfig = DEMO_CONFIG,
) -> dict[str, Any]:
    """Run the demo and return its summary (also printed, and written to ``out/summary.json`` if given)."""

    say = speaker(quiet)
    with one_thread():
        return _run(out, say, base_epochs, prune_epochs, config)


def _run(out, say, base_epochs: int, prune_epochs: int, config: ResRepConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, train_loader, test_loader, base = digits_base(say, base_epochs)
    say(f"[2/4] ResRep to {config.flops_target:.0%} of the MACs ({prune_epochs} epochs)")
    example = next(iter(test_loader))[0][:1]  # MACs are counted for the traced batch: one image
    rr = ResRep(model, example, config, iters_per_epoch=len(train_loader), total_iters=prune_epochs * len(train_loader))
    train_method(rr, train_loader, test_loader, prune_epochs)
    deploy, report, pruned = convert_verified(rr, test_loader, say)
    summary = {
        "base_accuracy": base["acc"],
        "pruned_accuracy": pruned["acc"],
        "accuracy_drop": base["acc"] - pruned["acc"],
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "macs_reduction": report.macs_reduction,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "max_rel_error": report.max_rel_error,
        "max_rel_error_native": report.max_rel_error_native,
        "max_rel_error_vs_trained": report.max_rel_error_vs_trained,
        "largest_removed_norm": report.largest_removed_norm,
        "widths_before": report.widths_before,
        "widths_after": report.widths_after,
        "wall_time_s": time.perf_counter() - t0,
        "config": dataclasses.asdict(config),
        "plan": rr.plan.describe(),
    }
    say(
        f"\nbase accuracy     {base['acc']:6.2f} %\n"
        f"pruned accuracy   {pruned['acc']:6.2f} %   (drop {summary['accuracy_drop']:+.2f} points)\n"
        f"MACs              {report.macs_before:,} -> {report.macs_after:,}   (-{report.macs_reduction:.1%})\n"
        f"params            {report.params_before:,} -> {report.params_after:,}   (-{report.params_reduction:.1%})\n"
        f"conversion error  {report.max_rel_error:.2e} in float64, {report.max_rel_error_native:.2e} in float32 "
        "(max relative, vs the masked compactor model); "
        f"largest removed row norm {report.largest_removed_norm:.1e}\n"
        f"widths            "
        + ", ".join(f"{k} {report.widths_before[k]}->{v}" for k, v in report.widths_after.items())
        + f"\nwall time         {summary['wall_time_s']:.0f} s"
    )
    if out is not None:
        from reparam.atomic import atomic_write_text

        from ..engine.plots import plot_widths

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
        plot_widths(report.widths_before, report.widths_after, out / "widths.png", title="digits: widths before/after")
    return summary
