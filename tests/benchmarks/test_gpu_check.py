"""`benchmarks/gpu_check.py` keeps working where no GPU is: its training check runs on the CPU (bf16
autocast, channels_last), and the script itself refuses cleanly without CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _load():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_check_passes_on_the_cpu():
    out = _load().check_training("bf16", True, steps=12, device="cpu")
    assert out["ok"], out
    assert out["recipe"] == "budget" and out["largest_removed_norm"] == 0.0 and out["macs_kept"] <= 0.5


def test_cr_sfp_check_passes_on_the_cpu():
    out = _load().check_cr_sfp("bf16", steps=8, device="cpu")
    assert out["ok"], out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(tmp_path, capsys):
    assert _load().main(["--out", str(tmp_path / "g.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "g.json").exists()
