"""CPU latency of train-form vs merged vs directly built plain networks, merge time and error.

Networks: RepVGG-A0-like (widths 48-48-96-192-1280, depths 1-2-4-14-1) and a ResNet-18-like network
of Diverse Branch Blocks, at a small input size. For each batch size the three forms are timed
interleaved (one forward of each per round, after warm-up; median over rounds), so the
merged/plain ratio compares measurements taken side by side; it should be ~1.0 (the merged
network *is* a plain network). Prints a table and writes `benchmarks/results/ops.json`.

    python benchmarks/ops.py [--size 64] [--repeats 9] [--seconds 15] [--batches 1 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from common import latencies, machine_meta, print_table, write_json

from reparam.demo import calibrate, dbb_resnet, parameter_count, repvgg_net
from reparam.merge import merge

RESULTS = Path(__file__).resolve().parent / "results" / "ops.json"

NETWORKS = {
    "RepVGG-A0-like": lambda deploy: repvgg_net((48, 48, 96, 192, 1280), (1, 2, 4, 14, 1), 1000, deploy=deploy),
    "DBB-ResNet-18-like": lambda deploy: dbb_resnet(deploy=deploy, num_classes=1000),
}


def bench_network(name: str, size: int, batches: tuple[int, ...], repeats: int, seconds: float) -> dict:
    torch.manual_seed(0)
    train = calibrate(NETWORKS[name](False), (8, 3, size, size))
    x = torch.randn(batches[-1], 3, size, size)
    start = time.perf_counter()
    merged = merge(train)
    merge_s = time.perf_counter() - start
    report = merge(train, x, verify=True).merge_report  # the error check, outside the merge timing
    plain = NETWORKS[name](True).eval()
    result = {
        "network": name,
        "input": [3, size, size],
        "params": {"train": parameter_count(train), "merged": parameter_count(merged), "plain": parameter_count(plain)},
        "merge_s": merge_s,
        "max_rel_error": report.max_rel_error,
        "blocks_merged": len(report.blocks),
        "bn_folded": len(report.folded),
        "latency_s": {},
    }
    models = {"train": train, "merged": merged, "plain": plain}
    for batch in batches:
        round_s = sum(latencies(models, x[:batch], repeats=1, warmup=2).values())
        rounds = max(repeats, int(seconds / round_s))
        t = latencies(models, x[:batch], repeats=rounds, warmup=1)
        result["latency_s"][str(batch)] = {
            "rounds": rounds,
            **t,
            "speedup_train_over_merged": t["train"] / t["merged"],
            "ratio_merged_over_plain": t["merged"] / t["plain"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeats", type=int, default=9, help="least timed rounds per batch size (median)")
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="more rounds while they fit this time per batch size"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: all cores)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [bench_network(name, args.size, tuple(args.batches), args.repeats, args.seconds) for name in NETWORKS]

    header = ["network", "batch", "rounds", "train s", "merged s", "plain s", "train/merged", "merged/plain"]
    rows = [
        [
            r["network"],
            b,
            t["rounds"],
            f"{t['train']:.4f}",
            f"{t['merged']:.4f}",
            f"{t['plain']:.4f}",
            f"{t['speedup_train_over_merged']:.2f}x",
            f"{t['ratio_merged_over_plain']:.3f}",
        ]
        for r in results
        for b, t in r["latency_s"].items()
    ]
    print(
        f"CPU latency, {args.size}x{args.size} input, float32, {torch.get_num_threads()} threads, "
        "median over interleaved rounds (one forward of each form per round)"
    )
    print_table(header, rows)
    for r in results:
        p = r["params"]
        print(
            f"{r['network']}: merge {r['merge_s']:.2f} s ({r['blocks_merged']} blocks, {r['bn_folded']} BN folded), "
            f"max rel error {r['max_rel_error']:.1e}, params {p['train']:,} -> {p['merged']:,} (plain {p['plain']:,})"
        )
    write_json(RESULTS, {"meta": machine_meta(repeats=args.repeats), "results": results})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
