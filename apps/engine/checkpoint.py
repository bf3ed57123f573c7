"""Atomic, weights_only-loadable checkpoints and the RNG state needed to resume a run bit for bit.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so `torch.load(...,
weights_only=True)` reads it; it is written with `reparam.atomic.atomic_save` (a kill at any moment leaves
either the old file or the new one).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "OutputError",
    "check_run_folder",
    "load_file",
    "rng_state",
    "set_rng_state",
    "settings_diff",
    "writable_folder",
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not one of ours."""


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; a missing or unreadable file raises `CheckpointError`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, forbidden global: all mean "not a usable checkpoint"
        raise CheckpointError(
            f"cannot read checkpoint {p} ({type(e).__name__}: {e}); "
            f"the file is corrupt or not a weights-only checkpoint"
        ) from e


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: python, numpy, torch CPU and all CUDA devices."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only when CUDA is present on both sides)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class OutputError(ValueError):
    """The output folder cannot hold the run (not a folder, not writable, already holds another run)."""


def writable_folder(out: str | Path) -> Path:
    """`out` if a run can write there, checked without writing anything: the folder, or the nearest of its
    parents that exists, is a folder this process may write into. `OutputError` otherwise (a file in the
    way, no permission); the folder itself is created by the first file written into it."""
    path = Path(out)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise OutputError(f"--out {path} {where}, not a folder; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--out {path} cannot be created or written (no write permission on {existing})")
    return path


def check_run_folder(out: str | Path, resume: bool, checkpoint_name: str = "last.pt") -> Path:
    """`out` made ready for a run, before any training: a `writable_folder` holding a run exactly when
    ``resume`` is asked (`OutputError` for a run already there without it, `CheckpointError` for
    ``resume`` on a folder that holds none)."""
    path = writable_folder(out)
    held = (path / checkpoint_name).exists()
    if held and not resume:
        raise OutputError(
            f"{path} already holds a run ({checkpoint_name}); pass --resume to continue it or choose a new --out"
        )
    if resume and not held:
        raise CheckpointError(f"--resume: {path} holds no run ({checkpoint_name} missing); drop --resume to start one")
    return path


def settings_diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``name: saved → current`` for every setting (nested mappings flattened with dots) that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            line
            for key in sorted(set(saved) | set(current), key=str)
            for line in settings_diff(saved.get(key, "<unset>"), current.get(key, "<unset>"), f"{prefix}{key}.")
        ]
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} → {current!r}"]
