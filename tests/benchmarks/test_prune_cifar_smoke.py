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

from apps.engine.models import CifarResNet
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
    np.savez(
        root / "cifar10-jpeg" / "cifar10_jpegbytes.npz",
        train_jpeg=train_jpeg,
        train_offsets=train_offsets,
        y_train=np.arange(n_train) % 10,
        test_jpeg=test_jpeg,
        test_offsets=test_offsets,
        y_test=np.arange(n_test) % 10,
    )
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in CifarResNet(20).state_dict().items()}
    torch.save({"state_dict": state, "best_prec1": 10.0}, root / "cifar-resnet" / "resnet20-00000000.th")
    return root


def test_missing_data_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_script().main(["--data", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "cifar10_jpegbytes.npz not found" in capsys.readouterr().err


def test_ablation_runs_all_or_the_chosen_variants(tmp_path, capsys):
    bench = _load_script()
    data = ["--data", str(fake_shared_data(tmp_path)), "--targets", "0.35,0.471", "--seeds", "2,3"]
    every = bench.planned_runs(bench.parse_args([*data, "--ablation"]))
    assert [r.variant for r in every] == list(bench.ABLATIONS)
    assert {(r.method, r.target, r.seed) for r in every} == {("resrep-residual", 0.35, 2)}
    last = len(bench.ABLATIONS) - 1
    paper = [i for i, flags in enumerate(bench.ABLATIONS.values()) if flags == ("--recipe", "paper")]
    assert len(paper) == 1
    chosen = bench.planned_runs(bench.parse_args([*data, "--ablation", f"0,{paper[0]},{last}"]))
    names = list(bench.ABLATIONS)
    assert [r.variant for r in chosen] == [names[0], names[paper[0]], names[last]]
    # every variant of the budget recipe names it, so that it stays one where auto would pick the paper's
    assert bench.ABLATIONS[chosen[0].variant] == ("--recipe", "budget")
    assert all(flags[:2] == ("--recipe", "budget") for i, flags in enumerate(bench.ABLATIONS.values()) if i != paper[0])
    plain = bench.planned_runs(bench.parse_args(data))
    assert len(plain) == 2 * 4 * 2 and not any(r.variant for r in plain)  # targets x default methods x seeds
    for bad in (str(last + 1), "x", ","):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args([*data, "--ablation", bad])
        assert exit_info.value.code == 2
        assert "--ablation takes comma-separated positions" in capsys.readouterr().err


def test_a_run_that_missed_its_target_stays_failed_on_rerun(tmp_path):
    bench = _load_script()
    assert bench._finished(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps({"target_met": True}))
    assert bench._finished(tmp_path) == {"status": "done"}
    (tmp_path / "summary.json").write_text(json.dumps({"target_met": False}))
    missed = bench._finished(tmp_path)
    assert missed["status"] == "failed" and missed["exit_code"] == 2 and "missed its MACs target" in missed["error"]


def test_l1_oneshot_meets_the_macs_target():
    bench = _load_script()
    torch.manual_seed(0)
    model, x = CifarResNet(20).eval(), torch.randn(1, 3, 32, 32)
    small = bench.l1_prune(model, x, 0.471)
    base_macs = trace(model, x).macs()
    assert 0.4 * base_macs < trace(small, x).macs() <= 0.471 * base_macs
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_seeds_aggregate_into_mean_and_spread():
    bench = _load_script()
    rows = [
        {
            "target": 0.471,
            "method": "l1-oneshot",
            "variant": "",
            "seed": s,
            "status": "done",
            "accuracy_after": a,
            "accuracy_drop": 87.0 - a,
            "macs": 10.0,
            "macs_reduction": 0.5,
            "params": 5.0,
            "params_reduction": 0.4,
            "train_time_s": 60.0,
            "wall_time_s": 70.0,
        }
        for s, a in ((0, 80.0), (1, 82.0), (2, 84.0))
    ]
    rows.append(
        {"target": 0.471, "method": "l1-oneshot", "variant": "", "seed": 3, "status": "failed", "error": "boom"}
    )
    (entry,) = bench.aggregate(rows)
    assert entry["seeds"] == [0, 1, 2] and entry["failed"] == {3: "boom"}
    assert entry["accuracy_mean"] == pytest.approx(82.0) and entry["accuracy_std"] == pytest.approx(2.0)
    assert entry["drop_mean"] == pytest.approx(5.0) and "latency_ms" not in entry


@pytest.mark.slow
def test_benchmark_end_to_end_and_reuse(tmp_path):
    data = fake_shared_data(tmp_path / "data")
    common = [
        sys.executable,
        str(SCRIPT),
        "--data",
        str(data),
        "--epochs",
        "3",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--train-limit",
        "64",
        "--test-limit",
        "32",
        "--out",
        str(tmp_path / "runs"),
        "--cache",
        str(tmp_path / "cache"),
        "--results",
        str(tmp_path / "results"),
    ]
    result = tmp_path / "results" / "prune_cifar_quick_e3.json"

    def run(*extra: str) -> tuple[str, dict]:
        done = subprocess.run(
            [*common, *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout, json.loads(result.read_text())

    stdout, payload = run("--methods", "a,b,c,d,e,f,g", "--targets", "0.471", "--seeds", "0", "--jobs", "2")
    by_method = {r["method"]: r for r in payload["results"]}
    assert list(by_method) == [
        "resrep-paper",
        "resrep-residual",
        "tp-groupnorm",
        "l1-oneshot",
        "csgd",
        "sfp",
        "cr-sfp",
    ]
    # 3 iterations cannot collapse C-SGD's clusters: its merge is refused, with the measured spread, and recorded
    csgd = by_method.pop("csgd")
    assert csgd["status"] == "failed" and "have not converged" in csgd["error"], csgd
    assert all(r["status"] == "done" for r in by_method.values()), payload["results"]
    for r in by_method.values():  # every method meets the target; ResRep's budget recipe exactly (removed rows 0)
        assert r["macs_kept"] <= 0.471, r
    assert by_method["resrep-residual"]["largest_removed_norm"] == 0.0
    for v in ("sfp", "cr-sfp"):  # exported narrow and exact, MACs counted on the narrow model
        assert by_method[v]["exact"] and by_method[v]["max_rel_error"] <= 1e-10, by_method[v]
    assert by_method["resrep-residual"]["plan"]["recipe"] == "budget"
    assert set(by_method["l1-oneshot"]["latency_ms"]) == {"1", "64"}
    assert "| 0.471 | l1-oneshot | 1 |" in stdout

    # b and d at 0.471 are reused, not rerun; a second seed runs; 1e-4 of the MACs is below every
    # method's floor: recorded, no crash
    stdout, payload = run("--methods", "b,d", "--targets", "0.471,0.0001", "--seeds", "0,1")
    assert "[resrep-residual@0.471 seed 0] " not in stdout and "[l1-oneshot@0.471 seed 0] " not in stdout
    assert "[l1-oneshot@0.471 seed 1] running" in stdout
    status = [(r["method"], r["target"], r["seed"], r["status"]) for r in payload["results"]]
    assert status[:4] == [
        ("resrep-residual", 0.471, 0, "done"),
        ("resrep-residual", 0.471, 1, "done"),
        ("l1-oneshot", 0.471, 0, "done"),
        ("l1-oneshot", 0.471, 1, "done"),
    ]
    assert {s[3] for s in status[4:]} == {"failed"}
    assert "out of reach" in payload["results"][4]["error"]
    assert payload["results"][2]["accuracy_after"] == by_method["l1-oneshot"]["accuracy_after"]
    assert payload["summary"][0]["seeds"] == [0, 1] and payload["summary"][0]["accuracy_std"] is not None
    assert "| 0.0001 | resrep-residual | | seed 0 failed: " in stdout
    assert (tmp_path / "results" / "prune_cifar_quick_e3_curve.png").stat().st_size > 0
