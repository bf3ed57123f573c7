"""ResRep against peers on real CIFAR-10 (JPEG q75): top-1, MACs, params and CPU latency at equal budgets.

Every method starts from the same base (the published option-A CIFAR ResNet fine-tuned with one fixed
recipe), gets the same budget of N = E epochs of iterations, the same data (batch 64, the same
augmentation, the data order fixed by the seed), the same MACs target T (the fraction of the original
MACs kept; 0.471 is the ResRep paper's 52.9% reduction) and the same optimizer (SGD, lr 0.02, momentum
0.9, weight decay 1e-4, channels_last). **One fine-tuning rule for all:** the lr is constant while a
method is still deciding its structure and, from the last mask change / the prune on, follows a cosine
from 0.02 to 0 over the iterations left:

  a  resrep-paper     ResRep (`apps.resrep prune --mode paper`, default recipe ``auto``): compactors on the
                      internal layer of each block only, the paper's scope. At these budgets ``auto`` runs
                      the budget recipe: masks front-loaded over the first 25% of N, frozen at 30%.
  b  resrep-residual  The same with ``--mode residual`` (ours): compactors on every prunable group,
                      residual streams through the option-A zero-padding included.
  c  tp-groupnorm     Torch-Pruning 1.6.1 `GroupNormPruner`: group-norm sparse training for the same first
                      30% of N, iterative global pruning until the MACs meet T, fine-tuning for the other
                      70%. Internal layers only, see `tp_ignored_layers`.
  d  l1-oneshot       L1-norm filter ranking, normalised per group and ranked globally, one cut to T with
                      `reparam.graph.prune` at iteration 0, fine-tuning for all N iterations.
  e  csgd             C-SGD (`apps.csgd prune`): k-means clusters on every prunable group (residual groups
                      sharing one clustering), per group as many as the widths that meet T when the
                      groups' filter merge costs are ranked across the network, collapsed by the
                      centripetal rule over the first 30% of N (its budget strength, Nesterov momentum, the
                      spec's bias lr x2), then the cosine; merged exactly at the end.
  f  sfp              SFP (`apps.sfp prune --method sfp`): the filters of the lowest L2 norm zeroed in every
                      internal layer (the published layer sets) before training and after every epoch,
                      free to regrow in between; one prune ratio for every layer, the one whose exported
                      model meets T; exported narrow and exact (`apps.sfp.export`).
  g  cr-sfp           CR-SFP (`--method cr-sfp`): the same masks, the pruned and the unpruned network
                      trained together on two augmented views of every image (CE + CE + bidirectional KL).
                      Both zero filters up to the last epoch, so their lr follows the cosine over all N.

Each (method, target) runs once per seed (``--seeds``, default 0,1,2); the report gives the mean and the
spread (sample standard deviation) over the seeds. ``--ablation`` instead runs variants of (b) at the first
target and seed, each with one component of the budget recipe switched off (`ABLATIONS`); ``--ablation 0,10``
runs only those entries (by position), e.g. the budget recipe against the paper recipe at a long budget,
where ``auto`` would pick one of them (the reference entry forces ``--recipe budget``).

Every run is a subprocess (the `apps.resrep` CLI for the base and for a/b, the `apps.csgd` CLI for e, `apps.sfp` for f/g,
this script's ``--worker`` mode for c/d) with its log in ``<run dir>.log``; a run is done when its folder holds ``summary.json``
and is resumed from its atomic checkpoint otherwise, so the benchmark can be killed and rerun at any
time with nothing lost; ``--jobs`` runs that many side by side (``--threads`` each). A method that
cannot reach a target (e.g. paper mode at a low target: "out of reach") is recorded with its error
message instead of stopping the benchmark.

The report counts MACs and parameters of every final model with one counter
(`reparam.graph.trace(...).macs()/params()`, per image) after folding every BatchNorm with
`reparam.merge`, and times the first seed's models and the base in one interleaved loop
(`common.latencies`: eval mode, no_grad, warm-up, median of rounds) at batch 1 and 64 on the CPU.
Training time is the sum of the per-epoch training times in the runs' ``log.csv`` (kept across resumes;
evaluation and export excluded). Results: a markdown table on stdout, ``<results>/prune_cifar_<mode>_e<E>.json``
(``..._ablation.json`` for the ablation) and, with more than one target, ``..._curve.png``.
Accuracies are on CIFAR-10 (JPEG q75): compare drops and MACs reductions with papers, not absolute top-1.

    python benchmarks/prune_cifar.py --data ../shared/data [--mode quick|full] [--methods a,b,c,d]
        [--targets 0.471,0.35] [--epochs 1] [--seeds 0,1,2] [--jobs 2 --threads 1] [--ablation [I,J,...]]
        [--train-limit N --test-limit N]

quick = CIFAR ResNet-20, full = ResNet-56 (option A). ``--train-limit/--test-limit`` keep the first N
images (smoke runs); such runs go to folders suffixed ``-limit<N>x<M>`` so they never mix with real ones.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import fcntl
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import latencies, machine_meta, write_json
from torch import nn

import reparam
from apps.csgd.app import APP as CSGD_APP
from apps.engine.checkpoint import load_file
from apps.engine.commands import App, restore
from apps.engine.data import DataConfig, DataInfo, build_loaders
from apps.engine.loop import CHECKPOINT_NAME, NonFiniteLossError, OptimConfig, evaluate, fit, resolve_device, sgd
from apps.engine.models import (
    ModelConfig,
    build_model,
    deploy_shell,
    load_state_dict_checked,
    load_weights,
    unwrap_state_dict,
)
from apps.engine.selection import select_masks
from apps.resrep.app import APP as RESREP_APP
from apps.resrep.config import ResRepConfig
from apps.sfp.app import APP as SFP_APP
from reparam.atomic import atomic_save
from reparam.graph import ChannelGroup, load_pruned, prune, save_pruned, trace

REPO = Path(__file__).resolve().parents[1]
ARCHS = {"quick": "resnet20", "full": "resnet56"}
METHODS = {
    "a": "resrep-paper",
    "b": "resrep-residual",
    "c": "tp-groupnorm",
    "d": "l1-oneshot",
    "e": "csgd",
    "f": "sfp",
    "g": "cr-sfp",
}
SCOPES = {
    "resrep-paper": "internal layers of blocks",
    "resrep-residual": "all prunable groups",
    "tp-groupnorm": "internal layers of blocks (TP cannot prune through option-A pads)",
    "l1-oneshot": "all prunable groups",
    "csgd": "all prunable groups (residual groups share one clustering)",
    "sfp": "internal layers of blocks (the published layer sets)",
    "cr-sfp": "internal layers of blocks (the published layer sets)",
}
DEFAULT_TARGETS = (0.471, 0.35)
BATCH = 64
BASE_EPOCHS, BASE_LR = 2, 0.01
FINETUNE = OptimConfig(lr=0.02, momentum=0.9, weight_decay=1e-4)  # every method's optimizer
# The structure-finding phase of (c): the same fraction of the run as ResRep's budget recipe spends before
# its masks freeze, so that both fine-tune the final structure for the same 70% of the iterations.
PRUNE_FRACTION = ResRepConfig().freeze_fraction
# Torch-Pruning: reg 5e-4 as in TP's own CIFAR ResNet-56 scripts for its group-norm method with global
# pruning (benchmarks/scripts/prune/cifar/group_pruner.sh: `--method group_norm --global-pruning --reg 5e-4`);
# ratio 0.9 over 400 steps removes ~0.2% of the candidate channels per step, so the MACs walk to the target
# in fine steps (pruning stops at the first step that meets it; 0.9 only bounds how far it may go).
TP_REG, TP_RATIO, TP_STEPS = 5e-4, 0.9, 400
# (b) with one component of the budget recipe switched off (`apps.resrep.config`), as extra CLI flags.
# Every variant but the last names the budget recipe, so that it stays the budget recipe (the one it
# varies) at budgets where ``auto`` picks the paper's.
_BUDGET = ("--recipe", "budget")
ABLATIONS: dict[str, tuple[str, ...]] = {
    "budget recipe (b)": _BUDGET,
    "score: Taylor normalised per group": (*_BUDGET, "--score-normalize"),
    "score: not per MAC": (*_BUDGET, "--no-score-per-mac"),
    "score: compactor-row norm (the paper's metric)": (*_BUDGET, "--score", "norm"),
    "score: fused filter-row norm": (*_BUDGET, "--score", "fused"),
    "kept rows: 10x lasso, residual groups too": (*_BUDGET, "--lasso-strength", "1e-3", "--residual-lasso"),
    "kept rows: residual-coupled compactors trained": (*_BUDGET, "--train-residual-compactors"),
    "forgetting: masked rows zeroed at once": (*_BUDGET, "--freeze-fraction", "0.251"),
    "masking: spread over 55% of the run": (*_BUDGET, "--mask-end-fraction", "0.55", "--freeze-fraction", "0.6"),
    "optimizer: compactor momentum 0.99, bias lr x2": (
        *_BUDGET,
        "--compactor-momentum",
        "0.99",
        "--bias-lr-factor",
        "2",
    ),
    "recipe: paper (as the spec states it)": ("--recipe", "paper"),
    "score: Taylor averaged over a whole mask round": (*_BUDGET, "--score-round-average"),
}


# ----------------------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Setup:
    """Everything the runs of one benchmark share."""

    npz: Path
    published: Path
    arch: str
    epochs: int
    train_limit: int
    test_limit: int
    threads: int
    out: Path
    cache: Path

    @property
    def limit_suffix(self) -> str:
        return f"-limit{self.train_limit}x{self.test_limit}" if self.train_limit or self.test_limit else ""

    @property
    def base_dir(self) -> Path:
        """The base model's folder, keyed by its fine-tuning recipe."""
        return self.cache / f"{self.arch}-ft-e{BASE_EPOCHS}-lr{BASE_LR:g}-b{BATCH}{self.limit_suffix}"

    def run_dir(self, run: Run) -> Path:
        variant = f"-ablation{list(ABLATIONS).index(run.variant)}" if run.variant else ""
        return (
            self.out
            / f"{self.arch}{self.limit_suffix}"
            / f"e{self.epochs}"
            / f"{run.method}@{run.target:g}{variant}"
            / f"s{run.seed}"
        )

    def iters_per_epoch(self) -> int:
        with np.load(self.npz, allow_pickle=False) as z:
            n = len(z["y_train"])
        return math.ceil((min(n, self.train_limit) if self.train_limit else n) / BATCH)


@dataclass(frozen=True)
class Run:
    """One row of one seed: a method at a target (``variant``: an `ABLATIONS` key, "" for none)."""

    method: str
    target: float
    seed: int
    variant: str = ""


def find_inputs(data: Path, arch: str) -> tuple[Path, Path]:
    """The CIFAR-10 JPEG file and the published checkpoint of `arch` under `data` (the ../shared/data
    layout); ValueError naming what is missing."""
    npz = data / "cifar10-jpeg" / "cifar10_jpegbytes.npz"
    published = sorted((data / "cifar-resnet").glob(f"{arch}-*.th"))
    if not npz.is_file():
        raise ValueError(f"{npz} not found: --data must hold cifar10-jpeg/cifar10_jpegbytes.npz")
    if len(published) != 1:
        raise ValueError(
            f"expected one published checkpoint {data / 'cifar-resnet'}/{arch}-*.th, "
            f"found {[p.name for p in published]}"
        )
    return npz, published[0]


def model_config(arch: str) -> ModelConfig:
    return ModelConfig(arch=arch, shortcut="A")


# ----------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Step:
    """One resumable subprocess: `argv(resume)` writes `run_dir` (done when it holds summary.json)."""

    name: str
    run_dir: Path
    argv: Callable[[bool], list[str]]


def cli(setup: Setup, command: str, *flags: str, app: str = "resrep") -> Callable[[bool], list[str]]:
    """``python -m apps.<app> COMMAND`` with the shared data/model flags, `flags` and ``--resume`` if asked."""
    data = [
        "--dataset",
        "jpeg-npz",
        "--root",
        str(setup.npz),
        "--batch-size",
        str(BATCH),
        "--channels-last",
        "--no-progress",
        "--arch",
        setup.arch,
        "--shortcut",
        "A",
    ]
    for flag, n in (("--train-limit", setup.train_limit), ("--test-limit", setup.test_limit)):
        data += [flag, str(n)] if n else []
    argv = [sys.executable, "-m", f"apps.{app}", command, *data, *flags]
    return lambda resume: argv + (["--resume"] if resume else [])


def base_step(setup: Setup) -> Step:
    out = setup.base_dir
    return Step(
        "base",
        out,
        cli(
            setup,
            "train",
            "--checkpoint",
            str(setup.published),
            "--epochs",
            str(BASE_EPOCHS),
            "--lr",
            f"{BASE_LR:g}",
            "--out",
            str(out),
        ),
    )


def step_name(run: Run) -> str:
    return f"{run.method}@{run.target:g}{' [' + run.variant + ']' if run.variant else ''} seed {run.seed}"


def resrep_step(setup: Setup, run: Run) -> Step:
    """ResRep by the CLI with its default recipe (``auto``) and the shared lr; an ablation adds its flags."""
    out = setup.run_dir(run)
    return Step(
        step_name(run),
        out,
        cli(
            setup,
            "prune",
            "--checkpoint",
            str(setup.base_dir / CHECKPOINT_NAME),
            "--epochs",
            str(setup.epochs),
            "--lr",
            f"{FINETUNE.lr:g}",
            "--flops-target",
            f"{run.target:g}",
            "--mode",
            run.method.removeprefix("resrep-"),
            "--seed",
            str(run.seed),
            "--formats",
            "state_dict",
            *ABLATIONS.get(run.variant, ()),
            "--out",
            str(out),
        ),
    )


def csgd_step(setup: Setup, run: Run) -> Step:
    """C-SGD by its CLI with its defaults (budget strength, collapse over 30% of N) and the shared lr."""
    out = setup.run_dir(run)
    flags = ["--checkpoint", str(setup.base_dir / CHECKPOINT_NAME), "--epochs", str(setup.epochs)]
    flags += ["--lr", f"{FINETUNE.lr:g}", "--flops-target", f"{run.target:g}", "--seed", str(run.seed)]
    flags += ["--cluster-seed", str(run.seed), "--formats", "state_dict", "--out", str(out)]
    return Step(step_name(run), out, cli(setup, "prune", *flags, app="csgd"))


def sfp_step(setup: Setup, run: Run) -> Step:
    """SFP / CR-SFP by the CLI with the shared optimizer (lr, weight decay) and the ratio that meets T."""
    out = setup.run_dir(run)
    flags = ["--checkpoint", str(setup.base_dir / CHECKPOINT_NAME), "--epochs", str(setup.epochs)]
    flags += ["--method", run.method, "--lr", f"{FINETUNE.lr:g}", "--weight-decay", f"{FINETUNE.weight_decay:g}"]
    flags += [
        "--flops-target",
        f"{run.target:g}",
        "--seed",
        str(run.seed),
        "--formats",
        "state_dict",
        "--out",
        str(out),
    ]
    return Step(step_name(run), out, cli(setup, "prune", *flags, app="sfp"))


@dataclass(frozen=True)
class Job:
    """What a ``--worker`` process runs (method c or d), passed as JSON on its command line."""

    method: str
    run_dir: str
    base: str
    npz: str
    arch: str
    target: float
    epochs: int
    seed: int
    train_limit: int
    test_limit: int
    threads: int


def worker_step(setup: Setup, run: Run) -> Step:
    out = setup.run_dir(run)
    job = Job(
        run.method,
        str(out),
        str(setup.base_dir),
        str(setup.npz),
        setup.arch,
        run.target,
        setup.epochs,
        run.seed,
        setup.train_limit,
        setup.test_limit,
        setup.threads,
    )
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(dataclasses.asdict(job))]
    return Step(step_name(run), out, lambda resume: argv)  # workers always continue from what is on disk


def method_step(setup: Setup, run: Run) -> Step:
    if run.method.startswith("resrep-"):
        return resrep_step(setup, run)
    if run.method == "csgd":
        return csgd_step(setup, run)
    if run.method in ("sfp", "cr-sfp"):
        return sfp_step(setup, run)
    return worker_step(setup, run)


def _last_error(log: Path, offset: int) -> str:
    """The ``error:`` line this invocation wrote to `log` (both the CLI and the workers print one on bad
    input), else its last line."""
    with log.open(errors="replace") as f:
        f.seek(offset)
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1].removeprefix("error:").strip()


def _finished(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's status from its ``summary.json`` (None: not finished): a run that converted and
    exported but ended above its MACs target (``target_met: false``, exit 2) stays failed on every rerun."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    if json.loads(path.read_text()).get("target_met", True):
        return {"status": "done"}
    return {"status": "failed", "error": f"missed its MACs target ({path}: target_met false)", "exit_code": 2}


def run_step(step: Step, env: Mapping[str, str]) -> dict[str, Any]:
    """Run `step` unless it is done (``--resume`` when its checkpoint exists), appending to its log; the
    log is locked meanwhile so that two benchmark processes never train into one folder."""
    resume = (step.run_dir / CHECKPOINT_NAME).exists()
    argv = step.argv(resume)
    record = {"name": step.name, "dir": str(step.run_dir), "command": shlex.join(step.argv(False))}
    done = _finished(step.run_dir)
    if done is not None:
        return {**record, **done}
    log = step.run_dir.with_name(step.run_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: {log} is locked: another benchmark process is running {step.name}") from None
        f.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(argv)}\n")
        f.flush()
        offset = f.tell()
        print(f"[{step.name}] {'resuming' if step.run_dir.exists() else 'running'} (log: {log})", flush=True)
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, check=False).returncode
    if rc == 0 and _finished(step.run_dir) == {"status": "done"}:
        print(f"[{step.name}] done", flush=True)
        return {**record, "status": "done"}
    error = _last_error(log, offset)
    print(f"[{step.name}] failed (exit {rc}): {error}", flush=True)
    return {**record, "status": "failed", "error": error, "exit_code": rc}


# ----------------------------------------------------------------------------------------------- workers (c, d)
@dataclass
class Context:
    """A worker's job, data, device and example input (one image: MACs are counted per image)."""

    job: Job
    train_loader: Any
    test_loader: Any
    info: DataInfo
    device: torch.device
    example: torch.Tensor

    def fresh_model(self) -> nn.Module:
        return build_model(
            model_config(self.job.arch), num_classes=self.info.num_classes, in_channels=self.info.in_channels
        )

    def base_model(self) -> nn.Module:
        return load_weights(self.fresh_model(), Path(self.job.base) / CHECKPOINT_NAME).eval()

    @property
    def total_iters(self) -> int:
        return self.job.epochs * len(self.train_loader)

    def meta(self, phase: str, steps: int, **more: Any) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (`fit` compares it)."""
        j = self.job
        return {
            "benchmark": "prune_cifar",
            "method": j.method,
            "phase": phase,
            "arch": j.arch,
            "target": j.target,
            "epochs": j.epochs,
            "steps": steps,
            "seed": j.seed,
            "data": {"batch_size": BATCH, "train_limit": j.train_limit, "test_limit": j.test_limit},
            "optim": dataclasses.asdict(FINETUNE),
            **more,
        }

    def train(
        self,
        model: nn.Module,
        *,
        steps: int,
        out: Path,
        meta: dict[str, Any],
        hooks: Any = None,
        constant_lr: bool = False,
    ) -> None:
        """`apps.engine.loop.fit` for ``steps`` iterations with the shared optimizer: lr constant
        (``constant_lr``, a structure-finding phase) or the cosine from lr to 0 over the ``steps`` (the
        fine-tuning rule), resuming from ``out/last.pt`` when present; a checkpoint every epoch. A fresh
        start is seeded here, so it does not depend on what the process drew before (a resumed one
        restores every RNG anyway)."""
        torch.manual_seed(self.job.seed)
        optimizer = sgd(model, FINETUNE)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0) if constant_lr else None
        fit(
            model,
            self.train_loader,
            self.test_loader,
            epochs=math.ceil(steps / len(self.train_loader)),
            optimizer=optimizer,
            scheduler=scheduler,
            hooks=hooks,
            checkpoint_dir=out,
            resume=True,
            channels_last=True,
            log_dir=out,
            device=self.device,
            progress=False,
            meta=meta,
            max_steps=steps,
        )

    def macs(self, model: nn.Module) -> int:
        """MACs per image (eval mode, so that tracing leaves the BatchNorm statistics alone)."""
        return trace(model.eval(), self.example.to(next(model.parameters()).device)).macs()


def _context(job: Job) -> Context:
    data = DataConfig(
        dataset="jpeg-npz", root=job.npz, batch_size=BATCH, train_limit=job.train_limit, test_limit=job.test_limit
    )
    device = resolve_device("auto")
    train_loader, test_loader, info = build_loaders(data, seed=job.seed, pin_memory=device.type == "cuda")
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    return Context(job, train_loader, test_loader, info, device, example)


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


class GroupNormRegularizer:
    """`fit` hooks for Torch-Pruning's sparse training: ``pruner.regularize(model)`` after every backward
    pass, as TP's documentation prescribes. Stateless (the penalty is a function of the current weights),
    so a resumed run regularises exactly as an uninterrupted one."""

    def __init__(self, pruner: Any, model: nn.Module) -> None:
        self.pruner, self.model = pruner, model

    def after_backward(self) -> None:
        self.pruner.regularize(self.model)

    def after_step(self, iteration: int) -> None:
        """Nothing on a schedule: TP prunes once, after the sparse training."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore (see the class docstring)."""


def tp_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs Torch-Pruning must keep: the classifier and every producer of a residual
    stream (the stem conv and each block's second conv). TP 1.6.1 does not model the channel zero-padding
    of option-A shortcuts (``F.pad`` on the channel dim): pruning a residual stream gives a network that no
    longer runs (the classifier expects 60 features and receives 63 on ResNet-20). TP therefore prunes the
    internal layer of each block, the scope of ResRep's paper mode (a)."""
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    return [model.linear, model.conv1, *(b.conv2 for b in blocks)]


def tp_prune_to_target(pruner: Any, ctx: Context, model: nn.Module) -> float:
    """``pruner.step()`` until the MACs (our counter) meet the target; the kept MACs fraction."""
    base = ctx.macs(model)
    while (macs := ctx.macs(model)) > ctx.job.target * base:
        if pruner.current_step >= pruner.iterative_steps:
            raise ValueError(
                f"Torch-Pruning stopped at pruning_ratio={TP_RATIO} with {macs / base:.3f} of the MACs: "
                f"flops_target={ctx.job.target} is out of reach"
            )
        pruner.step()
    return macs / base


def run_tp_groupnorm(ctx: Context) -> dict[str, Any]:
    """(c) Torch-Pruning's regularise-then-prune, then fine-tuning.

    Phase 1 (``run_dir/sparse``): the first ``PRUNE_FRACTION`` of the N iterations with
    `GroupNormRegularizer` at constant lr. Then TP prunes, deterministically from the phase-1 weights,
    until the MACs meet the target. Phase 2 (``run_dir``): the remaining iterations of fine-tuning with
    the cosine from lr to 0. Resumption is exact: while phase 2 has no checkpoint, phase 1 resumes from its
    own (a finished phase 1 just reloads its final weights) and the pruning is redone; once it has one,
    the pruned network is rebuilt from that checkpoint's tensor shapes (`deploy_shell`: TP only narrows
    convs and BatchNorms here, the pads stay) and `fit` continues it; its meta holds the pruned widths.
    """
    import torch_pruning as tp

    run_dir, job = Path(ctx.job.run_dir), ctx.job
    sparse_steps = max(1, round(PRUNE_FRACTION * ctx.total_iters))
    settings = {
        "importance": "GroupMagnitudeImportance(p=2)",
        "reg": TP_REG,
        "pruning_ratio": TP_RATIO,
        "iterative_steps": TP_STEPS,
        "global_pruning": True,
        "sparse_steps": sparse_steps,
    }
    if (run_dir / CHECKPOINT_NAME).exists():
        model = deploy_shell(ctx.fresh_model(), unwrap_state_dict(load_file(run_dir / CHECKPOINT_NAME)))
    else:
        model = ctx.base_model()
        pruner = tp.pruner.GroupNormPruner(
            model,
            ctx.example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            reg=TP_REG,
            global_pruning=True,
            pruning_ratio=TP_RATIO,
            iterative_steps=TP_STEPS,
            ignored_layers=tp_ignored_layers(model),
        )
        pruner.update_regularizer()
        ctx.train(
            model,
            steps=sparse_steps,
            out=run_dir / "sparse",
            meta=ctx.meta("sparse", sparse_steps, tp=settings),
            hooks=GroupNormRegularizer(pruner, model),
            constant_lr=True,
        )
        kept = tp_prune_to_target(pruner, ctx, model)
        print(f"pruned by Torch-Pruning in {pruner.current_step} steps: {kept:.4f} of the MACs kept", flush=True)
    widths = conv_widths(model)
    finetune_steps = ctx.total_iters - sparse_steps
    ctx.train(
        model, steps=finetune_steps, out=run_dir, meta=ctx.meta("finetune", finetune_steps, tp=settings, widths=widths)
    )
    atomic_save(
        {
            "arch": dataclasses.asdict(model_config(job.arch)),
            "info": dataclasses.asdict(ctx.info),
            "state_dict": model.state_dict(),
        },
        run_dir / "final.pt",
    )
    return {"tp": settings, "finetune_steps": finetune_steps, "widths": widths}


def l1_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Per channel of `group`: the sum over its producers of the L1 norm of the filter (weight row) that
    writes it, divided by the group's mean score. The division puts every group on one scale, so a single
    global ranking does not simply empty the layers with the smallest fan-in."""
    score = torch.zeros(group.size, dtype=torch.float64)
    for p in group.producers:
        weight = model.get_submodule(p.module).weight.detach()
        rows = weight.abs().movedim(p.member.dim, 0).flatten(1).sum(1).to("cpu", torch.float64)
        score.index_add_(0, torch.as_tensor(p.member.channels), rows[torch.as_tensor(p.member.positions)])
    return score / score.mean().clamp_min(torch.finfo(torch.float64).tiny)


def l1_prune(model: nn.Module, example: torch.Tensor, target: float) -> nn.Module:
    """One-shot L1 pruning of every prunable group to `target` of the MACs (`select_masks`: global
    ascending order, at least one channel per group, whole multiples of each group's ``multiple``)."""
    graph = trace(model, example)
    groups = [g for g in graph.groups if g.prunable and g.producers]
    ids = [g.id for g in groups]
    goal = target * graph.macs()
    masks = select_masks(
        [l1_scores(model, g) for g in groups],
        macs=lambda w: graph.macs(dict(zip(ids, w))),
        target_macs=goal,
        min_keep=[min(g.size, max(1, g.min_channels)) for g in groups],
        multiple=[g.multiple for g in groups],
    )
    macs = graph.macs({i: int(m.sum()) for i, m in zip(ids, masks)})
    if macs > goal:
        raise ValueError(
            f"flops_target={target} is out of reach: every group at its minimum width keeps "
            f"{macs / graph.macs():.3f} of the MACs"
        )
    return prune(model, example, {i: m.nonzero().flatten().tolist() for i, m in zip(ids, masks)}, graph=graph)


def run_l1_oneshot(ctx: Context) -> dict[str, Any]:
    """(d) L1 one-shot pruning, then E epochs of fine-tuning. The pruned network is saved at once as a
    channel plan plus weights (``run_dir/pruned``, `save_pruned`) and rebuilt from it on resume
    (`load_pruned`, weights_only), before `fit` continues from ``run_dir/last.pt``; the fine-tuned network
    is saved the same way (``run_dir/final``)."""
    run_dir = Path(ctx.job.run_dir)
    if (run_dir / "pruned" / "plan.json").exists():  # save_pruned writes the plan last
        model = load_pruned(ctx.fresh_model(), run_dir / "pruned")
    else:
        model = l1_prune(ctx.base_model(), ctx.example, ctx.job.target)
        save_pruned(model, run_dir / "pruned")
    print(f"pruned by L1 norm: {ctx.macs(model) / ctx.macs(ctx.fresh_model()):.4f} of the MACs kept", flush=True)
    widths = conv_widths(model)
    ctx.train(model, steps=ctx.total_iters, out=run_dir, meta=ctx.meta("finetune", ctx.total_iters, widths=widths))
    save_pruned(model, run_dir / "final")
    return {"widths": widths}


WORKERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "tp-groupnorm": run_tp_groupnorm,
    "l1-oneshot": run_l1_oneshot,
}


def run_worker(job: Job) -> int:
    """Run method c or d into ``job.run_dir`` and write its ``summary.json`` (the done marker); bad input
    exits with status 2 and a one-line ``error:`` message, as the CLI does."""
    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    try:
        ctx = _context(job)
        extra = WORKERS[job.method](ctx)
        model = final_model(job.method, Path(job.run_dir), model_config(job.arch), ctx.info)
    except (ValueError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    accuracy = evaluate(model.to(ctx.device), ctx.test_loader, device=ctx.device)["acc"]
    summary = {
        "method": job.method,
        "arch": job.arch,
        "flops_target": job.target,
        "epochs": job.epochs,
        "seed": job.seed,
        "pruned_accuracy": accuracy,
        "wall_time_s": time.perf_counter() - start,
        **extra,
    }
    write_json(Path(job.run_dir) / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- report
def method_deploy(app: App, run_dir: Path, model_cfg: ModelConfig, info: DataInfo) -> nn.Module:
    """The converted network of a finished ResRep or C-SGD run, rebuilt from its ``last.pt`` as the CLI's
    ``export`` does (so runs whose ``deploy.pt`` predates the stored channel plan work too)."""
    size = (info.in_channels, info.image_size, info.image_size)
    method = restore(
        app,
        load_file(run_dir / CHECKPOINT_NAME),
        model_cfg,
        info,
        torch.zeros(1, *size),
        f"checkpoint {run_dir / CHECKPOINT_NAME}",
    )
    return method.convert(torch.randn(64, *size, generator=torch.Generator().manual_seed(0)))[0]


def final_model(method: str, run_dir: Path, model_cfg: ModelConfig, info: DataInfo) -> nn.Module:
    """The trained, pruned network of a finished run (CPU, eval mode)."""
    apps = {"csgd": CSGD_APP, "sfp": SFP_APP, "cr-sfp": SFP_APP}
    if method.startswith("resrep-") or method in apps:
        return method_deploy(apps.get(method, RESREP_APP), run_dir, model_cfg, info).eval()
    fresh = build_model(model_cfg, num_classes=info.num_classes, in_channels=info.in_channels)
    if method == "tp-groupnorm":
        return deploy_shell(fresh, unwrap_state_dict(load_file(run_dir / "final.pt"))).eval()
    return load_pruned(fresh, run_dir / "final").eval()


def train_time_s(run_dir: Path) -> float:
    """Σ epoch_time_s over every ``log.csv`` of a run (both phases of c): training time, across resumes."""
    total = 0.0
    for path in run_dir.rglob("log.csv"):
        with path.open() as f:
            total += sum(float(row["epoch_time_s"]) for row in csv.DictReader(f))
    return total


@dataclass
class Measured:
    """A plain (BatchNorm-folded) CPU model and its counts, per image."""

    model: nn.Module
    macs: int
    params: int


def measure(model: nn.Module, info: DataInfo) -> Measured:
    plain = reparam.merge(model.cpu().float().eval())
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    graph = trace(plain, example)
    return Measured(plain, graph.macs(), graph.params())


def time_models(models: Mapping[str, nn.Module], info: DataInfo, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms per forward at batch 1 and 64, all models interleaved in one loop per batch size."""
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch in (1, 64):
        x = torch.randn(
            batch, info.in_channels, info.image_size, info.image_size, generator=torch.Generator().manual_seed(batch)
        )
        for name, seconds in latencies(dict(models), x, repeats=repeats, warmup=3).items():
            out[name][str(batch)] = 1e3 * seconds
    return out


def collect(
    setup: Setup, done: Sequence[tuple[Run, dict[str, Any]]], repeats: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Base and per-run results (one row per seed): accuracies, counts, reductions, times; latencies for
    the first seed of every (method, target, variant)."""
    base_ck = load_file(setup.base_dir / CHECKPOINT_NAME)
    info = DataInfo(**base_ck["meta"]["info"])
    cfg = model_config(setup.arch)
    base_summary = json.loads((setup.base_dir / "summary.json").read_text())
    base_model = build_model(cfg, num_classes=info.num_classes, in_channels=info.in_channels)
    load_state_dict_checked(base_model, base_ck["model"], f"checkpoint {setup.base_dir / CHECKPOINT_NAME}")
    measured = {"base": measure(base_model, info)}
    timed = {"base": measured["base"].model}
    rows = []
    for run, step in done:
        row = {"method": run.method, "target": run.target, "seed": run.seed, "variant": run.variant, **step}
        if step["status"] == "done":
            run_dir = Path(step["dir"])
            summary = json.loads((run_dir / "summary.json").read_text())
            m = measure(final_model(run.method, run_dir, cfg, info), info)
            key = (run.method, run.target, run.variant)
            if key not in timed:
                timed[key] = m.model
                row["timed"] = True
            row.update(
                accuracy_after=summary["pruned_accuracy"],
                epochs=summary["epochs"],
                wall_time_s=summary["wall_time_s"],
                train_time_s=train_time_s(run_dir),
                macs=m.macs,
                params=m.params,
                largest_removed_norm=summary.get("largest_removed_norm"),
                plan=summary.get("plan"),
                max_rel_error=summary.get("max_rel_error"),  # conversion / merge / export vs the trained model
                **{k: summary[k] for k in ("exact", "carriers", "spread_log", "centripetal_strength") if k in summary},
            )
        row["scope"] = SCOPES[run.method]
        rows.append(row)
    timings = time_models({str(k): v for k, v in timed.items()}, info, repeats)
    b = measured["base"]
    base = {
        "dir": str(setup.base_dir),
        "accuracy": base_summary["accuracy"],
        "macs": b.macs,
        "params": b.params,
        "latency_ms": timings["base"],
        "train_time_s": train_time_s(setup.base_dir),
        "wall_time_s": base_summary["wall_time_s"],
    }
    for row in rows:
        if row["status"] == "done":
            row.update(
                accuracy_before=base["accuracy"],
                accuracy_drop=base["accuracy"] - row["accuracy_after"],
                macs_kept=row["macs"] / b.macs,
                macs_reduction=1 - row["macs"] / b.macs,
                params_reduction=1 - row["params"] / b.params,
            )
            if row.pop("timed", False):
                lat = timings[str((row["method"], row["target"], row["variant"]))]
                row.update(latency_ms=lat, speedup={k: base["latency_ms"][k] / v for k, v in lat.items()})
    return base, rows


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (target, method, variant) in first-seen order: mean and sample standard deviation of
    top-1 and drop over the seeds that finished, mean reductions and times, the timed seed's latency, and
    the errors of the seeds that failed."""
    keys = list(dict.fromkeys((r["target"], r["method"], r["variant"]) for r in rows))
    out = []
    for target, method, variant in keys:
        mine = [r for r in rows if (r["target"], r["method"], r["variant"]) == (target, method, variant)]
        ok = [r for r in mine if r["status"] == "done"]
        entry: dict[str, Any] = {
            "target": target,
            "method": method,
            "variant": variant,
            "seeds": [r["seed"] for r in ok],
            "failed": {r["seed"]: r["error"] for r in mine if r["status"] != "done"},
        }
        if ok:
            acc = np.array([r["accuracy_after"] for r in ok])
            entry.update(
                accuracy_mean=float(acc.mean()),
                accuracy_std=float(acc.std(ddof=1)) if len(ok) > 1 else None,
                drop_mean=float(np.mean([r["accuracy_drop"] for r in ok])),
                **{
                    k: float(np.mean([r[k] for r in ok]))
                    for k in ("macs", "macs_reduction", "params", "params_reduction", "train_time_s", "wall_time_s")
                },
            )
            timed = next((r for r in ok if "latency_ms" in r), None)
            if timed is not None:
                entry.update(latency_ms=timed["latency_ms"], speedup=timed["speedup"])
        out.append(entry)
    return out


def markdown(base: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], title: str) -> str:
    head = [
        "target",
        "method",
        "seeds",
        "top-1 after",
        "drop",
        "MACs (M)",
        "MACs red.",
        "params red.",
        "ms b1",
        "ms b64",
        "speedup b1/b64",
        "train min",
        "wall min",
    ]
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        f"| 1.0 | base | | {base['accuracy']:.2f} | | {base['macs'] / 1e6:.2f} | | | {base['latency_ms']['1']:.2f} | "
        f"{base['latency_ms']['64']:.1f} | | {base['train_time_s'] / 60:.1f} | {base['wall_time_s'] / 60:.1f} |",
    ]
    for e in entries:
        name = e["method"] + (f" [{e['variant']}]" if e["variant"] else "")
        failed = "; ".join(f"seed {s} failed: {why}" for s, why in e["failed"].items())
        if not e["seeds"]:
            lines.append(f"| {e['target']:g} | {name} | | {failed} |" + " |" * (len(head) - 4))
            continue
        spread = f" ± {e['accuracy_std']:.2f}" if e["accuracy_std"] is not None else ""
        lat = (
            (
                f"{e['latency_ms']['1']:.2f} | {e['latency_ms']['64']:.1f} | "
                f"{e['speedup']['1']:.2f}x/{e['speedup']['64']:.2f}x"
            )
            if "latency_ms" in e
            else " | | "
        )
        lines.append(
            f"| {e['target']:g} | {name} | {len(e['seeds'])} | {e['accuracy_mean']:.2f}{spread} | {e['drop_mean']:.2f} | "
            f"{e['macs'] / 1e6:.2f} | {100 * e['macs_reduction']:.1f}% | {100 * e['params_reduction']:.1f}% | {lat} | "
            f"{e['train_time_s'] / 60:.1f} | {e['wall_time_s'] / 60:.1f} |" + (f" {failed}" if failed else "")
        )
    return "\n".join(lines)


def plot_curve(base: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Top-1 after pruning (mean over seeds, spread as error bars) against the fraction of MACs kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(e["method"] for e in entries):
        pts = sorted(
            (1 - e["macs_reduction"], e["accuracy_mean"], e["accuracy_std"] or 0.0)
            for e in entries
            if e["method"] == method and e["seeds"] and not e["variant"]
        )
        if pts:
            x, y, err = zip(*pts)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    ax.scatter([1.0], [base["accuracy"]], marker="*", s=120, color="k", label="base", zorder=3)
    ax.set(xlabel="fraction of the base MACs kept", ylabel="top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def _numbers(text: str, kind: type) -> list:
    return [kind(t) for t in text.split(",") if t]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="folder with cifar10-jpeg/ and cifar-resnet/ (the ../shared/data layout)",
    )
    p.add_argument("--mode", choices=sorted(ARCHS), default="quick", help="quick: ResNet-20, full: ResNet-56")
    p.add_argument(
        "--methods",
        default="a,b,c,d",
        help="comma-separated letters or names: " + ", ".join(f"{k}={v}" for k, v in METHODS.items()),
    )
    p.add_argument(
        "--targets",
        default=",".join(f"{t:g}" for t in DEFAULT_TARGETS),
        help="fractions of the MACs kept, comma separated",
    )
    p.add_argument("--epochs", type=int, default=1, help="epoch budget of every method")
    p.add_argument("--seeds", default="0,1,2", help="seeds of every (method, target), comma separated")
    p.add_argument(
        "--ablation",
        nargs="?",
        const=",".join(str(i) for i in range(len(ABLATIONS))),
        default=None,
        metavar="I,J,...",
        help="run the ABLATIONS variants of (b) (all, or those positions) at the first target and seed "
        "instead of --methods: " + "; ".join(f"{i}={k}" for i, k in enumerate(ABLATIONS)),
    )
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (each with --threads threads)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "prune_cifar", help="run folders")
    p.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "cache", help="base models, by recipe")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results", help="JSON and PNG")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run, and for the latency")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per batch size (median)")
    p.add_argument("--train-limit", type=int, default=0, help="first N training images only (smoke runs)")
    p.add_argument("--test-limit", type=int, default=0, help="first N test images only (smoke runs)")
    args = p.parse_args(argv)
    try:
        args.methods = [METHODS.get(m, m) for m in args.methods.split(",") if m]
        unknown = sorted(set(args.methods) - set(METHODS.values()))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; use {METHODS}")
        args.targets, args.seeds = _numbers(args.targets, float), _numbers(args.seeds, int)
        if not args.targets or not all(0.0 < t < 1.0 for t in args.targets):
            raise ValueError(f"targets must lie in (0, 1), got {args.targets}")
        if not args.seeds:
            raise ValueError("--seeds needs at least one seed")
        if args.ablation is not None:
            wrong = f"--ablation takes comma-separated positions 0..{len(ABLATIONS) - 1} of ABLATIONS, got {args.ablation!r}"
            try:
                args.ablation = _numbers(args.ablation, int)
            except ValueError:
                raise ValueError(wrong) from None
            if not args.ablation or not all(0 <= i < len(ABLATIONS) for i in args.ablation):
                raise ValueError(wrong)
        if args.epochs < 1 or args.jobs < 1:
            raise ValueError(f"--epochs and --jobs must be at least 1, got {args.epochs} and {args.jobs}")
        args.npz, args.published = find_inputs(args.data, ARCHS[args.mode])
    except ValueError as e:
        p.error(str(e))
    return args


def planned_runs(args: argparse.Namespace) -> list[Run]:
    if args.ablation is not None:
        names = list(ABLATIONS)
        return [Run("resrep-residual", args.targets[0], args.seeds[0], names[i]) for i in args.ablation]
    return [Run(m, t, s) for t in args.targets for m in args.methods for s in args.seeds]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # internal: one method (c or d) in its own process, see worker_step
        return run_worker(Job(**json.loads(argv[1])))
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    arch = ARCHS[args.mode]
    setup = Setup(
        args.npz.resolve(),
        args.published.resolve(),
        arch,
        args.epochs,
        args.train_limit,
        args.test_limit,
        args.threads,
        args.out.resolve(),
        args.cache.resolve(),
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    base_run = run_step(base_step(setup), env)
    if base_run["status"] != "done":
        raise SystemExit(f"error: the base fine-tuning failed: {base_run['error']} (see {setup.base_dir}.log)")
    runs = planned_runs(args)
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own subprocess
        results = list(pool.map(lambda run: run_step(method_step(setup, run), env), runs))
    base, rows = collect(setup, list(zip(runs, results)), args.repeats)
    entries = aggregate(rows)
    title = f"{arch} (option A) on CIFAR-10 (JPEG q75), {args.epochs}-epoch budget per method" + (
        ", ablation of (b)" if args.ablation is not None else ""
    )
    print(markdown(base, entries, title))
    name = f"prune_cifar_{args.mode}_e{args.epochs}{'_ablation' if args.ablation is not None else ''}"
    payload = {
        "benchmark": "prune_cifar",
        "mode": args.mode,
        "arch": arch,
        "dataset": "CIFAR-10 (JPEG q75)",
        "epochs": args.epochs,
        "iterations": args.epochs * setup.iters_per_epoch(),
        "targets": args.targets,
        "seeds": args.seeds,
        "ablation": args.ablation,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        **machine_meta(),
        "command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv]),
        "base": {**base, **base_run},
        "summary": entries,
        "results": rows,
    }
    results_dir = args.results.resolve()
    write_json(results_dir / f"{name}.json", payload)
    print(f"wrote {results_dir / f'{name}.json'}")
    if len(args.targets) > 1 and args.ablation is None:
        plot_curve(base, entries, results_dir / f"{name}_curve.png", title)
        print(f"wrote {results_dir / f'{name}_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
