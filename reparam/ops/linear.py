"""Linear layers and convolutions as each other (F1–F4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._array import Array, namespace
from .errors import MergeError
from .geometry import ConvGeometry
from .norm import NormStats

__all__ = ["linear_to_conv", "conv1x1_to_linear", "conv_to_linear", "repeat_norm_for_fc"]


def linear_to_conv(weight: Array, ndim: int) -> Array:
    """F1, a Linear weight ``O × I`` as the kernel ``O × I × 1…`` of an `ndim`-d 1x1 conv
    (stride 1, padding 0), applied to channel-first inputs."""
    return namespace(weight).reshape(weight, tuple(weight.shape) + (1,) * ndim)


def conv1x1_to_linear(kernel: Array, geometry: ConvGeometry | None = None) -> Array:
    """F1, a 1x1 conv kernel ``O × I × 1…`` as a Linear weight ``O × I`` over the channel axis.
    With `geometry`, checks that the conv is a plain per-position map (stride 1, padding 0, groups 1)."""
    if any(k != 1 for k in kernel.shape[2:]):
        raise MergeError(f"conv1x1_to_linear: kernel {tuple(kernel.shape)} is not 1x1")
    if geometry is not None and (
        any(s != 1 for s in geometry.stride) or any(p != (0, 0) for p in geometry.padding) or geometry.groups != 1
    ):
        raise MergeError(
            f"conv1x1_to_linear: stride {geometry.stride}, padding {geometry.padding}, groups "
            f"{geometry.groups} is not a per-position linear map; need stride 1, padding 0, groups 1"
        )
    return namespace(kernel).reshape(kernel, tuple(kernel.shape[:2]))


def conv_to_linear(
    kernel: Array, bias: Array | None, input_shape: Sequence[int], geometry: ConvGeometry | None = None
) -> tuple[Array, Array | None]:
    """F2, an unpadded groups-1 conv whose kernel covers the whole fixed input ``C × H × W…`` is a
    Linear on the flattened input: ``W.reshape(O, C·H·W…)`` (channel-major flatten, as ``torch.flatten``)."""
    input_shape = tuple(int(n) for n in input_shape)
    if tuple(kernel.shape[1:]) != input_shape:
        raise MergeError(
            f"conv_to_linear: kernel {tuple(kernel.shape)} does not cover the whole input {input_shape} "
            "(needs groups 1 and kernel size = input size); use conv_to_fc for a sliding conv"
        )
    if geometry is not None and (geometry.groups != 1 or any(p != (0, 0) for p in geometry.padding)):
        raise MergeError(
            f"conv_to_linear: padding {geometry.padding} / groups {geometry.groups} — needs padding 0, groups 1"
        )
    return namespace(kernel).reshape(kernel, (kernel.shape[0], math.prod(input_shape))), bias


def repeat_norm_for_fc(stats: NormStats, hw: int) -> NormStats:
    """F4, a BN over ``C`` channels applied to an FC output laid out as ``C × (h·w)``: the per-feature
    statistics of the flattened output repeat each channel's entry `hw` times."""

    def rep(v: Array) -> Array:
        xp = namespace(v)
        return xp.reshape(xp.broadcast_to(xp.reshape(v, (v.shape[0], 1)), (v.shape[0], hw)), (v.shape[0] * hw,))

    return stats.map(rep)
