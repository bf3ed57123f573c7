"""RepVGG block: kxk conv-BN + 1x1 conv-BN + BN identity, summed, then an optional activation."""

from __future__ import annotations

from torch import Tensor

from reparam.ops.blocks.base import ConvBlock, resolve_identity, subsample
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, embed_kernel, identity_kernel
from reparam.ops.modules import norm_stats_from_module
from reparam.ops.norm import fuse_bn


@register_block
class RepVGGBlock(ConvBlock):
    """`act(BN(conv_kxk(x)) + BN(conv_1x1(x)) + BN(x[..., ::s, ::s]))`.

    Any kernel (even, rectangular), stride, dilation, padding, groups and padding mode: the 1x1
    branch is aligned on the main kernel's (near-)centre tap (`aligned_geometry`). The identity
    branch exists when representable (C_in = C_out and centred padding, any stride:
    `identity=None`), can be required (`True`) or disabled (`False`).
    Merged: `W = s_k·W_k + embed(s_1·W_1) + s_id·Id`, `b = Σ (s_j(b_j − μ_j) + β_j)`.
    """

    def build(self, identity: bool | None = None) -> None:
        self.conv_kxk = self.branch_conv()
        self.conv_1x1 = self.branch_conv(1)
        has_identity = resolve_identity(identity, self.in_channels, self.out_channels, self.geometry)
        self.bn_identity = self.make_norm() if has_identity else None

    def branch(self, x: Tensor) -> Tensor:
        padded = self.pad(x)
        y = self.conv_kxk(padded) + self.conv_1x1(padded)
        if self.bn_identity is not None:
            y = y + self.bn_identity(subsample(x, self.geometry.stride))
        return y

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor]:
        g = self.geometry
        kernel, bias = self.conv_kxk.kernel_bias("RepVGGBlock.conv_kxk")
        k1, b1 = self.conv_1x1.kernel_bias("RepVGGBlock.conv_1x1")
        terms = [(kernel, bias), (embed_kernel(k1, self.conv_1x1.geometry, g), b1)]
        if self.bn_identity is not None:
            eye = identity_kernel(self.out_channels, g.groups, g, like=kernel)
            terms.append(fuse_bn(eye, None, norm_stats_from_module(self.bn_identity, name="RepVGGBlock.bn_identity")))
        return add_branches(*terms)
