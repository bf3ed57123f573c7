"""The commands every app's command line shares: ``train``, ``prune``, ``eval``, ``export`` and ``demo``.

An app (`App`) names its method: the config dataclass whose fields become the ``prune`` flags, how to
build the method on a base model and how to restore it from a prune run's checkpoint. The method object
(`apps.engine.loop.Method`) brings ``optimizer()`` and ``convert(verify_inputs)``, and optionally
``lr_scheduler(optimizer)`` (else a cosine over the run), ``epoch_metrics()`` (columns of ``log.csv``),
``summary()`` (fields of ``summary.json``), ``check_target()`` (raises when the run missed its target) and
``extend(total_iters)`` (a resumed run given more ``--epochs``: keep the plan made for the first length,
lengthen the last phase; without it a run cannot be extended) and ``loss(output, labels)`` (else cross
entropy; a model that returns a tuple in training gets its whole output here).

- ``train --out DIR``: train a base model (optionally from ``--checkpoint``); ``DIR/last.pt`` is the
  resumable checkpoint and also the base weights that ``prune --checkpoint`` reads.
- ``prune --checkpoint BASE --out DIR``: the method to its MACs target, then convert, verify, evaluate and
  export the narrow model (``DIR/deploy.{pt,ts,onnx}``), with ``summary.json`` and plots.
- ``eval --checkpoint FILE``: accuracy of a base checkpoint (ours or a published CIFAR ResNet file), a
  prune run's ``last.pt``, a converted ``deploy.pt`` or a TorchScript ``deploy.ts``.
- ``export --checkpoint DIR/last.pt --out OUT``: convert a prune run's checkpoint and export it.
- ``demo``: the app's offline demonstration on scikit-learn digits.

Under ``torchrun`` every command runs distributed (NCCL on CUDA, gloo on CPU). Bad input (missing data,
a checkpoint of another architecture or method, a corrupt file, an unusable ``--out``, a NaN loss, a
target outside (0, 1), an untraceable model) exits with status 2 and a one-line ``error:`` message;
nothing is written before the inputs have been checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reparam.atomic import atomic_write_text
from reparam.graph import GraphTraceError, PruneError, flops

from .checkpoint import CheckpointError, check_run_folder, load_file, writable_folder
from .cli import add_dataclass_args, config_from_args
from .data import DataConfig, DataError, DataInfo, build_loaders
from .export import FORMATS, ExportError, check_formats, export_model
from .loop import (
    CHECKPOINT_NAME,
    NonFiniteLossError,
    OptimConfig,
    TrainConfig,
    evaluate,
    fit,
    init_distributed,
    is_main_process,
    resolve_device,
    sgd,
)
from .models import (
    ModelConfig,
    ModelError,
    build_model,
    deploy_shell,
    load_state_dict_checked,
    load_weights,
    unwrap_state_dict,
)

__all__ = [
    "App",
    "build_parser",
    "main",
    "require_prune_checkpoint",
    "run_eval",
    "run_export",
    "run_prune",
    "run_train",
]


@dataclass(frozen=True)
class App:
    """A pruning app on the shared command line."""

    prog: str
    """Its command (``resrep``, ``csgd``) and the key of its settings in a prune checkpoint's metadata."""
    title: str
    """Its name in messages and plots."""
    description: str
    """One line for ``--help``."""
    config: type
    """The config dataclass of the method (its fields are the ``prune`` flags)."""
    make: Callable[..., Any]
    """``make(base_model, example, config, iters_per_epoch, total_iters)`` → the method object."""
    demo: Callable[[str | None, bool], Any]
    """``demo(out, quiet)``: the offline demonstration."""
    errors: tuple[type[BaseException], ...] = ()
    """The app's own errors that exit with status 2."""
    views: Callable[[Any], int] = lambda config: 1
    """``views(config)``: independently augmented views of every training image the method trains on
    (its model then gets batches of shape (B, views, C, H, W)); 1 for most methods, 2 for CR-SFP."""


def require_prune_checkpoint(obj: Any, source: str, app: App) -> None:
    """CheckpointError unless `obj` (a loaded file) is a prune run's checkpoint of `app`."""
    meta = obj.get("meta", {}) if isinstance(obj, Mapping) else {}
    if meta.get("command") != "prune":
        raise CheckpointError(f"{source} is not a prune run's checkpoint (OUT/last.pt of `{app.prog} prune`)")
    if app.prog not in meta:
        other = next((k for k in ("resrep", "csgd", "sfp") if k in meta), "another method")
        raise CheckpointError(f"{source} was written by `{other} prune`, not by `{app.prog} prune`; use `{other}`")


def restore(
    app: App, checkpoint: Mapping[str, Any], model_cfg: ModelConfig, info: DataInfo, example: torch.Tensor, source: str
):
    """The method of a prune run's checkpoint (already loaded): the model rebuilt, the method's state
    restored, ready for ``convert()``."""
    require_prune_checkpoint(checkpoint, source, app)
    remedy = f"it was written by another version of `{app.prog} prune`; rerun it with this one"
    missing = [key for key in ("model", "hooks") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{source} has no {' or '.join(missing)} entry: {remedy}")
    try:
        config = app.config(**checkpoint["meta"][app.prog])
    except TypeError as e:  # a field this version does not know
        raise CheckpointError(f"{source}: its {app.prog} settings do not fit this version ({e}): {remedy}") from None
    model = build_model(model_cfg, num_classes=info.num_classes, in_channels=info.in_channels)
    method = app.make(model, example, config, None, None)
    load_state_dict_checked(method.model, checkpoint["model"], source)
    try:
        method.load_state_dict(checkpoint["hooks"])
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: its {app.prog} state lacks or mistypes {e}: {remedy}") from None
    return method


# ----------------------------------------------------------------------------------------------- parser
def build_parser(app: App) -> argparse.ArgumentParser:
    groups = {
        "train": (DataConfig, ModelConfig, TrainConfig, OptimConfig),
        "prune": (DataConfig, ModelConfig, TrainConfig, app.config),
        "eval": (DataConfig, ModelConfig),
        "export": (DataConfig, ModelConfig),
    }
    parser = argparse.ArgumentParser(
        prog=app.prog, description=app.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train a base model",
        "prune": f"{app.title} from a checkpoint to a MACs target",
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
        for cls in groups[name]:
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
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _example(loader) -> torch.Tensor:
    """One input image: MACs are counted for the traced batch, so this makes them per image."""
    x, _ = next(iter(loader))
    return x[:1]


def _summary_write(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(json.dumps(summary, indent=2, default=float) + "\n", out / "summary.json")


def _meta(data: DataConfig, model: ModelConfig, train: TrainConfig, info: DataInfo, **more: Any) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it (and what `export` needs to rebuild it);
    not the epochs: `fit` lets a resumed run grow to more of them (extending it)."""
    return {
        "model": dataclasses.asdict(model),
        "info": dataclasses.asdict(info),
        "data": {k: getattr(data, k) for k in ("dataset", "batch_size", "train_limit", "augment")},
        "seed": train.seed,
        **more,
    }


def _planned_epochs(out_dir: Path, resume: bool, epochs: int) -> int:
    """The epochs a prune run's method planned its structure for: ``epochs`` for a new run, the first
    run's for a resumed one. A run resumed with more epochs keeps that plan (mask rounds, collapse) and
    lengthens its last phase, the fine-tuning, through the method's ``extend(total_iters)``."""
    if not resume:
        return epochs
    saved = load_file(out_dir / CHECKPOINT_NAME)
    meta = saved.get("meta", {}) if isinstance(saved, Mapping) else {}
    return int(meta.get("plan_epochs", epochs))


def _start_run(data: DataConfig, train: TrainConfig, out: str, resume: bool, views: int = 1):
    """Common start of `train` and `prune`: process group, output folder, device, seeds, loaders."""
    rank, world, _ = init_distributed()
    out_dir = check_run_folder(out, resume)
    device = resolve_device(train.device)
    _seed(train.seed)
    loaders = build_loaders(
        data, seed=train.seed, rank=rank, world_size=world, pin_memory=device.type == "cuda", views=views
    )
    return rank, world, out_dir, device, loaders


def _fit(model, loaders, train: TrainConfig, out_dir: Path, device: torch.device, resume: bool, **options: Any):
    """`fit` as a command runs it: the `TrainConfig` settings, checkpoints and logs in `out_dir`."""
    return fit(
        model,
        *loaders,
        epochs=train.epochs,
        checkpoint_dir=out_dir,
        resume=resume,
        amp=train.amp,
        channels_last=train.channels_last,
        log_dir=out_dir,
        device=device,
        eval_every=train.eval_every,
        checkpoint_every=train.checkpoint_every,
        progress=train.progress,
        **options,
    )


def _export_deploy(method, verify: torch.Tensor, out_dir: Path, formats: Sequence[str], extra: dict[str, Any]):
    deploy, report = method.convert(verify)
    extra = {**extra, "plan": deploy.meta["reparam.plan"].to_json()}  # rebuilds it exactly (`deploy_shell`)
    results = export_model(
        deploy, verify, out_dir, name="deploy", formats=formats, tolerance=max(report.tolerance, 1e-5), extra=extra
    )
    return deploy, report, results


# ----------------------------------------------------------------------------------------------- commands
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
    report = flops(model, _example(test_loader))
    t0 = time.perf_counter()
    initial = evaluate(model.to(device), test_loader, device=device) if checkpoint else None
    history = _fit(
        model,
        (train_loader, test_loader),
        train,
        out_dir,
        device,
        resume,
        optimizer=sgd(model, optim),
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


def run_prune(
    app: App,
    data: DataConfig,
    model_cfg: ModelConfig,
    train: TrainConfig,
    method_cfg: Any,
    *,
    checkpoint: str,
    out: str,
    resume: bool = False,
    formats: Sequence[str] = FORMATS,
) -> dict[str, Any]:
    """The app's method from ``checkpoint`` into ``out``: train, convert, verify, evaluate, export.

    A run whose ``check_target()`` fails still converts and writes everything (``summary.json`` says
    ``target_met: false``), then raises that error (exit status 2)."""
    check_formats(formats)
    rank, world, out_dir, device, (train_loader, test_loader, info) = _start_run(
        data, train, out, resume, app.views(method_cfg)
    )
    base = build_model(model_cfg, num_classes=info.num_classes, in_channels=info.in_channels)
    load_weights(base, checkpoint)
    base_eval = evaluate(base.to(device), test_loader, device=device, amp=train.amp)
    iters = len(train_loader)
    plan_epochs = _planned_epochs(out_dir, resume, train.epochs)
    method = app.make(base.to(device), _example(test_loader).to(device), method_cfg, iters, plan_epochs * iters)
    if train.epochs > plan_epochs:
        if not hasattr(method, "extend"):
            raise CheckpointError(f"{app.title} cannot extend a run: resume {out_dir} with --epochs {plan_epochs}")
        method.extend(train.epochs * iters)
    optimizer = method.optimizer()
    scheduler = method.lr_scheduler(optimizer) if hasattr(method, "lr_scheduler") else None
    t0 = time.perf_counter()
    history = _fit(
        method.model,
        (train_loader, test_loader),
        train,
        out_dir,
        device,
        resume,
        optimizer=optimizer,
        scheduler=scheduler,
        hooks=method,
        metrics=getattr(method, "epoch_metrics", None),
        loss_fn=getattr(method, "loss", None),
        meta=_meta(
            data,
            model_cfg,
            train,
            info,
            command="prune",
            plan_epochs=plan_epochs,
            **{app.prog: dataclasses.asdict(method_cfg)},
        ),
    )
    wall = time.perf_counter() - t0
    missed = None
    if hasattr(method, "check_target"):
        try:
            method.check_target()
        except ValueError as e:
            missed = e
    summary: dict[str, Any] = {}
    if is_main_process():
        from .plots import plot_history, plot_widths

        verify = next(iter(test_loader))[0][:64].to(device)
        extra = {"arch": dataclasses.asdict(model_cfg), "info": dataclasses.asdict(info)}
        deploy, report, results = _export_deploy(method, verify, out_dir, formats, extra)
        pruned_eval = evaluate(deploy, test_loader, device=device, amp=train.amp)
        summary = {
            "command": "prune",
            "method": app.prog,
            "arch": model_cfg.arch,
            "dataset": data.dataset,
            "epochs": train.epochs,
            "base_accuracy": base_eval["acc"],
            "pruned_accuracy": pruned_eval["acc"],
            "accuracy_drop": base_eval["acc"] - pruned_eval["acc"],
            "trained_model_accuracy": history[-1].get("val_acc") if history else None,
            **report.as_dict(),
            **(method.summary() if hasattr(method, "summary") else {}),
            "exports": {
                r.format: {"path": str(r.path), "max_rel_error": r.max_rel_error, "checked_with": r.checked_with}
                for r in results
            },
            "wall_time_s": wall,
            "world_size": world,
            "config": dataclasses.asdict(method_cfg),
            "target_met": missed is None,
        }
        _summary_write(out_dir, summary)
        if hasattr(report, "widths_before"):
            plot_widths(
                report.widths_before,
                report.widths_after,
                out_dir / "widths.png",
                title=f"{model_cfg.arch}: widths before/after {app.title}",
            )
        plot_history(history, out_dir / "history.png", title=f"{app.title} {model_cfg.arch} on {data.dataset}")
    if missed is not None:
        raise missed
    return summary


def run_eval(
    app: App, data: DataConfig, model_cfg: ModelConfig, *, checkpoint: str, device: str = "auto"
) -> dict[str, Any]:
    """Accuracy of any checkpoint the app writes or reads (see the module docstring)."""
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
        method = restore(app, obj, model_cfg, info, _example(test_loader), f"checkpoint {path}")
        deploy, _ = method.convert(next(iter(test_loader))[0][:64])
        return {"checkpoint": str(path), **evaluate(deploy.to(dev), test_loader, device=dev)}
    if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj:  # a converted deploy.pt
        model = deploy_shell(model, unwrap_state_dict(obj), plan=obj.get("plan"))
    else:
        load_weights(model, path)
    return {"checkpoint": str(path), **evaluate(model.to(dev), test_loader, device=dev)}


def run_export(
    app: App, data: DataConfig, model_cfg: ModelConfig, *, checkpoint: str, out: str, formats: Sequence[str] = FORMATS
) -> dict[str, Any]:
    """Convert a prune run's ``last.pt`` and export the narrow model into ``out``."""
    check_formats(formats)
    out_dir = writable_folder(out)
    obj = load_file(checkpoint)
    require_prune_checkpoint(obj, checkpoint, app)
    _, test_loader, info = build_loaders(data)
    method = restore(app, obj, model_cfg, info, _example(test_loader), f"checkpoint {checkpoint}")
    verify = next(iter(test_loader))[0][:64]
    extra = {"arch": dataclasses.asdict(model_cfg), "info": dataclasses.asdict(info)}
    _, report, results = _export_deploy(method, verify, out_dir, formats, extra)
    return {
        "max_rel_error": report.max_rel_error,
        "macs_reduction": report.macs_reduction,
        "exports": {r.format: str(r.path) for r in results},
    }


def main(app: App, argv: Sequence[str] | None = None) -> int:
    """Run the command `argv` names; known errors print one ``error:`` line and return 2."""
    ns = build_parser(app).parse_args(argv)
    known = (
        DataError,
        ModelError,
        CheckpointError,
        NonFiniteLossError,
        ExportError,
        GraphTraceError,
        PruneError,
        ValueError,
        *app.errors,
    )
    try:
        if ns.command == "demo":
            if ns.out:
                writable_folder(ns.out)
            app.demo(ns.out or None, ns.quiet)
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
                app,
                data,
                model_cfg,
                config_from_args(TrainConfig, ns),
                config_from_args(app.config, ns),
                checkpoint=ns.checkpoint,
                out=ns.out,
                resume=ns.resume,
                formats=formats,
            )
        elif ns.command == "eval":
            result = run_eval(app, data, model_cfg, checkpoint=ns.checkpoint)
        else:
            result = run_export(app, data, model_cfg, checkpoint=ns.checkpoint, out=ns.out, formats=formats)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if is_main_process():
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2, default=float))
    return 0


def entry_points(app: App) -> tuple[Callable[[], argparse.ArgumentParser], Callable[[Sequence[str] | None], int]]:
    """``(build_parser, main)`` of `app`'s command line, for its ``cli`` module and installed script."""

    def app_parser() -> argparse.ArgumentParser:
        return build_parser(app)

    def app_main(argv: Sequence[str] | None = None) -> int:
        return main(app, argv)

    return app_parser, app_main
