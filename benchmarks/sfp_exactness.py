"""SFP's physical export on the CIFAR ResNets: the narrow model against the masked P-NN it came from.

For each architecture and layer set (``paper``: the groups inside residual blocks; ``residual``: every
prunable group, residual streams included): the published weights (with ``--data``, the
``../shared/data`` layout; else a seeded random init with randomised norm statistics), the filters of
every pruned group zeroed by L2 norm at the prune ratio that meets the MACs target (SFP's hard zeroing),
then exported. A zeroed channel still emits its norm's shift through the ReLU; the table gives the
largest such constant, how many channels were kept as carriers (where a padded 3×3 reader sees the
constant only partly at the borders), the export error in float64 and in float32 against the masked
network on 256 CIFAR-sized inputs (target ≤ 1e-5), and the MACs kept.

    python benchmarks/sfp_exactness.py [--data ../shared/data] [--archs resnet20 resnet56] [--threads 2]

Writes `benchmarks/results/sfp_exactness.json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import machine_meta, print_table, write_json
from torch import nn

from apps.engine.models import ModelConfig, build_model, load_weights
from apps.sfp import SFP, SFPConfig


def base_model(arch: str, data: Path | None) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, shortcut="A"), num_classes=10)
    published = sorted((data / "cifar-resnet").glob(f"{arch}-*.th")) if data else []
    if published:
        load_weights(model, published[0])
        return model.eval(), f"published {published[0].name}"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.5, generator=gen)
    return model.eval(), "random init, randomised norms"


def measure(arch: str, mode: str, target: float, data: Path | None) -> dict:
    model, weights = base_model(arch, data)
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    sfp = SFP(model, x[:1], SFPConfig(flops_target=target, mode=mode), iters_per_epoch=1, total_iters=1)
    _, report = sfp.convert(x)
    return {
        "arch": arch,
        "weights": weights,
        "mode": mode,
        "groups_pruned": len(sfp.groups),
        "channels_zeroed": sum(int((~m).sum()) for m in sfp.masks.values()),
        "carriers": sum(len(v) for v in report.carriers.values()),
        "largest_constant": report.largest_constant,
        "export_error_float64": report.max_rel_error,
        "export_error_float32": report.max_rel_error_native,
        "exact": report.exact,
        "macs_kept": report.macs_after / report.macs_before,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with cifar-resnet/ (published weights)")
    parser.add_argument("--archs", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--modes", nargs="+", default=["paper", "residual"])
    parser.add_argument("--target", type=float, default=0.471)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(arch, mode, args.target, args.data) for arch in args.archs for mode in args.modes]
    print_table(
        ["arch", "mode", "groups", "zeroed", "carriers", "max |const|", "f64 error", "f32 error", "MACs kept"],
        [
            [
                r["arch"],
                r["mode"],
                r["groups_pruned"],
                r["channels_zeroed"],
                r["carriers"],
                f"{r['largest_constant']:.3g}",
                f"{r['export_error_float64']:.1e}",
                f"{r['export_error_float32']:.1e}",
                f"{r['macs_kept']:.3f}",
            ]
            for r in rows
        ],
    )
    write_json(Path(args.results) / "sfp_exactness.json", {"meta": machine_meta(), "results": rows})


if __name__ == "__main__":
    main()
