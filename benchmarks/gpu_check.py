"""The checks that need a CUDA GPU, in one prepared run that fits in ~9 minutes; JSON out.

1. ``amp``: ResRep (budget recipe, built on the CPU and moved by `fit`) trained under fp16 autocast with
   a GradScaler, the gradient rule applied after ``unscale_`` (overflow steps kept out of the Taylor scores): the loss stays finite, the MACs target is met, the removed rows are exactly 0 and
   the conversion is exact (proven in float64 to 1e-10; the float32 deploy model within 1e-5 of max|y|); the same under bf16.
2. ``channels_last``: the same run in NHWC; the converted model gives the same logits in NHWC and NCHW;
   ``cr_sfp_fp16``: CR-SFP (two views, two heads, KL) under fp16 + GradScaler in NHWC, exported exactly.
3. ``ddp_nccl``: ``torchrun --nproc-per-node 1 -m apps.resrep prune`` on the offline digits data, so the
   CLI joins an NCCL process group and trains through DistributedDataParallel; exit 0, target met.
4. ``epoch_time``: one epoch (782 iterations of batch 64, CIFAR-sized synthetic images) of plain SGD
   against ResRep (residual groups, budget recipe before its freeze) on ResNet-56, same device, interleaved.
5. ``comparison``: when ``--data`` holds the CIFAR-10 JPEG file and the published ResNet-56, as much of
   ``benchmarks/prune_cifar.py --mode full`` (methods b, c, d at 0.471, seed 0) as the time left allows.

    python benchmarks/gpu_check.py [--data ../shared/data] [--budget-s 540] [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import machine_meta, write_json

from apps.engine.loop import fit
from apps.engine.models import CifarResNet
from apps.resrep import ResRep, ResRepConfig
from apps.sfp import SFP, SFPConfig

REPO = Path(__file__).resolve().parents[1]


def _loader(n: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of learnable synthetic CIFAR-sized data (labels from a fixed random linear map)."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(3 * 32 * 32, 10, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        out.append((x, (x.flatten(1) @ proj).argmax(1)))
    return out


def check_training(amp: str, channels_last: bool, steps: int = 120, device: str = "cuda") -> dict[str, Any]:
    """ResRep on ResNet-20 for `steps` iterations on `device` under `amp`, then the conversion verified."""
    device = torch.device(device)
    torch.manual_seed(0)
    batches = _loader(steps, 64, seed=1)
    rr = ResRep(  # built on the CPU, as `apps.resrep.prune` builds it; `fit` moves it to `device`
        CifarResNet(20),
        batches[0][0][:2],
        ResRepConfig(flops_target=0.5, lr=0.05),
        iters_per_epoch=steps,
        total_iters=steps,
    )
    optimizer = rr.optimizer()
    history = fit(
        rr.model,
        batches,
        None,
        epochs=1,
        optimizer=optimizer,
        scheduler=rr.lr_scheduler(optimizer),
        hooks=rr,
        amp=amp,
        channels_last=channels_last,
        device=device,
        progress=False,
    )
    rr.check_target()
    x = batches[0][0][:32].to(device)
    deploy, report = rr.convert(x)
    out: dict[str, Any] = {
        "amp": amp,
        "channels_last": channels_last,
        "steps": steps,
        "train_loss": history[-1]["train_loss"],
        "recipe": rr.plan.recipe,
        "macs_kept": report.macs_after / report.macs_before,
        "largest_removed_norm": report.largest_removed_norm,
        "max_rel_error": report.max_rel_error,
        "max_rel_error_native": report.max_rel_error_native,
    }
    if channels_last:
        with torch.no_grad():
            nhwc = deploy.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
            nchw = deploy.to(memory_format=torch.contiguous_format)(x.contiguous())
        out["nhwc_vs_nchw_rel"] = float((nhwc - nchw).abs().max() / nchw.abs().max())
    out["ok"] = bool(
        torch.isfinite(torch.tensor(out["train_loss"]))
        and out["macs_kept"] <= 0.5
        and out["largest_removed_norm"] == 0.0
        and report.max_rel_error <= 1e-10
        and report.max_rel_error_native <= 1e-5
        and out.get("nhwc_vs_nchw_rel", 0.0) <= 1e-5
    )
    return out


def check_cr_sfp(amp: str, steps: int = 60, device: str = "cuda") -> dict[str, Any]:
    """CR-SFP on ResNet-20 (two views per image, two heads, the KL loss through `torch.func.functional_call`)
    under `amp` with the engine's GradScaler and channels_last, zeroed every 20 steps, then exported."""
    device = torch.device(device)
    torch.manual_seed(0)
    batches = [(torch.stack([x, x.flip(-1)], dim=1), y) for x, y in _loader(steps, 64, seed=2)]
    sfp = SFP(
        CifarResNet(20).to(device),
        batches[0][0][:1, 0].to(device),
        SFPConfig(method="cr-sfp", flops_target=0.5, lr=0.05),
        iters_per_epoch=20,
        total_iters=steps,
    )
    history = fit(
        sfp.model,
        batches,
        None,
        epochs=1,
        optimizer=sfp.optimizer(),
        hooks=sfp,
        loss_fn=sfp.loss,
        amp=amp,
        channels_last=True,
        device=device,
        progress=False,
    )
    _, report = sfp.convert(batches[0][0][:32, 0].to(device))
    out = {
        "amp": amp,
        "steps": steps,
        "train_loss": history[-1]["train_loss"],
        "macs_kept": report.macs_after / report.macs_before,
        "carriers": sum(len(v) for v in report.carriers.values()),
        "max_rel_error": report.max_rel_error,
        "max_rel_error_native": report.max_rel_error_native,
    }
    out["ok"] = bool(
        torch.isfinite(torch.tensor(out["train_loss"]))
        and report.exact
        and report.max_rel_error <= 1e-10
        and report.max_rel_error_native <= 1e-5
    )
    return out


def check_ddp_nccl(tmp: Path) -> dict[str, Any]:
    """One-GPU torchrun of the prune CLI on digits: the NCCL path end to end."""
    base = [sys.executable, "-m", "apps.resrep"]
    data = ["--dataset", "digits", "--arch", "digits_resnet", "--width", "8", "--no-progress", "--batch-size", "64"]
    subprocess.run(
        [*base, "train", *data, "--epochs", "3", "--lr", "0.1", "--out", str(tmp / "base")],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    done = subprocess.run(
        [
            *torchrun,
            "-m",
            "apps.resrep",
            "prune",
            *data,
            "--epochs",
            "3",
            "--flops-target",
            "0.6",
            "--checkpoint",
            str(tmp / "base" / "last.pt"),
            "--out",
            str(tmp / "ddp"),
            "--formats",
            "state_dict",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    summary = json.loads((tmp / "ddp" / "summary.json").read_text()) if done.returncode == 0 else {}
    return {
        "exit_code": done.returncode,
        "world_size": summary.get("world_size"),
        "target_met": summary.get("target_met"),
        "largest_removed_norm": summary.get("largest_removed_norm"),
        "stderr_tail": done.stderr[-1500:] if done.returncode else "",
        "ok": done.returncode == 0 and bool(summary.get("target_met")),
    }


def epoch_time(iters: int = 782) -> dict[str, Any]:
    """Seconds per epoch of plain SGD and of ResRep (residual groups) on ResNet-56, interleaved in chunks."""
    device = torch.device("cuda")
    batches = [(x.to(device), y.to(device)) for x, y in _loader(32, 64, seed=2)]
    torch.manual_seed(0)
    plain = CifarResNet(56).to(device)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    rr = ResRep(CifarResNet(56).to(device), batches[0][0][:2], ResRepConfig(recipe="budget"), total_iters=10 * iters)
    rr_opt = rr.optimizer()
    counter = iter(range(10**9))

    def step(model, opt, hooks) -> Callable[[int], None]:
        def run(i: int) -> None:
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hooks is not None:
                hooks.after_backward()
            opt.step()
            if hooks is not None:
                hooks.after_step(next(counter))

        return run

    runs = {"plain": step(plain.train(), plain_opt, None), "resrep": step(rr.model.train(), rr_opt, rr)}
    totals = {k: 0.0 for k in runs}
    chunk = 50
    for run in runs.values():  # warm-up (cuDNN autotuning, allocator)
        for i in range(10):
            run(i)
    for start in range(0, iters, chunk):
        for name, run in runs.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(start, min(iters, start + chunk)):
                run(i)
            torch.cuda.synchronize()
            totals[name] += time.perf_counter() - t0
    return {"iters": iters, "epoch_s": totals, "ratio": totals["resrep"] / totals["plain"]}


def comparison(data: Path, seconds: float, results: Path) -> dict[str, Any]:
    """`prune_cifar.py --mode full` for b, c, d at 0.471 (seed 0) until `seconds` run out (resumable)."""
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "prune_cifar.py"),
        "--data",
        str(data),
        "--mode",
        "full",
        "--epochs",
        "4",
        "--methods",
        "b,c,d",
        "--targets",
        "0.471",
        "--seeds",
        "0",
        "--threads",
        "8",
        "--results",
        str(results),
    ]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, seconds))
        return {"command": cmd, "exit_code": done.returncode, "stdout_tail": done.stdout[-4000:]}
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"command": cmd, "timed_out_after_s": seconds, "stdout_tail": out[-4000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="the ../shared/data layout, for the ResNet-56 comparison")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole script")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device: this script checks the GPU paths; run it on a machine with one", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report: dict[str, Any] = {**machine_meta(device=torch.cuda.get_device_name(0)), "checks": {}}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "amp_fp16": lambda: check_training("fp16", False),
        "amp_bf16": lambda: check_training("bf16", False),
        "channels_last_fp16": lambda: check_training("fp16", True),
        "cr_sfp_fp16": lambda: check_cr_sfp("fp16"),
        "ddp_nccl": lambda: check_ddp_nccl(tmp),
        "epoch_time_resnet56": epoch_time,
    }
    try:
        for name, check in checks.items():
            t0 = time.perf_counter()
            try:
                report["checks"][name] = check()
            except Exception as e:  # record and go on: one failing check must not hide the others
                report["checks"][name] = {"ok": False, "error": repr(e), "traceback": traceback.format_exc()[-3000:]}
            report["checks"][name]["seconds"] = time.perf_counter() - t0
            print(name, json.dumps(report["checks"][name], default=str)[:400], flush=True)
            write_json(args.out, report)
        left = args.budget_s - (time.perf_counter() - start) - 20
        if args.data is not None and left > 60:
            report["comparison"] = comparison(args.data, left, args.out.parent)
        report["total_s"] = time.perf_counter() - start
        write_json(args.out, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out}")
    failed = [k for k, v in report["checks"].items() if not v.get("ok", True)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
