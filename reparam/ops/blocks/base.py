"""What every mergeable block shares: its geometry, branch alignment, and the deploy conversion.

A block is a sum of linear branches (each a conv with an eval-mode norm folded in) read through
the geometry of its main kxk conv: kernel K, stride s, dilation d, padding P (per side), groups g.
Every branch is built so that its taps land on taps of that main kernel, hence the whole block
is one conv `x ↦ conv(x; ΣW_j, geometry) + Σb_j` after merging (`merged()`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from reparam.ops._array import bias_or_zeros
from reparam.ops.branches import identity_tap
from reparam.ops.geometry import ConvGeometry
from reparam.ops.modules import geometry_to_module, norm_stats_from_module
from reparam.ops.norm import fuse_bn
from reparam.ops.torch_conv import pad_nd

Norm = Callable[[int], nn.Module]
"""A norm-layer factory `num_features -> module` (e.g. `nn.BatchNorm2d`, `partial(nn.BatchNorm2d, eps=1e-3)`)."""

Size2 = int | Sequence[int]


def pair(value: Size2, name: str = "size") -> tuple[int, int]:
    """`3 -> (3, 3)`; a length-2 sequence is returned as a tuple of ints. ValueError otherwise (the blocks
    are 2-D; string paddings such as ``"same"`` are not theirs: ``padding=None`` centres the kernel)."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(
            f"{name}={value!r}: the blocks are 2-D and take an int or a pair of ints"
            + (" (padding=None gives the centred 'same'-style padding)" if isinstance(value, str) else "")
        )
    h, w = value
    return (int(h), int(w))


def block_geometry(
    kernel_size: Size2,
    stride: Size2 = 1,
    padding: Size2 | None = None,
    dilation: Size2 = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> ConvGeometry:
    """The geometry of a block's main conv from `nn.Conv2d`-style arguments.

    `padding=None` means same-style `P = d·(k−1)//2` on both sides of each dim (so an even kernel
    keeps a symmetric padding and the deploy module is a plain `nn.Conv2d`); an int or pair is
    symmetric, as in `nn.Conv2d`.
    """
    k, d = pair(kernel_size, "kernel_size"), pair(dilation, "dilation")
    p = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d)) if padding is None else pair(padding, "padding")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {p}")
    return ConvGeometry.create(k, pair(stride, "stride"), p, d, groups, padding_mode)


def aligned_geometry(target: ConvGeometry, kernel_size: Size2, rate: Size2 = 1) -> ConvGeometry:
    """The geometry of a branch with kernel `k` and dilation `r·d` whose taps land on `target`'s.

    The branch covers `e = r(k−1)+1` target taps starting at offset `o = (K−e)//2` (centred, or one
    tap before centre when `K−e` is odd). Output i of the target reads input `s·i − P_b + d·u`, of
    the branch `s·i − p_b + r·d·v`, so `u = o + r·v` iff `p_b = P_b − d·o`; the output sizes agree
    iff `p_a = P_a − d·(K − e − o)`. Paddings may come out asymmetric or negative (a crop).
    """
    k, r = pair(kernel_size), pair(rate)
    pads = []
    for (p_b, p_a), big, small, ri, di in zip(target.padding, target.kernel_size, k, r, target.dilation):
        extent = ri * (small - 1) + 1
        if extent > big:
            raise ValueError(
                f"a branch of kernel {k} and rate {r} spans {extent} taps, more than the block's kernel {big}"
            )
        offset = (big - extent) // 2
        pads.append((p_b - di * offset, p_a - di * (big - extent - offset)))
    return target.replace(
        kernel_size=k, dilation=tuple(ri * di for ri, di in zip(r, target.dilation)), padding=tuple(pads)
    )


def unpadded(geometry: ConvGeometry) -> ConvGeometry:
    """`geometry` without padding: a stage that runs on an already padded input."""
    return geometry.replace(padding=((0, 0),) * geometry.ndim)


def subsample(x: Tensor, stride: tuple[int, int]) -> Tensor:
    """The identity branch of a strided block: `x[..., ::s_h, ::s_w]`."""
    return x[..., :: stride[0], :: stride[1]]


def mean_over_taps(padded: Tensor, geometry: ConvGeometry) -> Tensor:
    """Average pooling over the (dilated) `kh × kw` taps of `geometry`, stride s, on an already padded input
    (padded positions count, as with `count_include_pad=True`): a depthwise conv with weights `1/(kh·kw)`."""
    channels = padded.shape[1]
    kh, kw = geometry.kernel_size
    weight = torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=padded.dtype, device=padded.device)
    return nn.functional.conv2d(padded, weight, None, geometry.stride, 0, geometry.dilation, channels)


def identity_representable(in_channels: int, out_channels: int, geometry: ConvGeometry) -> bool:
    """An identity `x[..., ::s, ::s]` is a tap `u` of the main kernel iff C_in = C_out, `P_b = d·u`
    and `P_a = d·(K−1−u)` (output i reads input `s·i − P_b + d·u = s·i`; the output sizes agree)."""
    tap_exists = all(
        identity_tap(k, d, pad) is not None
        for pad, k, d in zip(geometry.padding, geometry.kernel_size, geometry.dilation)
    )
    return in_channels == out_channels and tap_exists


def resolve_identity(identity: bool | None, in_channels: int, out_channels: int, geometry: ConvGeometry) -> bool:
    """`None`: an identity branch whenever representable; `True`: required (ValueError if not); `False`: none."""
    possible = identity_representable(in_channels, out_channels, geometry)
    if identity and not possible:
        raise ValueError(
            f"identity branch needs in_channels == out_channels (got {in_channels}, {out_channels}) and a tap u with "
            f"padding (d·u, d·(k−1−u)) per dim, e.g. padding d·(k−1)/2 for an odd kernel (got kernel "
            f"{geometry.kernel_size}, padding {geometry.padding}, dilation {geometry.dilation}); pass identity=None or False"
        )
    return possible if identity is None else identity


class BranchConv(nn.Module):
    """One branch: a conv whose taps land on the block's main kernel, optionally followed by a norm.

    It reads the block input *already padded by the block's padding* (so every branch sees the
    same padded values, whatever the padding mode) and crops the part outside its own reach:
    `P − p` per side (`aligned_geometry`; never negative). `kernel_size=None` is the main kernel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block: ConvGeometry,
        kernel_size: Size2 | None = None,
        rate: Size2 = 1,
        *,
        bias: bool,
        norm: Norm | None,
    ) -> None:
        super().__init__()
        self.geometry = block if kernel_size is None else aligned_geometry(block, kernel_size, rate)
        self.crop = tuple((tb - b, ta - a) for (tb, ta), (b, a) in zip(block.padding, self.geometry.padding))
        g = self.geometry
        self.conv = nn.Conv2d(in_channels, out_channels, g.kernel_size, g.stride, 0, g.dilation, g.groups, bias=bias)
        self.bn = norm(out_channels) if norm is not None else None

    def forward(self, padded: Tensor) -> Tensor:
        (top, bottom), (left, right) = self.crop
        h, w = padded.shape[-2:]
        y = self.conv(padded[..., top : h - bottom, left : w - right])
        return y if self.bn is None else self.bn(y)

    def kernel_bias(self, name: str) -> tuple[Tensor, Tensor | None]:
        """The branch as one conv `(W', b')` in its own geometry (norm folded: `W' = s·W`, `b' = s(b − μ) + β`)."""
        if self.bn is None:
            return self.conv.weight, self.conv.bias
        return fuse_bn(self.conv.weight, self.conv.bias, norm_stats_from_module(self.bn, name=f"{name}.bn"))


def _build_options(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters of `cls.build`: a block's own constructor options."""
    params = list(inspect.signature(cls.build).parameters.values())[1:]
    return {p.name: p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params}


def with_act(conv: nn.Module, act: nn.Module | None) -> nn.Module:
    """`conv`, or `Sequential(conv, act)` when there is a non-identity activation."""
    if act is None or isinstance(act, nn.Identity):
        return conv
    return nn.Sequential(conv, act)


class MergeableBlock(nn.Module):
    """A training-time module with an exactly equivalent plain deploy module, `merged()`."""

    def merged(self) -> nn.Module:
        """A new plain module equal to this block in eval mode (the block itself is untouched)."""
        raise NotImplementedError


class ConvBlock(MergeableBlock):
    """A block that merges into one conv of its main geometry (plus the optional activation).

    The constructor is shared by every such block: the ``nn.Conv2d``-style geometry arguments, then
    the keyword-only layer options `conv_bias` (bias on the branch convs), `norm` (the norm factory of
    the branches), `act`, `device` and `dtype`. A subclass declares only its own options, as the
    keyword parameters of `build`, creates its branches there (`branch_conv`, `make_norm`) and
    implements `branch()` and `merged_kernel_bias()`; its signature (``help()``, ``inspect``) is the
    shared one with those options added.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2,
        stride: Size2 = 1,
        padding: Size2 | None = None,
        dilation: Size2 = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        conv_bias: bool = False,
        norm: Norm = nn.BatchNorm2d,
        act: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        own = _build_options(type(self))
        unknown = sorted(set(options) - set(own))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword arguments {unknown}; "
                f"its own options are {sorted(own)}, the shared ones conv_bias, norm, act, device, dtype"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.geometry = block_geometry(kernel_size, stride, padding, dilation, groups, padding_mode)
        self.act = act if act is not None else nn.Identity()
        self.conv_bias, self.norm_layer = conv_bias, norm
        self.build(**options)
        self.to(device=device, dtype=dtype)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        shared = list(inspect.signature(ConvBlock.__init__).parameters.values())[1:-1]  # no self, no **options
        cut = next(i for i, p in enumerate(shared) if p.kind is inspect.Parameter.KEYWORD_ONLY)
        own = list(_build_options(cls).values())
        cls.__signature__ = inspect.Signature(shared[:cut] + own + shared[cut:])

    def build(self) -> None:
        """Create the branches; a subclass's own constructor options are the keyword parameters here."""
        raise NotImplementedError

    def branch_conv(self, kernel_size: Size2 | None = None, rate: Size2 = 1, *, norm: bool = True) -> BranchConv:
        """A branch from the block's input to its output channels whose taps land on the main kernel
        (`kernel_size` None: the main kernel; `rate`: an extra dilation), followed by the block's norm
        unless `norm` is False."""
        return BranchConv(
            self.in_channels,
            self.out_channels,
            self.geometry,
            kernel_size,
            rate,
            bias=self.conv_bias,
            norm=self.norm_layer if norm else None,
        )

    def make_norm(self, channels: int | None = None) -> nn.Module:
        """A norm of the block's kind over `channels` (default: the output channels)."""
        if self.norm_layer is None:
            raise ValueError(
                f"{type(self).__name__} needs a norm layer for one of its branches with these options "
                "(norm=None was given): pass a batch norm factory, e.g. norm=nn.BatchNorm2d"
            )
        return self.norm_layer(self.out_channels if channels is None else channels)

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor | None]:
        """`(ΣW_j, Σb_j)` in `self.geometry`; differentiable w.r.t. the block's parameters."""
        raise NotImplementedError

    def branch(self, x: Tensor) -> Tensor:
        """The sum of the branches (before the activation)."""
        raise NotImplementedError

    def pad(self, x: Tensor) -> Tensor:
        """`x` padded by the block's padding (and padding mode): what every branch reads."""
        return pad_nd(x, self.geometry.f_pad(), self.geometry.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.branch(x))

    def _dtype(self) -> torch.dtype:
        """The block's floating dtype (of its first floating parameter or buffer)."""
        tensors = [*self.parameters(), *self.buffers()]
        return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())

    def _folding_copy(self) -> ConvBlock:
        """The block itself, or in half precision a float32 copy: 1/√(σ²+ε) and the branch sums are
        computed in float32 and only the result is rounded to the block's dtype."""
        return copy.deepcopy(self).float() if self._dtype() in (torch.float16, torch.bfloat16) else self

    def _deploy_conv(self, kernel: Tensor, bias: Tensor | None) -> nn.Module:
        """The plain conv of the block's geometry and dtype holding ``kernel`` and ``bias``."""
        conv = geometry_to_module(
            self.geometry, self.in_channels, self.out_channels, True, device=kernel.device, dtype=self._dtype()
        )
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias_or_zeros(bias, self.out_channels, kernel))
        return conv

    @torch.no_grad()
    def merged(self) -> nn.Module:
        kernel, bias = self._folding_copy().merged_kernel_bias()
        return with_act(self._deploy_conv(kernel, bias), copy.deepcopy(self.act)).train(self.training)

    @classmethod
    def deploy_module(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2,
        stride: Size2 = 1,
        padding: Size2 | None = None,
        dilation: Size2 = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        act: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **block_options: Any,
    ) -> nn.Module:
        """The deploy module built from the block's constructor arguments (block-only options ignored).

        Loading `block.merged().state_dict()` into it gives a module equal to `block.merged()`.
        """
        geometry = block_geometry(kernel_size, stride, padding, dilation, groups, padding_mode)
        return with_act(geometry_to_module(geometry, in_channels, out_channels, True, device=device, dtype=dtype), act)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, padding_mode={g.padding_mode!r}"
        )
