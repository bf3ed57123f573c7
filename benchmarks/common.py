"""Helpers shared by the benchmark scripts: atomic JSON results, plain-text tables, run metadata, timing.

Importing it puts the checkout's root on `sys.path`: the scripts use `apps.resrep` from the checkout (an
install names it `reparam_apps`), whatever folder they are started from.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reparam.atomic import atomic_write_text  # noqa: E402


def write_json(path: Path, payload: dict) -> None:
    """Write atomically, so an interrupted run never leaves half a file."""
    atomic_write_text(json.dumps(payload, indent=1), path)


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """Right-aligned columns with a rule under the header, then a blank line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print()


def machine_meta(**extra: Any) -> dict[str, Any]:
    """Date, machine, thread count, package versions and the repository commit to store beside every result."""
    git = (
        subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        or None
    )
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reparam_commit": git,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    for package in ("torch", "torchvision", "numpy", "torch-pruning"):
        try:
            meta[package] = version(package)
        except PackageNotFoundError:
            meta[package] = None
    return {**meta, **extra}


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each closure, measured interleaved: one call of each per round, the
    order rotating from round to round (so drifting machine load and cache state hit all of them alike),
    after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def latencies(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per forward of each model on `x` (no_grad), measured `interleaved`."""
    return interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, repeats, warmup)
