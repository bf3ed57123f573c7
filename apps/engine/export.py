"""Export a (converted) model as state_dict, TorchScript and ONNX, each checked against PyTorch.

Every file is written under a temporary name, reloaded, run on the example batch and on a batch of
another size, and compared with the eager model: max |y_file - y_torch| / max |y_torch| must stay within
`tolerance`, or `ExportError` is raised and nothing is left behind. ONNX files are checked by
onnxruntime when it is installed (by `onnx.checker` alone otherwise, said so in the result).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reparam.atomic import atomic_save
from reparam.ops import MergeError
from reparam.verify import relative_error

from .checkpoint import load_file

__all__ = ["ExportError", "ExportResult", "export_model", "FORMATS"]

FORMATS = ("state_dict", "torchscript", "onnx")


class ExportError(RuntimeError):
    """An exported file does not reproduce the PyTorch outputs (or could not be produced)."""


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: Path
    max_rel_error: float | None  # None: no runtime available to compare
    checked_with: str


def _state_dict_check(model: nn.Module, tmp: Path, inputs: Sequence[torch.Tensor], extra: Mapping[str, Any]):
    atomic_save({**extra, "state_dict": model.state_dict()}, tmp)
    fresh = copy.deepcopy(model)
    for t in fresh.state_dict().values():
        t.zero_()
    fresh.load_state_dict(load_file(tmp)["state_dict"])
    return lambda x: fresh(x), "torch.load(weights_only=True) into the same architecture"


def _torchscript_check(model: nn.Module, tmp: Path, inputs: Sequence[torch.Tensor], extra):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        scripted = torch.jit.trace(model, inputs[0])
        torch.jit.save(scripted, str(tmp))
        loaded = torch.jit.load(str(tmp), map_location="cpu")  # TorchScript is deprecated upstream, still asked for
    return lambda x: loaded(x), "torch.jit.load"


def _onnx_check(model: nn.Module, tmp: Path, inputs: Sequence[torch.Tensor], extra):
    import onnx

    with warnings.catch_warnings():  # the TorchScript-based exporter: deprecated, but ~30x faster here
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX")
        torch.onnx.export(
            model,
            (inputs[0],),
            str(tmp),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx.checker.check_model(str(tmp))
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnx.checker only (onnxruntime not installed)"
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])), "onnxruntime"


_WRITERS = {
    "state_dict": (".pt", _state_dict_check),
    "torchscript": (".ts", _torchscript_check),
    "onnx": (".onnx", _onnx_check),
}


def check_formats(formats: Sequence[str]) -> None:
    """ExportError naming the formats this module cannot write (checked before any training)."""
    unknown = [f for f in formats if f not in _WRITERS]
    if unknown:
        raise ExportError(f"unknown export formats {unknown}; choose from {FORMATS}")


def export_model(
    model: nn.Module,
    example_inputs: torch.Tensor,
    out_dir: str | Path,
    *,
    name: str = "model",
    formats: Sequence[str] = FORMATS,
    tolerance: float = 1e-5,
    extra: Mapping[str, Any] | None = None,
) -> list[ExportResult]:
    """Write ``out_dir/name.{pt,ts,onnx}`` for the requested `formats` and verify each one.

    The export runs on a float32 CPU copy in eval mode (the model itself is untouched). `extra` is
    stored beside the state_dict (e.g. the architecture and channel widths needed to rebuild it).
    """
    check_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).cpu().float().eval()
    x = example_inputs.detach().cpu().float()
    other = torch.cat([x, x.flip(0)])[: len(x) + 1] if len(x) > 0 else x  # another batch size
    inputs = [x, other]
    with torch.no_grad():
        refs = [net(t) for t in inputs]
    results = []
    for fmt in formats:
        suffix, write = _WRITERS[fmt]
        final = out_dir / f"{name}{suffix}"
        tmp = out_dir / f".{name}{suffix}.tmp"
        try:
            try:
                run, how = write(net, tmp, inputs, dict(extra or {}))
            except Exception as e:
                raise ExportError(f"{fmt} export of {type(model).__name__} failed: {type(e).__name__}: {e}") from e
            err = None
            if run is not None:
                with torch.no_grad():
                    try:
                        err = max(relative_error(r, torch.as_tensor(run(t))) for r, t in zip(refs, inputs))
                    except MergeError:  # another output shape
                        err = float("inf")
                if not err <= tolerance:
                    raise ExportError(
                        f"{fmt} export does not reproduce PyTorch: max relative error {err:.3g} "
                        f"> {tolerance:g} (checked with {how})"
                    )
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        results.append(ExportResult(fmt, final, err, how))
    return results
