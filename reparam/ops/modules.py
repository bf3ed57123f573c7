"""The torch-module side of the algebra: read a layer's geometry and statistics, build a layer from
a geometry, and the padding modules a merged conv may need.

The algebra itself (`geometry`, `norm`, `branches`, …) takes plain arrays and imports no torch; this
module is where ``nn.Module`` objects meet it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import MergeError
from .geometry import ConvGeometry
from .norm import NormStats
from .torch_conv import pad_nd

__all__ = [
    "AsymmetricPadConv",
    "PadNd",
    "check_avg_pool_mergeable",
    "geometry_from_module",
    "geometry_to_module",
    "is_batch_norm",
    "norm_stats_from_module",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def geometry_from_module(conv: nn.Module) -> ConvGeometry:
    """The geometry of an ``nn.ConvNd`` / ``nn.ConvTransposeNd`` (string paddings included) or
    an `AsymmetricPadConv`."""
    if isinstance(conv, AsymmetricPadConv):
        return conv.geometry
    if not isinstance(conv, nn.modules.conv._ConvNd):
        raise MergeError(f"{type(conv).__name__} is not a convolution")
    n = len(conv.kernel_size)
    if conv.transposed:
        if isinstance(conv.padding, str):
            raise MergeError(f"{type(conv).__name__}: string padding on a transposed conv is not supported")
        return ConvGeometry(
            tuple(conv.kernel_size),
            tuple(conv.stride),
            tuple(conv.dilation),
            tuple((int(p), int(p)) for p in conv.padding),
            conv.groups,
            conv.padding_mode,
            True,
            tuple(int(p) for p in conv.output_padding),
        )
    rp = conv._reversed_padding_repeated_twice  # last spatial dim first, (before, after) pairs
    pads = tuple((int(rp[2 * (n - 1 - i)]), int(rp[2 * (n - 1 - i) + 1])) for i in range(n))
    return ConvGeometry(
        tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), pads, conv.groups, conv.padding_mode
    )


def geometry_to_module(
    geometry: ConvGeometry, in_channels: int, out_channels: int, bias: bool, *, device=None, dtype=None
) -> nn.Module:
    """A fresh layer of `geometry`: ``nn.ConvNd`` (or ``nn.ConvTransposeNd``) when the padding is
    symmetric and non-negative, else an `AsymmetricPadConv`."""
    kw = dict(device=device, dtype=dtype)
    g = geometry
    if g.transposed:
        if not g.is_symmetric:
            raise MergeError("a transposed conv with asymmetric padding has no nn.ConvTranspose equivalent")
        return _CONV_T[g.ndim](
            in_channels,
            out_channels,
            g.kernel_size,
            g.stride,
            tuple(b for b, _ in g.padding),
            g.output_padding or 0,
            g.groups,
            bias,
            g.dilation,
            g.padding_mode,
            **kw,
        )
    if g.is_symmetric and all(b >= 0 for b, _ in g.padding):
        return _CONV[g.ndim](
            in_channels,
            out_channels,
            g.kernel_size,
            g.stride,
            tuple(b for b, _ in g.padding),
            g.dilation,
            g.groups,
            bias,
            g.padding_mode,
            **kw,
        )
    conv = _CONV[g.ndim](in_channels, out_channels, g.kernel_size, g.stride, 0, g.dilation, g.groups, bias, **kw)
    return AsymmetricPadConv(PadNd(g.f_pad(), g.padding_mode), conv)


def _is_frozen_bn(module: nn.Module) -> bool:
    """A FrozenBatchNorm2d (torchvision's, timm's, detectron2's …): statistics and affine as buffers,
    always normalising with them. Recognised by name and buffers, so no torchvision import is needed."""
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(getattr(module, b, None), torch.Tensor) for b in ("weight", "bias", "running_mean", "running_var")
    )


def is_batch_norm(module: nn.Module) -> bool:
    """A norm `norm_stats_from_module` reads: BatchNorm1d/2d/3d, SyncBatchNorm, a FrozenBatchNorm2d."""
    return isinstance(module, _BatchNorm) or _is_frozen_bn(module)


def norm_stats_from_module(bn: nn.Module, name: str | None = None) -> NormStats:
    """Statistics of a BatchNorm1d/2d/3d, SyncBatchNorm or torchvision FrozenBatchNorm2d.

    Refuses (MergeError) a BN that normalises with batch statistics: in training mode, or
    without running statistics (``track_running_stats=False``), or one with a fused activation.
    The returned tensors are the module's own (not detached), so gradients flow through them.
    """
    label = f"{name} ({type(bn).__name__})" if name else type(bn).__name__
    frozen = _is_frozen_bn(bn)  # always normalises with its buffers
    if not is_batch_norm(bn):
        raise MergeError(
            f"{label} is not a batch norm; only BatchNorm1d/2d/3d, SyncBatchNorm and FrozenBatchNorm2d fold"
        )
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise MergeError(
            f"{label} has no running statistics (track_running_stats=False): it normalises with batch "
            "statistics, which no fixed kernel reproduces; train with track_running_stats=True"
        )
    if bn.training and not frozen:
        raise MergeError(
            f"{label} is in training mode and normalises with batch statistics; call .eval() before merging"
        )
    act = getattr(bn, "act", None)
    if act is not None and not isinstance(act, nn.Identity):
        raise MergeError(
            f"{label} applies an activation ({type(act).__name__}) after normalising; only a plain affine folds"
        )
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    return NormStats(bn.running_mean, bn.running_var, weight, bias, float(bn.eps))


def check_avg_pool_mergeable(pool: nn.Module, *, groups: int = 1, name: str | None = None) -> ConvGeometry:
    """Refuse an average pool that is not a fixed convolution; return its conv geometry.

    Not a convolution: ``count_include_pad=False`` with padding (border divisor changes),
    ``ceil_mode=True`` (extra partial windows), ``divisor_override``. `groups` goes into the geometry.
    """
    label = f"{name} ({type(pool).__name__})" if name else type(pool).__name__
    ndims = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
    ndim = next((n for cls, n in ndims.items() if isinstance(pool, cls)), None)
    if ndim is None:
        raise MergeError(f"{label} is not an AvgPool1d/2d/3d and is not a linear convolution")
    k = pool.kernel_size
    stride = pool.stride if pool.stride not in (None, (), []) else k
    pad = pool.padding
    geometry = ConvGeometry.create(k, stride, pad if isinstance(pad, int) else tuple(pad), 1, groups, ndim=ndim)
    if not pool.count_include_pad and geometry.pads:
        raise MergeError(
            f"{label} has count_include_pad=False with padding {pad}: border windows divide by fewer "
            "elements, which no fixed kernel does; use count_include_pad=True or padding=0"
        )
    if pool.ceil_mode:
        raise MergeError(
            f"{label} has ceil_mode=True: the extra partial windows are not a convolution; use ceil_mode=False"
        )
    if getattr(pool, "divisor_override", None) is not None:
        raise MergeError(
            f"{label} has divisor_override={pool.divisor_override}; remove it (or scale the kernel yourself)"
        )
    return geometry


class PadNd(nn.Module):
    """``pad_nd`` as a module (TorchScript- and ONNX-exportable): `pad` in ``F.pad`` order."""

    def __init__(self, pad: Sequence[int], mode: str = "zeros") -> None:
        super().__init__()
        self.pad: list[int] = [int(p) for p in pad]
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_nd(x, self.pad, self.mode)

    def extra_repr(self) -> str:
        return f"pad={tuple(self.pad)}, mode={self.mode!r}"


class AsymmetricPadConv(nn.Sequential):
    """``PadNd`` followed by an unpadded conv: a convolution whose padding differs per side."""

    __jit_unused_properties__ = ["conv", "weight", "bias", "geometry"]

    def __init__(self, pad: PadNd, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__(pad, conv)

    @property
    def conv(self) -> nn.modules.conv._ConvNd:
        return self[1]

    @property
    def weight(self) -> torch.Tensor:
        return self[1].weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias

    @property
    def geometry(self) -> ConvGeometry:
        pad = self[0].pad
        n = len(pad) // 2
        inner = geometry_from_module(self[1])
        return inner.replace(
            padding=tuple((pad[2 * (n - 1 - i)], pad[2 * (n - 1 - i) + 1]) for i in range(n)), padding_mode=self[0].mode
        )
