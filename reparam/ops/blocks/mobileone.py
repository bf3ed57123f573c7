"""MobileOne block: several kxk conv-BN branches + a 1x1 "scale" conv-BN + a BN identity."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reparam.ops.blocks.base import BranchConv, ConvBlock, Norm, Size2, resolve_identity, subsample
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, embed_kernel, identity_kernel
from reparam.ops.norm import NormStats, fuse_bn


@register_block
class MobileOneBlock(ConvBlock):
    """`act(Σ_{j<n} BN_j(conv_kxk_j(x)) + BN(conv_1x1(x)) + BN(x[..., ::s, ::s]))`.

    `num_branches` over-parameterised kxk conv-BN branches of the main geometry, a 1x1 "scale"
    branch aligned on the main kernel (omitted for a 1x1 block or with `scale_branch=False`) and an
    identity BN when representable (`identity=None`, see `RepVGGBlock`). Merged: the sum of the
    folded branches, the 1x1 embedded at its aligned tap and `s_id·Id`.
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
        num_branches: int = 1,
        scale_branch: bool = True,
        identity: bool | None = None,
        conv_bias: bool = False,
        norm: Norm = nn.BatchNorm2d,
        act: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, act)
        if num_branches < 1:
            raise ValueError(f"num_branches must be at least 1, got {num_branches}")
        g = self.geometry
        self.convs = nn.ModuleList(
            BranchConv(in_channels, out_channels, g, bias=conv_bias, norm=norm) for _ in range(num_branches)
        )
        has_scale = scale_branch and g.kernel_size != (1, 1)
        self.conv_scale = BranchConv(in_channels, out_channels, g, 1, bias=conv_bias, norm=norm) if has_scale else None
        has_identity = resolve_identity(identity, in_channels, out_channels, g)
        self.bn_identity = norm(out_channels) if has_identity else None
        self.to(device=device, dtype=dtype)

    def branch(self, x: Tensor) -> Tensor:
        padded = self.pad(x)
        y = sum(conv(padded) for conv in self.convs)
        if self.conv_scale is not None:
            y = y + self.conv_scale(padded)
        if self.bn_identity is not None:
            y = y + self.bn_identity(subsample(x, self.geometry.stride))
        return y

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor]:
        g = self.geometry
        terms = [conv.kernel_bias(f"MobileOneBlock.convs.{i}") for i, conv in enumerate(self.convs)]
        if self.conv_scale is not None:
            k, b = self.conv_scale.kernel_bias("MobileOneBlock.conv_scale")
            terms.append((embed_kernel(k, self.conv_scale.geometry, g), b))
        if self.bn_identity is not None:
            eye = identity_kernel(self.out_channels, g.groups, g, like=terms[0][0])
            terms.append(fuse_bn(eye, None, NormStats.from_module(self.bn_identity, name="MobileOneBlock.bn_identity")))
        return add_branches(*terms)
