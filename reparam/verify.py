"""Numerical equivalence of two modules: the check every conversion runs on itself."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from reparam.ops.errors import MergeError

DEFAULT_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
"""Default bound on `max|Δ| / max|y|` per output dtype: the project's tolerance, 1e-10 in float64 and 1e-5 in
float32 (half precisions: their own rounding)."""


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance for outputs of `dtype` (see `DEFAULT_RTOL`)."""
    return DEFAULT_RTOL.get(dtype, DEFAULT_RTOL[torch.float32])


def _leaves(out: Any) -> list[Tensor]:
    """The tensors in a (nested) tuple / list / dict output."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for key in sorted(out) for t in _leaves(out[key])]
    if isinstance(out, Sequence) and not isinstance(out, str):
        return [t for item in out for t in _leaves(item)]
    return []


def relative_error(reference: Any, candidate: Any) -> float:
    """`max|y − ŷ| / max|y|` over all output tensors (`max|y − ŷ|` when `y` is all zeros); inf if not finite."""
    ys, zs = _leaves(reference), _leaves(candidate)
    if len(ys) != len(zs) or any(y.shape != z.shape for y, z in zip(ys, zs)):
        raise MergeError(
            f"outputs differ in structure: {[tuple(y.shape) for y in ys]} vs {[tuple(z.shape) for z in zs]}"
        )
    if not ys:
        raise MergeError("the modules returned no tensors to compare")
    ys, zs = [y.detach().double() for y in ys], [z.detach().double() for z in zs]
    delta = max(float((y - z).abs().max()) if y.numel() else 0.0 for y, z in zip(ys, zs))
    scale = max(float(y.abs().max()) if y.numel() else 0.0 for y in ys)
    err = delta / scale if scale > 0 else delta
    return err if math.isfinite(err) else math.inf


def verify_equivalence(
    reference: nn.Module, candidate: nn.Module, inputs: Tensor | Sequence[Tensor], *, rtol: float | None = None
) -> float:
    """Run both modules on `inputs` (no grad, modes as they are) and return `max|Δ| / max|y|`.

    Raises `MergeError` when the error exceeds `rtol` (default: `default_rtol` of the reference
    output dtype) or is not finite.
    """
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    with torch.no_grad():
        y = reference(*args)
        z = candidate(*args)
    err = relative_error(y, z)
    tol = default_rtol(_leaves(y)[0].dtype) if rtol is None else rtol
    if not err <= tol:
        raise MergeError(
            f"{type(candidate).__name__} is not equivalent to {type(reference).__name__}: max relative error "
            f"{err:.3g} exceeds rtol {tol:.3g} (are all norms in eval mode, and is every merged op linear?)"
        )
    return err
