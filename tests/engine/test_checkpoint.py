"""Checkpoint files: atomic writes, weights_only loading, clear corruption errors, RNG capture/restore."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from apps.engine import checkpoint as ck
from apps.engine.checkpoint import (
    CheckpointError,
    OutputError,
    check_run_folder,
    load_file,
    rng_state,
    set_rng_state,
    settings_diff,
)
from reparam.atomic import atomic_save


def test_atomic_save_roundtrip_weights_only(tmp_path):
    obj = {"w": torch.arange(6.0).view(2, 3), "n": 3, "history": [{"acc": 1.5}], "name": "x", "none": None}
    atomic_save(obj, tmp_path / "sub" / "a.pt")
    got = load_file(tmp_path / "sub" / "a.pt")
    assert got["n"] == 3 and got["history"] == [{"acc": 1.5}] and torch.equal(got["w"], obj["w"])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.pt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_file(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_and_foreign_files_are_refused(tmp_path):
    atomic_save({"w": torch.randn(100)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_file(tmp_path / "cut.pt")
    torch.save({"obj": np.random.default_rng(0)}, tmp_path / "pickle.pt")  # arbitrary object: not weights-only
    with pytest.raises(CheckpointError, match="weights-only"):
        load_file(tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "missing.pt")


def _draw():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_roundtrip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    atomic_save({"rng": rng_state()}, tmp_path / "r.pt")
    first = _draw()
    _draw()
    set_rng_state(load_file(tmp_path / "r.pt")["rng"])
    assert _draw() == first


def test_a_run_folder_is_checked_before_any_training(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_run_folder(a_file, resume=False)
    with pytest.raises(OutputError, match="lies under .*file, which is a file"):
        check_run_folder(a_file / "below", resume=False)
    with pytest.raises(CheckpointError, match="holds no run"):
        check_run_folder(tmp_path / "fresh", resume=True)
    run = check_run_folder(tmp_path / "fresh" / "run", resume=False)
    assert not run.exists()  # checked, nothing written
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"")
    with pytest.raises(OutputError, match="already holds a run"):
        check_run_folder(run, resume=False)
    assert check_run_folder(run, resume=True) == run


def test_settings_diff_names_what_differs():
    saved = {"seed": 0, "data": {"dataset": "digits", "batch_size": 64}, "epochs": 2}
    now = {"seed": 1, "data": {"dataset": "digits", "batch_size": 32}, "epochs": 2, "extra": True}
    assert settings_diff(saved, now) == ["data.batch_size: 64 → 32", "extra: '<unset>' → True", "seed: 0 → 1"]
    assert settings_diff(saved, saved) == []
