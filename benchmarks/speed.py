"""The pruning apps' costs and pay-off on CPU: training-step overhead (ResRep, C-SGD), pruned latency
against MACs, conversion and graph-building time.

For each CIFAR ResNet (option-A shortcuts, 32x32 input):

1. **Training step** — one SGD step (forward, backward, update) of the plain network against one
   ResRep step (compactors, `after_backward` gradient rule, compactor momentum) on the same batch,
   timed interleaved (one step of each per round, order rotating); ratio = ResRep / plain. Mask
   re-selection runs once every ``mask_interval`` (200) steps; its own time is reported apart. The
   same for a C-SGD step (Nesterov SGD with the centripetal rule on every clustered group, residual
   groups included) against the plain step; target ratio ≤ 1.10.
2. **Pruned latency** — the base network (BN folded, eval) against a ResRep-converted network at
   the MACs target, batch 1 and 64, interleaved medians. ``speedup`` = base time / pruned time;
   ``speedup / MACs ratio`` is the ratio of ratios (1.0: latency falls exactly as the MACs do). The
   pruned widths come from a run (``--deploy ARCH=PATH``: `apps.resrep prune`'s deploy.pt or last.pt), or
   by default from one selection round on seeded random compactor scores.
3. **Conversion and graph building** — `ResRep.convert()` (BN folding, compactor merge, surgery,
   verification) and `reparam.graph.trace` (torch.fx trace + shape propagation + channel groups).

Prints a table and writes `benchmarks/results/speed.json`.

    python benchmarks/speed.py [--archs resnet20 resnet56] [--threads 2] [--seconds 10]
                               [--deploy resnet20=benchmarks/runs/prune_cifar/resnet20/resrep-residual/last.pt]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import interleaved, latencies, machine_meta, print_table, write_json
from torch import nn

from apps.csgd import CSGD, CSGDConfig
from apps.engine.checkpoint import load_file
from apps.engine.data import DataInfo
from apps.engine.loop import Hooks
from apps.engine.models import ModelConfig, build_model, deploy_shell
from apps.resrep import ResRep, ResRepConfig, restore_resrep
from reparam.graph import trace
from reparam.merge import merge

RESULTS = Path(__file__).resolve().parent / "results" / "speed.json"


def _base(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, shortcut="A"), num_classes=10)


def _stepper(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, rr: Hooks | None
) -> Callable[[], None]:
    """One training step as a closure (channels_last, like the training runs)."""
    model.train().to(memory_format=torch.channels_last)
    it = iter(range(10**9))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if rr is not None:
            rr.after_backward()
        optimizer.step()
        if rr is not None:
            rr.after_step(next(it))

    return step


def train_step(arch: str, batch: int, seconds: float) -> dict:
    """Plain SGD step vs ResRep steps (residual and paper mode) on one batch."""
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    steps: dict[str, Callable[[], None]] = {}
    plain = _base(arch)
    steps["plain"] = _stepper(
        plain, torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4), x, y, None
    )
    rrs: dict[str, ResRep] = {}
    for mode in ("residual", "paper"):
        # the budget recipe (the default at CIFAR budgets) before its freeze: Taylor scores, lasso on kept rows
        rr = ResRep(_base(arch), x[:2].contiguous(), ResRepConfig(mode=mode, recipe="budget"), total_iters=10**6)
        rrs[mode] = rr
        steps[f"resrep-{mode}"] = _stepper(rr.model, rr.optimizer(), x, y, rr)
    cs = CSGD(_base(arch), x[:2].contiguous(), CSGDConfig(), total_iters=10**6)
    steps["csgd"] = _stepper(cs.model, cs.optimizer(), x, y, cs)
    probe = interleaved(steps, rounds=1, warmup=2)
    rounds = max(7, int(seconds / sum(probe.values())))
    t = interleaved(steps, rounds)
    select = []
    for _ in range(5):
        start = time.perf_counter()
        rrs["residual"].update_masks()
        select.append(time.perf_counter() - start)
    return {
        "batch": batch,
        "rounds": rounds,
        "step_s": t,
        "ratio": {**{f"resrep-{m}": t[f"resrep-{m}"] / t["plain"] for m in rrs}, "csgd": t["csgd"] / t["plain"]},
        "compactors": {m: len(rr.sites) for m, rr in rrs.items()},
        "mask_update_s": statistics.median(select),
        "mask_update_per_step_at_interval_200": statistics.median(select) / 200 / t["plain"],
    }


def _synthetic_deploy(arch: str, target: float, round_to: int) -> tuple[nn.Module, dict]:
    """Convert a ResRep model whose compactor rows have seeded random norms, pruned in one round (the
    masked rows are not decayed, so the conversion's warning about them is expected and silenced)."""
    base = _base(arch).eval()
    rr = ResRep(
        base,
        torch.randn(2, 3, 32, 32),
        ResRepConfig(recipe="paper", flops_target=target, begin_granularity=10**6, round_to=round_to),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, compactor in rr.compactors():
            compactor.weight.mul_(torch.rand(compactor.weight.shape[0], 1, 1, 1, generator=gen) + 0.5)
    rr.update_masks()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ResRep conversion removed compactor rows", RuntimeWarning)
        start = time.perf_counter()
        deploy, report = rr.convert()
        convert_s = time.perf_counter() - start
    return deploy, {
        "source": f"synthetic (one selection round on seeded random scores, round_to={round_to})",
        "convert_s": convert_s,
        "convert_max_rel_error": report.max_rel_error,
    }


def latency(arch: str, target: float, deploy_path: str | None, seconds: float, round_to: int = 1) -> dict:
    """Base (BN folded) vs pruned latency at batch 1 and 64, against their MACs ratio."""
    example = torch.randn(2, 3, 32, 32)
    base = merge(_base(arch).eval(), example)
    if deploy_path:
        saved = load_file(Path(deploy_path))
        if saved.get("meta", {}).get("command") == "prune":  # a prune run's last.pt: convert it here
            rr = restore_resrep(saved, ModelConfig(arch=arch, shortcut="A"), DataInfo(10, 3, 32), example, deploy_path)
            pruned = rr.convert()[0].eval()
        else:  # a deploy.pt written by `apps.resrep` (with its channel plan)
            pruned = deploy_shell(_base(arch), saved["state_dict"], plan=saved.get("plan")).eval()
        info = {"source": deploy_path}
    else:
        pruned, info = _synthetic_deploy(arch, target, round_to)
    one = example[:1]  # MACs per image
    macs = {"base": trace(base, one).macs(), "pruned": trace(pruned, one).macs()}
    out = {**info, "macs": macs, "macs_ratio": macs["base"] / macs["pruned"], "batches": {}}
    models = {"base": base, "pruned": pruned}
    with torch.no_grad():
        for batch in (1, 64):
            x = torch.randn(batch, 3, 32, 32)
            probe = latencies(models, x, repeats=1, warmup=2)
            t = latencies(models, x, repeats=max(9, int(seconds / sum(probe.values()))), warmup=1)
            speedup = t["base"] / t["pruned"]
            out["batches"][str(batch)] = {
                **t,
                "speedup": speedup,
                "speedup_over_macs_ratio": speedup / out["macs_ratio"],
            }
    return out


def build_times(arch: str, repeats: int = 5) -> dict:
    """Seconds for `reparam.graph.trace` (median) and for one forward pass at batch 1."""
    model, x = _base(arch).eval(), torch.randn(1, 3, 32, 32)
    traces = []
    for _ in range(repeats):
        start = time.perf_counter()
        trace(model, x)
        traces.append(time.perf_counter() - start)
    with torch.no_grad():
        forward = latencies({"m": model}, x, repeats=repeats)["m"]
    return {"trace_s": statistics.median(traces), "forward_s": forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--batch", type=int, default=64, help="training batch size")
    parser.add_argument("--target", type=float, default=0.471, help="MACs kept by the synthetic pruned network")
    parser.add_argument(
        "--deploy",
        nargs="*",
        default=[],
        metavar="ARCH=PATH",
        help="networks to time instead of the synthetic one: a prune run's deploy.pt or last.pt",
    )
    parser.add_argument("--round-to", type=int, default=1, help="width multiple of the synthetic pruned network")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    deploys = dict(d.split("=", 1) for d in args.deploy)
    results = []
    for arch in args.archs:
        results.append(
            {
                "arch": arch,
                "train_step": train_step(arch, args.batch, args.seconds),
                "latency": latency(arch, args.target, deploys.get(arch), args.seconds, args.round_to),
                "build": build_times(arch),
            }
        )

    print(f"CPU, {torch.get_num_threads()} threads, float32, channels_last training, medians of interleaved rounds\n")
    print_table(
        ["arch", "batch", "plain step s", "ResRep step s", "ratio", "paper-mode ratio", "mask update s", "C-SGD ratio"],
        [
            [
                r["arch"],
                t["batch"],
                f"{t['step_s']['plain']:.4f}",
                f"{t['step_s']['resrep-residual']:.4f}",
                f"{t['ratio']['resrep-residual']:.3f}",
                f"{t['ratio']['resrep-paper']:.3f}",
                f"{t['mask_update_s']:.4f}",
                f"{t['ratio']['csgd']:.3f}",
            ]
            for r in results
            for t in [r["train_step"]]
        ],
    )
    print_table(
        ["arch", "batch", "base s", "pruned s", "speed-up", "MACs ratio", "speed-up / MACs ratio", "pruned from"],
        [
            [
                r["arch"],
                b,
                f"{v['base']:.5f}",
                f"{v['pruned']:.5f}",
                f"{v['speedup']:.2f}x",
                f"{r['latency']['macs_ratio']:.2f}x",
                f"{v['speedup_over_macs_ratio']:.3f}",
                "run" if r["latency"]["source"].endswith(".pt") else f"synthetic, round_to={args.round_to}",
            ]
            for r in results
            for b, v in r["latency"]["batches"].items()
        ],
    )
    print_table(
        ["arch", "trace + groups s", "forward s (batch 1)", "convert s", "convert max rel err"],
        [
            [
                r["arch"],
                f"{r['build']['trace_s']:.3f}",
                f"{r['build']['forward_s']:.4f}",
                f"{r['latency'].get('convert_s', float('nan')):.3f}",
                f"{r['latency'].get('convert_max_rel_error', float('nan')):.1e}",
            ]
            for r in results
        ],
    )
    write_json(args.out, {"meta": machine_meta(), "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
