"""Kill a ResRep run with SIGKILL mid-epoch, resume it, and get exactly what an uninterrupted run gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apps.engine.checkpoint import load_file
from apps.resrep.cli import main

ROOT = Path(__file__).resolve().parents[2]
DATA = [
    "--dataset",
    "digits",
    "--train-limit",
    "256",
    "--batch-size",
    "32",
    "--arch",
    "digits_resnet",
    "--width",
    "4",
    "--no-progress",
    "--seed",
    "3",
]
# The budget recipe over 40 iterations: mask rounds after iterations 1..10 (Taylor scores, fading rows), freeze at 12.
PRUNE = [
    *DATA,
    "--epochs",
    "5",
    "--checkpoint-every",
    "3",
    "--flops-target",
    "0.6",
    "--recipe",
    "budget",
    "--formats",
    "state_dict",
]
# The killed run sleeps in every mask-schedule call (numerics untouched), so the kill lands mid-run.
SLOW_MAIN = """
import sys, time
from apps.resrep import method
step = method.ResRep.after_step
method.ResRep.after_step = lambda self, i: (time.sleep(0.2), step(self, i))[1]
from apps.resrep.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the subprocess (OMP_NUM_THREADS=1)
    yield
    torch.set_num_threads(threads)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, one_thread):
    assert main(["train", *DATA, "--epochs", "1", "--out", str(tmp_path / "base")]) == 0
    base = ["--checkpoint", str(tmp_path / "base" / "last.pt")]
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MAIN, "prune", *PRUNE, *base, "--out", str(cut)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (cut / "last.pt").exists() or load_file(cut / "last.pt")["step"] < 6:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run wrote no checkpoint in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = load_file(cut / "last.pt")
    assert killed_at["step"] <= 10 and not (cut / "summary.json").exists()  # killed while masking

    assert main(["prune", *PRUNE, *base, "--out", str(cut), "--resume"]) == 0
    assert main(["prune", *PRUNE, *base, "--out", str(tmp_path / "whole")]) == 0
    a, b = load_file(tmp_path / "whole" / "last.pt"), load_file(cut / "last.pt")
    assert a["step"] == b["step"] == 40
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    for key in ("masks", "masked_at", "taylor"):
        assert all(torch.equal(a["hooks"][key][g], m) for g, m in b["hooks"][key].items()), key
    assert any(not m.all() for m in a["hooks"]["masks"].values())  # masking had started
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]
    assert (
        load_file(cut / "deploy.pt")["state_dict"].keys()
        == load_file(tmp_path / "whole" / "deploy.pt")["state_dict"].keys()
    )


def test_a_finished_run_extended_keeps_its_plan_and_fine_tunes_longer(tmp_path):
    """``--resume`` with more ``--epochs``: the masks decided for the first length stay, the cosine after
    the freeze spans the longer run; fewer epochs are refused."""
    assert main(["train", *DATA, "--epochs", "1", "--out", str(tmp_path / "base")]) == 0
    flags = ["prune", *PRUNE, "--checkpoint", str(tmp_path / "base" / "last.pt"), "--out", str(tmp_path / "run")]
    two = [*flags, "--epochs", "2"]  # argparse: the last --epochs wins
    assert main(two) == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    before = load_file(tmp_path / "run" / "last.pt")
    masks = before["hooks"]["masks"]
    assert main([*flags, "--epochs", "3", "--resume"]) == 0
    extended = json.loads((tmp_path / "run" / "summary.json").read_text())
    saved = load_file(tmp_path / "run" / "last.pt")
    assert saved["step"] == 24 and [r["epoch"] for r in saved["history"]] == [1, 2, 3]
    assert extended["epochs"] == 3 and extended["plan"]["total_iters"] == 24
    assert {k: v for k, v in extended["plan"].items() if k != "total_iters"} == {
        k: v for k, v in first["plan"].items() if k != "total_iters"
    }
    assert all(torch.equal(saved["hooks"]["masks"][g], m) for g, m in masks.items())
    # the 2-epoch schedule ends at lr 0: the weights move again only on the longer cosine
    moved = [k for k, v in before["model"].items() if v.is_floating_point() and not torch.equal(saved["model"][k], v)]
    assert any(k.endswith("weight") and "bn" not in k for k in moved)
    assert saved["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12) and extended["largest_removed_norm"] == 0.0
    assert main([*flags, "--epochs", "2", "--resume"]) == 2
