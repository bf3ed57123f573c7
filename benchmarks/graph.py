"""Channel-group discovery and pruning on a model zoo: reparam.graph vs Torch-Pruning, side by side.

Zoos: ``torchvision`` (every classifier it ships, a small input each accepts) and ``timm`` (`TIMM_MODELS`:
every family timm ships, plain and re-param CNNs to ViTs, MLP-Mixers and Swin, at the model's default
input size). For each model (random init, batch 1) and each tool, in a spawned worker with a time
limit: build the channel groups (the median of ``--repeats`` timed builds), prune every prunable group to
``--keep`` of its channels (the final classifier's outputs excluded; Torch-Pruning is told to ignore the classifier layer) and check
that the pruned model still runs with an unchanged output shape; a failure records its error class.
Also times one forward pass, to check reparam's budget of 2 x forward + 0.5 s. Times are CPU seconds of
the worker process (`time.process_time`, ``--threads`` intra-op threads): on a busy machine wall-clock
times of sub-second builds depend on when the scheduler runs the process, CPU time does not. Prints a table and a
summary (coverage, median build-time ratio reparam / Torch-Pruning) and writes
`benchmarks/results/graph[_timm].json`. Torch-Pruning and timm are benchmark-only dependencies
(`pip install -e '.[bench]'`).

    python benchmarks/graph.py [--zoo torchvision|timm] [--models resnet18 swin_t] [--keep 0.5]
        [--timeout 240] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import traceback
from pathlib import Path

import torch
import torchvision
from common import machine_meta, write_json
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
TIMM_MODELS = (
    # plain, SE and re-parameterisable CNNs
    "resnet18",
    "resnet26t",
    "resnet50d",
    "seresnext26d_32x4d",
    "gernet_s",
    "repvgg_a0",
    "mobileone_s0",
    "repghostnet_050",
    "repvit_m1",
    "regnetx_002",
    "regnety_002",
    "regnetz_b16",
    "vgg11_bn",
    "nf_resnet26",
    "hgnetv2_b0",
    "selecsls42b",
    # CSP, multi-branch and multi-scale
    "cspresnet50",
    "cspdarknet53",
    "cspresnext50",
    "res2net50_14w_8s",
    "res2next50",
    "resnest14d",
    "skresnet18",
    "densenet121",
    "dla34",
    "dpn68",
    "hrnet_w18_small",
    "ese_vovnet19b_dw",
    # mobile: ghost, rexnet, mobilenet, efficientnet, lcnet, tinynet and NAS families
    "ghostnet_100",
    "ghostnetv2_100",
    "rexnet_100",
    "mobilenetv2_100",
    "mobilenetv3_small_100",
    "mobilenetv3_large_100",
    "efficientnet_b0",
    "efficientnet_lite0",
    "tf_efficientnetv2_b0",
    "mnasnet_100",
    "fbnetc_100",
    "hardcorenas_a",
    "lcnet_050",
    "tinynet_a",
    "mixnet_s",
    # inception family
    "inception_v3",
    "inception_v4",
    "xception41",
    # ConvNeXt and attention-augmented CNNs
    "convnext_atto",
    "convnextv2_atto",
    "botnet26t_256",
    "halonet26t",
    "coatnet_0_rw_224",
    "visformer_tiny",
    # vision transformers and hybrids
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "cait_xxs24_224",
    "pit_ti_224",
    "convit_tiny",
    "crossvit_tiny_240",
    "levit_128s",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "edgenext_xx_small",
    "poolformer_s12",
    "poolformerv2_s12",
    "fastvit_t8",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "pvt_v2_b0",
    "davit_tiny",
    "focalnet_tiny_srf",
    # MLPs
    "mixer_s16_224",
    "resmlp_12_224",
    "gmlp_ti16_224",
    # Swin
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
)


def make_timm(name: str) -> tuple[nn.Module, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, torch.randn(1, *size)


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs, size = {}, 64
    if name in ("googlenet", "inception_v3"):
        kwargs = dict(aux_logits=False, init_weights=False)
        size = 75 if name == "inception_v3" else 64
    elif name.startswith("vit_"):
        size = 28 if name.endswith("_14") else 32
        kwargs = dict(image_size=size)
    elif name.startswith("maxvit"):
        size = 224
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs).eval(), torch.randn(1, 3, size, size)


def forward_seconds(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Median of `repeats` timed forward passes after one warm-up pass."""
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.process_time()
            model(x)
            times.append(time.process_time() - start)
    return statistics.median(times)


def timed(build, repeats: int) -> tuple[object, list[float]]:
    """``build()`` run ``repeats`` times: its last result and every run's seconds."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.process_time()
        result = build()
        times.append(time.process_time() - start)
    return result, times


def run_reparam(model: nn.Module, x: torch.Tensor, out: dict, keep_fraction: float = 0.5, repeats: int = 1) -> None:
    from reparam.graph import prune, trace

    graph, times = timed(lambda: trace(model, x), repeats)
    out.update(build_s=statistics.median(times), build_times_s=times)
    keep = {}
    for g in graph.groups:
        if g.prunable and g.size > 1:
            n = max(g.multiple, int(g.size * keep_fraction) // g.multiple * g.multiple)
            keep[g.id] = list(range(0, g.size))[:n]
    small = prune(model, x, keep, graph=graph)
    with torch.no_grad():
        ok = small(x).shape == model(x).shape
    fixed = sorted(
        {
            g.reason.split(" at node")[0]
            for g in graph.groups
            if not g.prunable and g.producers and "model output" not in g.reason
        }
    )
    out.update(
        ok=bool(ok),
        groups=len(graph.groups),
        pruned_groups=len(keep),
        macs_before=graph.macs(),
        macs_after=graph.macs({k: len(v) for k, v in keep.items()}),
        fixed=fixed,
    )


def run_torch_pruning(
    model: nn.Module, x: torch.Tensor, out: dict, keep_fraction: float = 0.5, repeats: int = 1
) -> None:
    import torch_pruning as tp

    def build():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        return list(dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))

    groups, times = timed(build, repeats)
    out.update(build_s=statistics.median(times), build_times_s=times, groups=len(groups))
    with torch.no_grad():
        classes = model(x).shape[-1]
    ignored = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear)
        and m.out_features == classes
        or isinstance(m, nn.Conv2d)
        and m.out_channels == classes
    ]  # the classifier, linear or 1x1 conv
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=1.0 - keep_fraction,
        ignored_layers=ignored,
    )
    pruner.step()
    with torch.no_grad():
        out["ok"] = bool(model(x).shape[-1] == classes)


TOOLS = {"reparam": run_reparam, "torch_pruning": run_torch_pruning}


def _warm_up(tool: str) -> None:
    """Pay first-call costs (lazy imports, caches) on a small network, outside the timed builds."""
    TOOLS[tool](torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32), {})


def _worker(tool: str, zoo: str, name: str, keep: float, threads: int, repeats: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    out: dict = {"ok": False}
    try:
        _warm_up(tool)
        model, x = (make_timm if zoo == "timm" else make)(name)
        out.update(forward_s=forward_seconds(model, x), input=list(x.shape))
        TOOLS[tool](model, x, out, keep, repeats)
    except Exception as exc:  # a failure is a result here
        out.update(
            ok=False,
            error=f"{type(exc).__name__}: {str(exc)[:300]}",
            where=traceback.format_exc(limit=-1).strip().splitlines()[-3:],
        )
    queue.put(out)


def run(tool: str, zoo: str, name: str, keep: float, threads: int, repeats: int, timeout: float) -> dict:
    ctx = mp.get_context("spawn")  # fork after OpenMP start-up can deadlock the child
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(tool, zoo, name, keep, threads, repeats, queue))
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    ap.add_argument("--models", nargs="*", default=None, help="default: the whole zoo")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of every prunable group to keep")
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed builds per model and tool (median)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/graph.json or graph_timm.json")
    args = ap.parse_args()
    args.out = args.out or RESULTS / ("graph_timm.json" if args.zoo == "timm" else "graph.json")
    names = args.models or (
        list(TIMM_MODELS) if args.zoo == "timm" else torchvision.models.list_models(module=torchvision.models)
    )
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'model':22s} {'fwd s':>7s} {'reparam s':>10s} {'ok':>3s} {'TP s':>8s} {'ok':>3s} {'ratio':>6s}  budget")
    for name in names:
        ours, theirs = (
            run(tool, args.zoo, name, args.keep, args.threads, args.repeats, args.timeout)
            for tool in ("reparam", "torch_pruning")
        )
        both = "build_s" in ours and "build_s" in theirs and "error" not in ours
        ratio = ours["build_s"] / theirs["build_s"] if both else None
        fwd = ours.get("forward_s", theirs.get("forward_s"))
        budget = ours["build_s"] <= 2 * fwd + 0.5 if "build_s" in ours and fwd is not None else None
        rows.append({"model": name, "reparam": ours, "torch_pruning": theirs, "ratio": ratio, "within_budget": budget})
        fmt = lambda r: f"{r['build_s']:10.3f}" if "build_s" in r else f"{'-':>10s}"
        print(
            f"{name:22s} {fwd if fwd is not None else float('nan'):7.3f} {fmt(ours)} {'ok' if ours['ok'] else 'NO':>3s} "
            f"{fmt(theirs)[2:]} {'ok' if theirs['ok'] else 'NO':>3s} "
            f"{ratio if ratio is not None else float('nan'):6.2f}  {budget}",
            flush=True,
        )
        for tool, r in (("reparam", ours), ("torch_pruning", theirs)):
            if not r["ok"]:
                print(f"    {tool}: {r.get('error', 'output shape changed')}")
        _write(args, rows)  # after every model, so an interrupted run keeps its rows
    print(json.dumps(_write(args, rows), indent=1))


def failure_class(result: dict) -> str | None:
    """A failed run's error, reduced to its kind (exception type and the message's first words)."""
    if result.get("ok"):
        return None
    error = result.get("error", "output shape changed")
    kind, _, message = error.partition(": ")
    return f"{kind}: {' '.join(message.split()[:6])}" if message else kind


def _summary(rows: list[dict]) -> dict:
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    classes: dict[str, dict[str, int]] = {"reparam": {}, "torch_pruning": {}}
    for r in rows:
        for tool in classes:
            kind = failure_class(r[tool])
            if kind is not None:
                classes[tool][kind] = classes[tool].get(kind, 0) + 1
    return {
        "models": len(rows),
        "both_build": len(ratios),
        "reparam_ok": sum(r["reparam"]["ok"] for r in rows),
        "torch_pruning_ok": sum(r["torch_pruning"]["ok"] for r in rows),
        "median_build_ratio": statistics.median(ratios) if ratios else None,
        "reparam_within_budget": sum(bool(r["within_budget"]) for r in rows),
        "max_reparam_build_s": max((r["reparam"].get("build_s", 0.0) for r in rows), default=0.0),
        "failure_classes": classes,
    }


def _write(args: argparse.Namespace, rows: list[dict]) -> dict:
    summary = _summary(rows)
    write_json(
        args.out,
        {"meta": machine_meta(threads=args.threads, zoo=args.zoo, keep=args.keep), "summary": summary, "rows": rows},
    )
    return summary


if __name__ == "__main__":
    main()
