"""C-SGD's merge exactness on the CIFAR ResNets with every prunable group clustered (residual streams included).

For each architecture: C-SGD to the MACs target from the published-architecture initialisation, trained
with its own optimizer and rule for ``--steps`` iterations on random CIFAR-sized batches (the collapse
does not depend on the data: every member of a cluster gets the cluster-mean gradient), then merged. The
table gives the spread (largest member deviation from its cluster mean, relative to its tensor), the merge
error in float64 with every cluster set to its kept member, and the merged narrow model against the trained
one in float32 (target ≤ 1e-5), with the MACs kept.

    python benchmarks/csgd_exactness.py [--archs resnet20 resnet56] [--steps 600] [--threads 2]

Writes `benchmarks/results/csgd_exactness.json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine_meta, print_table, write_json

from apps.csgd import CSGD, CSGDConfig
from apps.engine.models import ModelConfig, build_model


def measure(arch: str, steps: int, target: float, batch: int) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, shortcut="A"), num_classes=10)
    x = torch.randn(batch, 3, 32, 32)
    cs = CSGD(model, x[:2], CSGDConfig(flops_target=target), total_iters=steps)
    optimizer, start = cs.optimizer(), time.perf_counter()
    scheduler = cs.lr_scheduler(optimizer)
    cs.model.train()
    spreads = {}
    for step in range(steps):
        xb, yb = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        loss = F.cross_entropy(cs.model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        cs.after_backward()
        optimizer.step()
        scheduler.step()
        cs.after_step(step)
        if (step + 1) in (steps // 4, steps // 2, steps):
            spreads[str(step + 1)] = cs.spread()
    _, report = cs.convert(torch.randn(16, 3, 32, 32))
    return {
        "arch": arch,
        "steps": steps,
        "groups_clustered": len(cs.groups),
        "residual_groups_clustered": sum(len(g.producers) > 1 for g in cs.groups),
        "centripetal_strength": cs.strength,
        "spread": spreads,
        "merge_error_float64": report.max_rel_error,
        "merged_vs_trained_float32": report.max_rel_error_vs_trained,
        "macs_kept": report.macs_after / report.macs_before,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--target", type=float, default=0.471)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(arch, args.steps, args.target, args.batch) for arch in args.archs]
    print_table(
        [
            "arch",
            "groups (residual)",
            "ε",
            "spread at 1/4, 1/2, end",
            "merge f64",
            "merged vs trained f32",
            "MACs kept",
        ],
        [
            [
                r["arch"],
                f"{r['groups_clustered']} ({r['residual_groups_clustered']})",
                f"{r['centripetal_strength']:.3g}",
                ", ".join(f"{v:.1e}" for v in r["spread"].values()),
                f"{r['merge_error_float64']:.1e}",
                f"{r['merged_vs_trained_float32']:.1e}",
                f"{r['macs_kept']:.3f}",
            ]
            for r in rows
        ],
    )
    write_json(Path(args.results) / "csgd_exactness.json", {"meta": machine_meta(), "results": rows})


if __name__ == "__main__":
    main()
