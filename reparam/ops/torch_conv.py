"""Convolutions of any `ConvGeometry` with ``torch.nn.functional``: `conv_nd`, `pad_nd`, and a conv
probed into the dense layer it is on a fixed input (`conv_to_fc`, F3).

The torch side of the algebra (the oracle its property tests compare against): the pure functions
beside it take any array-API array, these take torch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import MergeError
from .geometry import ConvGeometry

__all__ = ["conv_nd", "conv_to_fc", "pad_nd"]

_F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_F_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def pad_nd(x: torch.Tensor, pad: list[int], mode: str = "zeros") -> torch.Tensor:
    """``F.pad`` with conv padding-mode names; positive entries pad (by `mode`), then negative ones crop."""
    grow = [p if p > 0 else 0 for p in pad]
    crop = [p if p < 0 else 0 for p in pad]
    if max(grow) > 0:
        x = F.pad(x, grow) if mode == "zeros" else F.pad(x, grow, mode=mode)
    if min(crop) < 0:
        x = F.pad(x, crop)
    return x


def conv_nd(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry) -> torch.Tensor:
    """Apply a convolution of `geometry` (any padding, per side and mode) with torch.nn.functional."""
    n = geometry.ndim
    if geometry.transposed:
        if not geometry.is_symmetric:
            raise MergeError("a transposed conv with asymmetric padding is not supported")
        return _F_CONV_T[n](
            x,
            kernel,
            bias,
            geometry.stride,
            tuple(b for b, _ in geometry.padding),
            geometry.output_padding or 0,
            geometry.groups,
            geometry.dilation,
        )
    x = pad_nd(x, list(geometry.f_pad()), geometry.padding_mode)
    return _F_CONV[n](x, kernel, bias, geometry.stride, 0, geometry.dilation, geometry.groups)


def conv_to_fc(
    kernel: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry, input_shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """F3, any conv on a fixed input ``C × H × W…`` as a Linear from the flattened input to the
    flattened output: column j is the conv (without bias) of the j-th basis image,
    ``W_fc[:, j] = flatten(conv(e_j))``, and the bias repeats per output position. Exact for every
    padding mode, stride and group count because the conv is linear. Torch tensors only."""
    if not isinstance(kernel, torch.Tensor):
        raise TypeError("conv_to_fc probes the conv with torch.nn.functional and takes torch tensors only")
    input_shape = tuple(int(n) for n in input_shape)
    n_in = math.prod(input_shape)
    basis = torch.eye(n_in, dtype=kernel.dtype, device=kernel.device).reshape((n_in,) + input_shape)
    out = conv_nd(basis, kernel, None, geometry)  # (n_in, O, H', W'…)
    weight = out.reshape(n_in, -1).transpose(0, 1)
    positions = math.prod(out.shape[2:])
    fc_bias = None if bias is None else bias.repeat_interleave(positions)
    return weight, fc_bias
