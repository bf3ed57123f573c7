"""`benchmarks/prune_cifar.py` end to end on a tiny synthetic stand-in for ../shared/data (random JPEG
images in the CIFAR-10 JPEG-bytes layout and a randomly initialised "published" ResNet-20), plus its
input checks and the L1 one-shot selection."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.resrep.models import CifarResNet
from reparam.graph import trace

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "prune_cifar.py"


def _load_script():
    if str(SCRIPT.parent) not in sys.path:  # the script imports its sibling `common`, as when run directly
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("prune_cifar", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _jpegs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return np.concatenate(blobs), offsets


def fake_shared_data(root: Path, n_train: int = 64, n_test: int = 32) -> Path:
    """The ../shared/data layout in miniature: cifar10-jpeg/cifar10_jpegbytes.npz and cifar-resnet/resnet20-*.th."""
    rng = np.random.default_rng(0)
    (root / "cifar10-jpeg").mkdir(parents=True)
    (root / "cifar-resnet").mkdir()
    train_jpeg, train_offsets = _jpegs(rng, n_train)
    test_jpeg, test_offsets = _jpegs(rng, n_test)
    np.savez(root / "cifar10-jpeg" / "cifar10_jpegbytes.npz", train_jpeg=train_jpeg, train_offsets=train_offsets,
             y_train=np.arange(n_train) % 10, test_jpeg=test_jpeg, test_offsets=test_offsets,
             y_test=np.arange(n_test) % 10)
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in CifarResNet(20).state_dict().items()}
    torch.save({"state_dict": state, "best_prec1": 10.0}, root / "cifar-resnet" / "resnet20-00000000.th")
    return root


def test_missing_data_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_script().main(["--data", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "cifar10_jpegbytes.npz not found" in capsys.readouterr().err


def test_l1_oneshot_meets_the_macs_target():
    bench = _load_script()
    torch.manual_seed(0)
    model, x = CifarResNet(20).eval(), torch.randn(1, 3, 32, 32)
    small = bench.l1_prune(model, x, 0.471)
    base_macs = trace(model, x).macs()
    assert 0.4 * base_macs < trace(small, x).macs() <= 0.471 * base_macs
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resrep_schedule_scales_with_the_budget_and_depth():
    schedule = _load_script().resrep_schedule
    # the schedule the ResNet-20 quick runs used: 8 epochs of 782 iterations
    assert schedule(6256, 3) == {"before": 782, "stop": 3500, "interval": 40, "granularity": 4, "lasso": 1e-3}
    # ResNet-56 over 2 epochs: same fractions, rounds and total lasso pull, 3x the channels per round
    short = schedule(1564, 9)
    assert short == {"before": 196, "stop": 875, "interval": 10, "granularity": 12, "lasso": pytest.approx(4e-3)}
    assert (short["stop"] - short["before"]) // short["interval"] >= 67
    assert schedule(10, 3)["interval"] == 1


@pytest.mark.slow
def test_benchmark_end_to_end_and_reuse(tmp_path):
    data = fake_shared_data(tmp_path / "data")
    common = [sys.executable, str(SCRIPT), "--data", str(data), "--epochs", "2", "--threads", "1", "--repeats", "1",
              "--train-limit", "64", "--test-limit", "32", "--out", str(tmp_path / "runs"),
              "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results")]

    def run(*extra: str) -> tuple[str, list[dict]]:
        done = subprocess.run([*common, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout, json.loads((tmp_path / "results" / "prune_cifar_quick.json").read_text())["results"]

    stdout, rows = run("--methods", "a,b,c,d")
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == ["resrep-paper", "resrep-residual", "tp-groupnorm", "l1-oneshot"]
    assert all(r["status"] == "done" for r in rows), rows
    for method in ("tp-groupnorm", "l1-oneshot"):  # these prune at once, so they meet the target exactly
        assert by_method[method]["macs_kept"] <= 0.471
    assert set(by_method["l1-oneshot"]["latency_ms"]) == {"1", "64"}
    assert "| 0.471 | l1-oneshot |" in stdout

    # b and d at 0.471 are reused, not rerun; curve targets run for b (and c) only; 1e-4 of the MACs is below
    # every method's floor: recorded, no crash
    stdout, curve = run("--methods", "b,d", "--curve-targets", "0.0001")
    assert "[resrep-residual] " not in stdout and "[l1-oneshot] " not in stdout
    assert [(r["method"], r["target"], r["status"]) for r in curve] == [
        ("resrep-residual", 0.471, "done"), ("l1-oneshot", 0.471, "done"), ("resrep-residual", 0.0001, "failed")]
    assert "out of reach" in curve[2]["error"], curve[2]
    assert curve[1]["accuracy_after"] == by_method["l1-oneshot"]["accuracy_after"]
    assert "| 0.0001 | resrep-residual | failed: " in stdout
    assert (tmp_path / "results" / "prune_cifar_quick_curve.png").stat().st_size > 0
