"""Exports (state_dict, TorchScript, ONNX) reproduce PyTorch or are refused with nothing left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apps.engine.checkpoint import load_file
from apps.engine.export import ExportError, export_model
from apps.engine.models import DigitsResNet

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript export is asked for


def test_all_formats_match_pytorch(tmp_path):
    torch.manual_seed(0)
    model = DigitsResNet(width=4).eval()
    x = torch.randn(3, 1, 8, 8)
    results = export_model(model, x, tmp_path, extra={"arch": {"arch": "digits_resnet"}})
    assert [r.format for r in results] == ["state_dict", "torchscript", "onnx"]
    for r in results:
        assert r.path.is_file() and r.max_rel_error is not None and r.max_rel_error <= 1e-5, r
    assert {r.format: r.checked_with for r in results}["onnx"] == "onnxruntime"
    saved = load_file(tmp_path / "model.pt")
    assert saved["arch"] == {"arch": "digits_resnet"} and set(saved["state_dict"]) == set(model.state_dict())
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    torch.testing.assert_close(loaded(torch.ones(5, 1, 8, 8)), model(torch.ones(5, 1, 8, 8)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt", "model.ts"]


class BatchDependent(nn.Module):
    """Control flow on the data: a trace bakes in the branch of the example batch."""

    def forward(self, x):
        return x * 2 if x.shape[0] < 4 and x.sum() > -1e9 else x


def test_inexact_export_is_refused_and_removed(tmp_path):
    with pytest.raises(ExportError, match="torchscript export does not reproduce PyTorch"):
        with pytest.warns(torch.jit.TracerWarning):
            export_model(BatchDependent(), torch.ones(3, 2), tmp_path, formats=["torchscript"])
    assert list(tmp_path.iterdir()) == []


def test_unknown_format():
    with pytest.raises(ExportError, match="unknown export formats"):
        export_model(DigitsResNet(), torch.ones(1, 1, 8, 8), "unused", formats=["tflite"])
