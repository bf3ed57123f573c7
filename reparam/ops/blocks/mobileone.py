"""MobileOne block: several kxk conv-BN branches + a 1x1 "scale" conv-BN + a BN identity."""

from __future__ import annotations

from torch import Tensor, nn

from reparam.ops.blocks.base import ConvBlock, resolve_identity, subsample
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, embed_kernel, identity_kernel
from reparam.ops.modules import norm_stats_from_module
from reparam.ops.norm import fuse_bn


@register_block
class MobileOneBlock(ConvBlock):
    """`act(Σ_{j<n} BN_j(conv_kxk_j(x)) + BN(conv_1x1(x)) + BN(x[..., ::s, ::s]))`.

    `num_branches` over-parameterised kxk conv-BN branches of the main geometry, a 1x1 "scale"
    branch aligned on the main kernel (omitted for a 1x1 block or with `scale_branch=False`) and an
    identity BN when representable (`identity=None`, see `RepVGGBlock`). Merged: the sum of the
    folded branches, the 1x1 embedded at its aligned tap and `s_id·Id`.
    """

    def build(self, num_branches: int = 1, scale_branch: bool = True, identity: bool | None = None) -> None:
        if num_branches < 1:
            raise ValueError(f"num_branches must be at least 1, got {num_branches}")
        g = self.geometry
        self.convs = nn.ModuleList(self.branch_conv() for _ in range(num_branches))
        self.conv_scale = self.branch_conv(1) if scale_branch and g.kernel_size != (1, 1) else None
        has_identity = resolve_identity(identity, self.in_channels, self.out_channels, g)
        self.bn_identity = self.make_norm() if has_identity else None

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
            terms.append(
                fuse_bn(eye, None, norm_stats_from_module(self.bn_identity, name="MobileOneBlock.bn_identity"))
            )
        return add_branches(*terms)
