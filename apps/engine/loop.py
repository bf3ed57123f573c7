"""The training loop every app shares: `fit` and `evaluate`, device-agnostic, with AMP, channels_last,
DDP and exact resume.

`fit` drives any classifier with any optimizer. A ``hooks`` object (an app's `Method`: ResRep, C-SGD …,
or anything with ``after_backward()``, ``after_step(iteration)``, ``state_dict()``, ``load_state_dict()``)
is called after every backward pass (gradients already all-reduced under DDP, unscaled under fp16) and
after every optimizer step, and its state goes into the checkpoint.

Checkpoints (``checkpoint_dir/last.pt``) are written atomically at the end of every epoch (and every
``checkpoint_every`` iterations if set). They hold the model, optimizer, LR scheduler, grad scaler, hook
state, every RNG, the epoch, the batch position inside it, the running epoch sums and the history, so
``resume=True`` after a kill continues exactly as an uninterrupted run would (the sampler skips the
batches already seen; mid-epoch positions are exact with ``workers=0``, epoch boundaries always).
A non-finite loss stops training with `NonFiniteLossError` before the step is taken; the last good
checkpoint stays in place.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from reparam.atomic import atomic_save, atomic_write_text

from .checkpoint import CheckpointError, load_file, rng_state, set_rng_state, settings_diff
from .models import load_state_dict_checked

__all__ = [
    "TrainConfig",
    "OptimConfig",
    "Hooks",
    "Method",
    "NonFiniteLossError",
    "fit",
    "evaluate",
    "resolve_device",
    "init_distributed",
    "is_main_process",
    "autocast",
    "sgd",
    "cosine_schedule",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "last.pt"
_FORMAT = "reparam.resrep.fit/1"
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """How a run trains (the optimizer's settings live in `OptimConfig` or the method's config)."""

    epochs: int = 30
    """Passes over the training set; the lr follows a per-iteration cosine from lr to 0 over them."""
    device: str = "auto"
    """``auto`` (CUDA when present, the local rank's GPU under torchrun), ``cpu``, ``cuda:1`` …"""
    amp: str = "none"
    """Mixed precision: ``none``, ``bf16`` or ``fp16`` (fp16 uses a GradScaler)."""
    channels_last: bool = False
    """NHWC memory format for the model and the batches."""
    seed: int = 0
    """Seeds python, numpy and torch before the model is built."""
    eval_every: int = 1
    """Validate every N epochs (and always after the last)."""
    checkpoint_every: int = 0
    """Also checkpoint every N iterations (0: only at epoch ends)."""
    progress: bool = True
    """tqdm progress bars on the main process."""


@dataclass
class OptimConfig:
    """Plain SGD for base training."""

    lr: float = 0.1
    """Base learning rate (a cosine to 0 per iteration)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 on conv/linear weights only; norm weights and biases are not decayed."""
    nesterov: bool = False
    """Nesterov momentum."""


class Hooks(Protocol):
    """What `fit` calls on the object it is given as ``hooks``."""

    def after_backward(self) -> None:
        """Edit the gradients (all-reduced, unscaled) before the optimizer step."""

    def after_step(self, iteration: int) -> None:
        """Act after optimizer step `iteration` (0-based): masks, schedules, projections."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (goes into the checkpoint)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""


class Method(Hooks, Protocol):
    """A pruning method over the shared engine: the model it trains (with whatever it added to it),
    the optimizer parameter groups it needs, the hooks `fit` calls, and the conversion into the plain
    deployable model it promises, verified."""

    model: nn.Module

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (lr, momentum, weight decay per group) for ``torch.optim.SGD``."""

    def convert(self, verify_inputs: Any = None) -> tuple[nn.Module, Any]:
        """The deployable model and a report of how exactly it matches the trained one."""


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss; the step was not taken and the last good checkpoint is kept."""


def sgd(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights (ndim > 1) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
    )


def init_distributed() -> tuple[int, int, int]:
    """Join the process group that `torchrun` describes in the environment (NCCL on CUDA, gloo on CPU).

    Returns (rank, world_size, local_rank); (0, 1, 0) when not launched by torchrun.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, local


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not _distributed() or dist.get_rank() == 0


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → this process's GPU when CUDA is present (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` (``none``: a no-op)."""
    if amp not in _AMP:
        raise ValueError(f"amp must be one of {sorted(_AMP)}, got {amp!r}")
    return nullcontext() if _AMP[amp] is None else torch.autocast(device.type, dtype=_AMP[amp])


def _to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device | None = None,
    amp: str = "none",
    channels_last: bool = False,
    loss_fn: Callable | None = None,
) -> dict[str, float]:
    """Mean loss and top-1 accuracy (in %) of `model` over `loader`; the model is left in eval mode."""
    device = device or next(model.parameters()).device
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(x)
        loss_sum += loss_fn(out.float(), y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    return {"loss": float(loss_sum) / max(n, 1), "acc": 100.0 * float(correct) / max(n, 1), "n": n}


def _set_epoch(loader, epoch: int, start_batch: int) -> int:
    """Point the sampler at `epoch`; returns how many batches the caller must still skip by hand."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        try:
            sampler.set_epoch(epoch, start_batch)
            return 0
        except TypeError:  # e.g. DistributedSampler: epoch only
            sampler.set_epoch(epoch)
    return start_batch


def _write_logs(history: list[dict[str, Any]], log_dir: Path) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(buf.getvalue(), log_dir / "log.csv")


def _tensorboard(log_dir: Path | None, purge_step: int):
    if log_dir is None or not is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(log_dir / "tb"), purge_step=purge_step)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration cosine from the optimizer's learning rates to 0 over ``total_steps`` (closed form, so
    a resumed run extended to more steps follows the longer cosine from where it stands)."""
    span = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, span) / span)))


def _follow_longer_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, source: Path) -> None:
    """A run extended on resume: the learning rates of the step it resumes at, on the new (longer)
    schedule; the checkpoint's restored the old schedule's."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise CheckpointError(
            f"cannot extend the run of {source}: its {type(scheduler).__name__} keeps its own length; "
            "use a LambdaLR schedule (the default) or resume with the same --epochs"
        )
    step = scheduler.last_epoch
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _new_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0, "n": 0, "time": 0.0}


@dataclass
class _Position:
    """Where a run stands: the epoch, the batches of it already taken, the iterations in all, the
    per-epoch history and the running sums of the epoch in progress."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=_new_sums)


@dataclass
class _Run:
    """The state objects one `fit` trains and checkpoints, with the settings a checkpoint must match."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    hooks: Hooks | None
    ckpt_path: Path | None
    meta: dict[str, Any]
    total_steps: int

    def update(self, loss: torch.Tensor, step: int) -> None:
        """One optimizer step from ``loss``: backward (DDP all-reduces), unscale (fp16),
        ``hooks.after_backward()``, step, scheduler step, ``hooks.after_step(step)``."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.hooks is not None:
            self.hooks.after_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.hooks is not None:
            self.hooks.after_step(step)

    def save(self, pos: _Position) -> None:
        """Write the checkpoint of ``pos`` atomically (main process only; no-op without a directory)."""
        if self.ckpt_path is None or not is_main_process():
            return
        payload = {
            "format": _FORMAT,
            "meta": self.meta,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "hooks": self.hooks.state_dict() if self.hooks is not None else None,
            "rng": rng_state(),
            "epoch": pos.epoch,
            "total_steps": self.total_steps,
            "step_in_epoch": pos.batch,
            "step": pos.step,
            "history": pos.history,
            "sums": pos.sums,
        }
        atomic_save(payload, self.ckpt_path)

    def restore(self, device: torch.device) -> tuple[_Position, Any]:
        """Load the checkpoint into every state object; returns the position and, when it lies inside an
        epoch, the RNG state to re-apply once that epoch's batch iterator exists (else None)."""
        path = self.ckpt_path
        ck = load_file(path, map_location=device)
        if not isinstance(ck, dict) or ck.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is not a training checkpoint of this app (format {_FORMAT})")
        differ = settings_diff(ck.get("meta", {}), self.meta)
        if differ:
            raise CheckpointError(
                f"{path} was written by a run with other settings ({'; '.join(differ)}); "
                "resume with the same settings or use a fresh --out"
            )
        saved_steps = int(ck.get("total_steps", self.total_steps))
        if self.total_steps < saved_steps:
            raise CheckpointError(
                f"{path} is a run of {saved_steps} iterations; a resumed run can be extended "
                f"(more --epochs), not shortened to {self.total_steps}"
            )
        load_state_dict_checked(self.model, ck["model"], f"checkpoint {path}")
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.total_steps > saved_steps:
            _follow_longer_schedule(self.scheduler, path)
        self.scaler.load_state_dict(ck["scaler"])
        if self.hooks is not None:
            self.hooks.load_state_dict(ck["hooks"])
        set_rng_state(ck["rng"])
        pos = _Position(ck["epoch"], ck["step_in_epoch"], ck["step"], list(ck["history"]), dict(ck["sums"]))
        return pos, (ck["rng"] if pos.batch else None)


def _check_finite(loss: torch.Tensor, pos: _Position, batch: int, ckpt_path: Path | None) -> None:
    """`NonFiniteLossError` before the update when any rank's loss is NaN/inf (all ranks agree)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if _distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if bool(finite):
        return
    where = f"epoch {pos.epoch + 1}, batch {batch + 1}, iteration {pos.step + 1}"
    kept = f"; the last good checkpoint {ckpt_path} is kept" if ckpt_path and ckpt_path.exists() else ""
    raise NonFiniteLossError(
        f"loss is {loss.item()} at {where}: stopped before the update{kept}. Lower the learning rate or use amp=bf16/none."
    )


def _epoch_row(pos: _Position, lr: float) -> dict[str, Any]:
    sums = pos.sums
    return {
        "epoch": pos.epoch + 1,
        "step": pos.step,
        "lr": lr,
        "train_loss": sums["loss"] / max(sums["n"], 1),
        "train_acc": 100.0 * sums["correct"] / max(sums["n"], 1),
        "epoch_time_s": sums["time"],
    }


def _publish(row: dict[str, Any], history: list[dict[str, Any]], log_dir: Path | None, writer, progress: bool) -> None:
    """Main process: ``log.csv``, TensorBoard scalars and the progress line of an epoch's row."""
    if log_dir is not None:
        _write_logs(history, log_dir)
        if writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(k, v, row["step"])
            writer.flush()
    if progress:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
        tqdm.write(" ".join(f"{k}={v}" for k, v in shown.items()))


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    hooks: Hooks | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    amp: str = "none",
    channels_last: bool = False,
    log_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    eval_every: int = 1,
    checkpoint_every: int = 0,
    progress: bool = True,
    metrics: Callable[[], Mapping[str, float]] | None = None,
    loss_fn: Callable | None = None,
    meta: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Train `model` for `epochs` and return the per-epoch history (the rows of ``log.csv``).

    ``max_steps`` ends training after that many iterations in all, inside an epoch if need be (that
    epoch's row is logged, validated and checkpointed as an epoch end); the default cosine then spans
    ``max_steps``.

    A model may return a tuple in training (several heads or views): ``loss_fn`` gets all of it, the
    training accuracy counts its first entry. A run resumed with more ``epochs`` than it was started
    with is extended: training goes on, the default cosine (any LambdaLR) spans the longer run from the
    step it resumes at; fewer epochs are refused.

    Per iteration: forward under `autocast`, loss, finite check (all ranks agree), backward (DDP
    all-reduces), unscale (fp16), ``hooks.after_backward()``, optimizer step, scheduler step
    (default: cosine from the optimizer's lr to 0 over all iterations), ``hooks.after_step(i)`` with
    i = the 0-based index of the iteration just taken. `metrics()` adds columns to each epoch's row (e.g. MACs).
    `meta` is stored in the checkpoint and must match on resume (guards against resuming another run).
    """
    device = torch.device(device) if isinstance(device, str) else (device or resolve_device())
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    _set_epoch(train_loader, 0, 0)
    iters_per_epoch = len(train_loader)
    total_steps = epochs * iters_per_epoch if max_steps is None else min(max_steps, epochs * iters_per_epoch)
    run = _Run(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler if scheduler is not None else cosine_schedule(optimizer, total_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=(amp == "fp16")),
        hooks=hooks,
        ckpt_path=Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None,
        meta=dict(meta or {}),
        total_steps=total_steps,
    )
    log_dir = Path(log_dir) if log_dir is not None else None
    pos, resumed_rng = _Position(), None
    if resume and run.ckpt_path is not None and run.ckpt_path.exists():
        pos, resumed_rng = run.restore(device)

    net = model
    if _distributed():
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = _tensorboard(log_dir, pos.step)
    main = is_main_process()
    try:
        while pos.epoch < epochs and pos.step < total_steps:
            skip = _set_epoch(train_loader, pos.epoch, pos.batch)
            batches = itertools.islice(iter(train_loader), skip, None)
            if resumed_rng is not None:  # creating the iterator drew from the RNG; mid-epoch it must not count
                set_rng_state(resumed_rng)
                resumed_rng = None
            model.train()
            t0 = time.perf_counter()
            bar = tqdm(
                batches,
                total=iters_per_epoch,
                initial=pos.batch,
                disable=not (progress and main),
                desc=f"epoch {pos.epoch + 1}/{epochs}",
                leave=False,
                dynamic_ncols=True,
            )
            for b, (x, y) in enumerate(bar, start=pos.batch):
                x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
                with autocast(device, amp):
                    out = net(x)
                    out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
                    loss = loss_fn(out, y)
                _check_finite(loss, pos, b, run.ckpt_path)
                run.update(loss, pos.step)
                pos.step += 1
                sums = pos.sums
                sums["loss"] += float(loss.detach()) * len(y)
                logits = out[0] if isinstance(out, tuple) else out  # a tuple's first entry: the deployed logits
                sums["correct"] += int((logits.detach().argmax(1) == y).sum())
                sums["n"] += len(y)
                if main and progress and b % 10 == 0:
                    bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if pos.step >= total_steps:
                    break
                if checkpoint_every and pos.step % checkpoint_every == 0 and b + 1 < iters_per_epoch:
                    sums["time"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    pos.batch = b + 1
                    run.save(pos)
            bar.close()
            pos.sums["time"] += time.perf_counter() - t0
            row = _epoch_row(pos, optimizer.param_groups[0]["lr"])
            last = pos.epoch + 1 == epochs or pos.step >= total_steps
            if val_loader is not None and ((pos.epoch + 1) % eval_every == 0 or last):
                ev = evaluate(model, val_loader, device=device, amp=amp, channels_last=channels_last, loss_fn=loss_fn)
                row.update(val_loss=ev["loss"], val_acc=ev["acc"])
            if metrics is not None:
                row.update(metrics())
            pos.history.append(row)
            pos.epoch, pos.batch, pos.sums = pos.epoch + 1, 0, _new_sums()
            run.save(pos)
            if main:
                _publish(row, pos.history, log_dir, writer, progress)
    finally:
        if writer is not None:
            writer.close()
    return pos.history
