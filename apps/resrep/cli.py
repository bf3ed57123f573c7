"""Command line: ``python -m apps.resrep {train,prune,eval,export,demo}`` (also installed as ``resrep``).

Flags are generated from the config dataclasses, one flag per field (``--flops-target`` is
``ResRepConfig.flops_target``): `DataConfig`, `ModelConfig`, `TrainConfig`, and `OptimConfig` (train) or
`ResRepConfig` (prune). Under ``torchrun`` every command runs distributed (NCCL on CUDA, gloo on CPU).

- ``train --out DIR``: train a base model (optionally from ``--checkpoint``); ``DIR/last.pt`` is the
  resumable checkpoint and also the base weights that ``prune --checkpoint`` reads.
- ``prune --checkpoint BASE --out DIR``: ResRep to ``--flops-target``, then convert, verify, evaluate and
  export the narrow model (``DIR/deploy.{pt,ts,onnx}``), with ``summary.json`` and plots.
- ``eval --checkpoint FILE``: accuracy of a base checkpoint (ours or a published CIFAR ResNet file),
  a prune run's ``last.pt``, a converted ``deploy.pt`` or a TorchScript ``deploy.ts``.
- ``export --checkpoint DIR/last.pt --out OUT``: convert a prune run's checkpoint and export it.
- ``demo``: the README's offline demonstration on scikit-learn digits.

Bad input (missing data, a checkpoint of another architecture, a corrupt file, a NaN loss, a target
outside (0, 1), an untraceable model) exits with status 2 and a one-line ``error:`` message; nothing
is written before the inputs have been checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reparam.atomic import atomic_write_text
from reparam.graph import flops

from ..engine.checkpoint import CheckpointError, check_run_folder, load_file, writable_folder
from ..engine.cli import add_dataclass_args, config_from_args
from ..engine.data import DataConfig, DataInfo, build_loaders
from ..engine.export import FORMATS, check_formats, export_model
from ..engine.loop import (
    OptimConfig,
    TrainConfig,
    evaluate,
    fit,
    init_distributed,
    is_main_process,
    resolve_device,
    sgd,
)
from ..engine.models import (
    ModelConfig,
    build_model,
    deploy_shell,
    load_weights,
    unwrap_state_dict,
)
from .config import ResRepConfig
from .method import ResRep, TargetMissedError, require_prune_checkpoint, restore_resrep

__all__ = ["main", "build_parser", "run_train", "run_prune", "run_eval", "run_export"]

_GROUPS = {
    "train": (DataConfig, ModelConfig, TrainConfig, OptimConfig),
    "prune": (DataConfig, ModelConfig, TrainConfig, ResRepConfig),
    "eval": (DataConfig, ModelConfig),
    "export": (DataConfig, ModelConfig),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resrep", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train a base model",
        "prune": "ResRep from a checkpoint to a MACs target",
        "eval": "evaluate a checkpoint",
        "export": "convert a prune checkpoint and export it",
        "demo": "offline demo on digits (train, prune, convert, evaluate)",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == "demo":
            p.add_argument("--out", default="", help="also write the demo's run folders here")
            p.add_argument("--quiet", action="store_true", help="no progress output")
            continue
        seen: set[str] = set()
        for cls in _GROUPS[name]:
            names = {f.name for f in dataclasses.fields(cls)}
            clash = seen & names
            if clash:
                raise TypeError(f"config fields {sorted(clash)} appear twice in the {name} command")
            seen |= names
            add_dataclass_args(p, cls)
        needs_ckpt = name != "train"
        p.add_argument(
            "--checkpoint",
            required=needs_ckpt,
            default="",
            help="weights to start from / evaluate" + ("" if needs_ckpt else " (optional)"),
        )
        if name in ("train", "prune", "export"):
            p.add_argument("--out", required=True, help="output folder")
        if name in ("train", "prune"):
            p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
        if name in ("prune", "export"):
            p.add_argument("--formats", default=",".join(FORMATS), help="export formats, comma separated")
    return parser


# ----------------------------------------------------------------------------------------------- helpers
def _seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _example(loader) -> torch.Tensor:
    """One input image: MACs are counted for the traced batch, so this makes them per image."""
    x, _ = next(iter(loader))
    return x[:1]


def _summary_write(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(json.dumps(summary, indent=2, default=float) + "\n", out / "summary.json")


def _info_meta(info: DataInfo) -> dict[str, int]:
    return dataclasses.asdict(info)


def _meta(data: DataConfig, model: ModelConfig, train: TrainConfig, info: DataInfo, **more: Any) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it (and what `export` needs to rebuild it)."""
    return {
        "model": dataclasses.asdict(model),
        "info": _info_meta(info),
        "epochs": train.epochs,
        "data": {k: getattr(data, k) for k in ("dataset", "batch_size", "train_limit", "augment")},
        "seed": train.seed,
        **more,
    }


# ----------------------------------------------------------------------------------------------- commands
def _start_run(data: DataConfig, train: TrainConfig, out: str, resume: bool):
    """Common start of `train` and `prune`: process group, output folder, device, seeds, loaders."""
    rank, world, _ = init_distributed()
    out_dir = check_run_folder(out, resume)
    device = resolve_device(train.device)
    _seed(train.seed)
    loaders = build_loaders(data, seed=train.seed, rank=rank, world_size=world, pin_memory=device.type == "cuda")
    return rank, world, out_dir, device, loaders


def run_train(
    data: DataConfig,
    model_cfg: ModelConfig,
    train: TrainConfig,
    optim: OptimConfig,
    *,
    out: str,
    checkpoint: str = "",
    resume: bool = False,
) -> dict[str, Any]:
    """Train a base model into ``out`` (``last.pt``, ``log.csv``, ``summary.json``, ``history.png``)."""
    rank, world, out_dir, device, (train_loader, test_loader, info) = _start_run(data, train, out, resume)
    model = build_model(model_cfg, num_classes=info.num_classes, in_channels=info.in_channels)
    if checkpoint:
        load_weights(model, checkpoint)
    example = _example(test_loader)
    report = flops(model, example)
    t0 = time.perf_counter()
    initial = evaluate(model.to(device), test_loader, device=device) if checkpoint else None
    history = fit(
        model,
        train_loader,
        test_loader,
        epochs=train.epochs,
        optimizer=sgd(model, optim),
        checkpoint_dir=out_dir,
        resume=resume,
        amp=train.amp,
        channels_last=train.channels_last,
        log_dir=out_dir,
        device=device,
        eval_every=train.eval_every,
        checkpoint_every=train.checkpoint_every,
        progress=train.progress,
        meta=_meta(data, model_cfg, train, info, command="train", optim=dataclasses.asdict(optim)),
    )
    final = evaluate(model, test_loader, device=device, amp=train.amp, channels_last=train.channels_last)
    summary = {
        "command": "train",
        "arch": model_cfg.arch,
        "dataset": data.dataset,
        "epochs": train.epochs,
        "accuracy": final["acc"],
        "initial_accuracy": initial["acc"] if initial else None,
        "macs": int(report.total_macs),
        "params": int(report.total_params),
        "wall_time_s": time.perf_counter() - t0,
        "world_size": world,
    }
    if is_main_process():
        from .plots import plot_history

        _summary_write(out_dir, summary)
        plot_history(history, out_dir / "history.png", title=f"{model_cfg.arch} on {data.dataset}")
    return summary


def _resrep(
    model_cfg: ModelConfig,
    rr_cfg: ResRepConfig,
    info: DataInfo,
    example: torch.Tensor,
    iters_per_epoch: int,
    epochs: int,
    device: torch.device,
):
    base = build_model(model_cfg, num_classes=info.num_classes, in_channels=info.in_channels)
    return base, lambda: ResRep(
        base.to(device),
        example.to(device),
        rr_cfg,
        iters_per_epoch=iters_per_epoch,
        total_iters=epochs * iters_per_epoch,
    )


def _export_deploy(rr, verify: torch.Tensor, out_dir: Path, formats: Sequence[str], extra: dict[str, Any]):
    deploy, report = rr.convert(verify)
    extra = {**extra, "plan": deploy.meta["reparam.plan"].to_json()}  # rebuilds it exactly (`deploy_shell`)
    results = export_model(
        deploy, verify, out_dir, name="deploy", formats=formats, tolerance=max(report.tolerance, 1e-5), extra=extra
    )
    return deploy, report, results


def run_prune(
    data: DataConfig,
    model_cfg: ModelConfig,
    train: TrainConfig,
    rr_cfg: ResRepConfig,
    *,
    checkpoint: str,
    out: str,
    resume: bool = False,
    formats: Sequence[str] = FORMATS,
) -> dict[str, Any]:
    """ResRep from ``checkpoint`` into ``out``: train with compactors, convert, verify, evaluate, export.

    A run that ends above ``flops_target`` still converts and writes everything (``summary.json`` says
    ``target_met: false``), then raises `apps.resrep.method.TargetMissedError` (exit status 2)."""
    check_formats(formats)
    rank, world, out_dir, device, (train_loader, test_loader, info) = _start_run(data, train, out, resume)
    base, make = _resrep(model_cfg, rr_cfg, info, _example(test_loader), len(train_loader), train.epochs, device)
    load_weights(base, checkpoint)
    base_eval = evaluate(base.to(device), test_loader, device=device, amp=train.amp)
    rr = make()
    optimizer = rr.optimizer()
    t0 = time.perf_counter()
    history = fit(
        rr.model,
        train_loader,
        test_loader,
        epochs=train.epochs,
        optimizer=optimizer,
        scheduler=rr.lr_scheduler(optimizer),
        hooks=rr,
        checkpoint_dir=out_dir,
        resume=resume,
        amp=train.amp,
        channels_last=train.channels_last,
        log_dir=out_dir,
        device=device,
        eval_every=train.eval_every,
        checkpoint_every=train.checkpoint_every,
        progress=train.progress,
        metrics=lambda: {"macs": rr.macs(masked=True), "masked": sum(int((~m).sum()) for m in rr.masks.values())},
        meta=_meta(data, model_cfg, train, info, command="prune", resrep=dataclasses.asdict(rr_cfg)),
    )
    wall = time.perf_counter() - t0
    try:
        rr.check_target()
        missed = None
    except TargetMissedError as e:
        missed = e
    summary: dict[str, Any] = {}
    if is_main_process():
        from .plots import plot_history, plot_widths

        verify = next(iter(test_loader))[0][:64].to(device)
        extra = {"arch": dataclasses.asdict(model_cfg), "info": _info_meta(info)}
        deploy, report, results = _export_deploy(rr, verify, out_dir, formats, extra)
        pruned_eval = evaluate(deploy, test_loader, device=device, amp=train.amp)
        summary = {
            "command": "prune",
            "arch": model_cfg.arch,
            "dataset": data.dataset,
            "epochs": train.epochs,
            "base_accuracy": base_eval["acc"],
            "pruned_accuracy": pruned_eval["acc"],
            "accuracy_drop": base_eval["acc"] - pruned_eval["acc"],
            "compactor_model_accuracy": history[-1].get("val_acc") if history else None,
            **{k: v for k, v in report.as_dict().items() if k not in ("widths_before", "widths_after")},
            "widths_before": report.widths_before,
            "widths_after": report.widths_after,
            "group_widths": {str(g.id): {"size": g.size, "kept": int(rr.masks[g.id].sum())} for g in rr.groups},
            "exports": {
                r.format: {"path": str(r.path), "max_rel_error": r.max_rel_error, "checked_with": r.checked_with}
                for r in results
            },
            "wall_time_s": wall,
            "world_size": world,
            "resrep_config": dataclasses.asdict(rr_cfg),
            "plan": rr.plan.describe(),
            "target_met": missed is None,
        }
        _summary_write(out_dir, summary)
        plot_widths(
            report.widths_before,
            report.widths_after,
            out_dir / "widths.png",
            title=f"{model_cfg.arch}: widths before/after ResRep",
        )
        plot_history(history, out_dir / "history.png", title=f"ResRep {model_cfg.arch} on {data.dataset}")
    if missed is not None:
        raise missed
    return summary


def run_eval(data: DataConfig, model_cfg: ModelConfig, *, checkpoint: str, device: str = "auto") -> dict[str, Any]:
    """Accuracy of any checkpoint this app writes or reads (see the module docstring)."""
    dev = resolve_device(device)
    _, test_loader, info = build_loaders(data)
    path = Path(checkpoint)
    if path.suffix == ".ts":
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream; reading our export is fine
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
                model = torch.jit.load(str(path), map_location=dev)
        except Exception as e:
            raise CheckpointError(f"cannot read TorchScript file {path}: {e}") from e
        return {"checkpoint": str(path), **evaluate(model, test_loader, device=dev)}
    obj = load_file(path)
    model = build_model(model_cfg, num_classes=info.num_classes, in_channels=info.in_channels)
    if isinstance(obj, dict) and obj.get("meta", {}).get("command") == "prune":
        rr = restore_resrep(obj, model_cfg, info, _example(test_loader), f"checkpoint {path}")
        deploy, _ = rr.convert(next(iter(test_loader))[0][:64])
        return {"checkpoint": str(path), "masked_macs": rr.macs(), **evaluate(deploy.to(dev), test_loader, device=dev)}
    if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj:  # a converted deploy.pt
        model = deploy_shell(model, unwrap_state_dict(obj), plan=obj.get("plan"))
    else:
        load_weights(model, path)
    return {"checkpoint": str(path), **evaluate(model.to(dev), test_loader, device=dev)}


def run_export(
    data: DataConfig, model_cfg: ModelConfig, *, checkpoint: str, out: str, formats: Sequence[str] = FORMATS
) -> dict[str, Any]:
    """Convert a prune run's ``last.pt`` (masks + compactors) and export the narrow model into ``out``."""
    check_formats(formats)
    out_dir = writable_folder(out)
    obj = load_file(checkpoint)
    require_prune_checkpoint(obj, checkpoint)
    _, test_loader, info = build_loaders(data)
    rr = restore_resrep(obj, model_cfg, info, _example(test_loader), f"checkpoint {checkpoint}")
    verify = next(iter(test_loader))[0][:64]
    extra = {"arch": dataclasses.asdict(model_cfg), "info": _info_meta(info)}
    _, report, results = _export_deploy(rr, verify, out_dir, formats, extra)
    return {
        "max_rel_error": report.max_rel_error,
        "macs_reduction": report.macs_reduction,
        "exports": {r.format: str(r.path) for r in results},
    }


def main(argv: Sequence[str] | None = None) -> int:
    from reparam.graph import GraphTraceError, PruneError

    from ..engine.data import DataError
    from ..engine.export import ExportError
    from ..engine.loop import NonFiniteLossError
    from ..engine.models import ModelError
    from .convert import ConversionError

    ns = build_parser().parse_args(argv)
    known = (
        DataError,
        ModelError,
        CheckpointError,
        NonFiniteLossError,
        ExportError,
        ConversionError,
        GraphTraceError,
        PruneError,
        ValueError,
    )
    try:
        if ns.command == "demo":
            from .demo import run_demo

            run_demo(out=ns.out or None, quiet=ns.quiet)
            return 0
        data, model_cfg = config_from_args(DataConfig, ns), config_from_args(ModelConfig, ns)
        formats = [f for f in getattr(ns, "formats", "").split(",") if f]
        if ns.command == "train":
            result = run_train(
                data,
                model_cfg,
                config_from_args(TrainConfig, ns),
                config_from_args(OptimConfig, ns),
                out=ns.out,
                checkpoint=ns.checkpoint,
                resume=ns.resume,
            )
        elif ns.command == "prune":
            result = run_prune(
                data,
                model_cfg,
                config_from_args(TrainConfig, ns),
                config_from_args(ResRepConfig, ns),
                checkpoint=ns.checkpoint,
                out=ns.out,
                resume=ns.resume,
                formats=formats,
            )
        elif ns.command == "eval":
            result = run_eval(data, model_cfg, checkpoint=ns.checkpoint)
        else:
            result = run_export(data, model_cfg, checkpoint=ns.checkpoint, out=ns.out, formats=formats)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if is_main_process():
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
