"""The SFP demo (``python -m apps.sfp demo``): SFP and CR-SFP on scikit-learn's digits, offline, in under a minute.

1. Train a small residual CNN (`DigitsResNet`), the same base as the other apps' demos.
2. SFP, then CR-SFP, to half the MACs: the weakest filters zeroed after every epoch (CR-SFP trains the
   pruned and the unpruned network together on two views of every image).
3. Export each narrow network (zeroed channels removed, their constants folded or carried) and verify it
   against the masked network it came from.
4. Evaluate both on the held-out digits and print the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..engine.data import DataConfig, build_loaders
from ..engine.demo import SEED, convert_verified, digits_base, one_thread, speaker, train_method
from .config import SFPConfig
from .method import SFP

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = SFPConfig(flops_target=0.5, lr=0.03)
BASE_EPOCHS, PRUNE_EPOCHS = 20, 30


def run_demo(
    out: str | Path | None = None,
    quiet: bool = False,
    *,
    base_epochs: int = BASE_EPOCHS,
    prune_epochs: int = PRUNE_EPOCHS,
    config: SFPConfig = DEMO_CONFIG,
) -> dict[str, Any]:
    """Run the demo and return its summary (also printed, and written to ``out/summary.json`` if given)."""
    say = speaker(quiet)
    results: dict[str, Any] = {}
    with one_thread():
        t0 = time.perf_counter()
        model, train_loader, test_loader, base = digits_base(say, base_epochs)
        example = next(iter(test_loader))[0][:1]  # MACs are counted for the traced batch: one image
        for variant in ("sfp", "cr-sfp"):
            cfg = dataclasses.replace(config, method=variant)
            say(f"[2/4] {variant.upper()} to {cfg.flops_target:.0%} of the MACs ({prune_epochs} epochs)")
            views = 2 if variant == "cr-sfp" else 1
            loader = build_loaders(DataConfig(dataset="digits", batch_size=64), seed=SEED, views=views)[0]
            method = SFP(model, example, cfg, iters_per_epoch=len(loader), total_iters=prune_epochs * len(loader))
            train_method(method, loader, test_loader, prune_epochs)
            _, report, narrow = convert_verified(method, test_loader, say)
            results[variant] = {"pruned_accuracy": narrow["acc"], **report.as_dict()}
    summary = {
        "base_accuracy": base["acc"],
        **{
            f"{v}_{k}": r[k]
            for v, r in results.items()
            for k in ("pruned_accuracy", "max_rel_error", "max_rel_error_native", "macs_reduction")
        },
        "macs_before": results["sfp"]["macs_before"],
        "wall_time_s": time.perf_counter() - t0,
        "config": dataclasses.asdict(config),
        "results": results,
    }
    lines = [f"\nbase accuracy      {base['acc']:6.2f} %"]
    for v, r in results.items():
        lines.append(
            f"{v:<7} narrow     {r['pruned_accuracy']:6.2f} %   (drop {base['acc'] - r['pruned_accuracy']:+.2f} points), "
            f"MACs -{r['macs_reduction']:.1%}, export error {r['max_rel_error']:.1e} (float64) / "
            f"{r['max_rel_error_native']:.1e} vs the masked network, carriers {sum(map(len, r['carriers'].values()))}"
        )
    lines.append(f"wall time          {summary['wall_time_s']:.0f} s")
    say("\n".join(lines))
    if out is not None:
        from reparam.atomic import atomic_write_text

        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(summary, indent=2, default=str) + "\n", path / "summary.json")
    return summary
