"""Asymmetric convolution block: kxk + 1xk + kx1, each conv-BN, summed."""

from __future__ import annotations

from torch import Tensor

from reparam.ops.blocks.base import BranchConv, ConvBlock
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, embed_kernel


@register_block
class ACBlock(ConvBlock):
    """`act(BN(conv_kxk(x)) + BN(conv_1xk(x)) + BN(conv_kx1(x)))` for a `kh × kw` main kernel.

    The `1 × kw` and `kh × 1` branches sit on the main kernel's (near-)centre row and column, with
    paddings derived from the block's (`aligned_geometry`), so any padding, dilation, stride,
    groups and padding mode merge exactly:
    `W = s_k·W_k + embed(s_h·W_h) + embed(s_v·W_v)`, `b = Σ_j (s_j(b_j − μ_j) + β_j)`.
    """

    def build(self) -> None:
        kh, kw = self.geometry.kernel_size
        self.conv_kxk = self.branch_conv()
        self.conv_1xk = self.branch_conv((1, kw))
        self.conv_kx1 = self.branch_conv((kh, 1))

    def branch(self, x: Tensor) -> Tensor:
        padded = self.pad(x)
        return self.conv_kxk(padded) + self.conv_1xk(padded) + self.conv_kx1(padded)

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor]:
        g = self.geometry
        kernel, bias = self.conv_kxk.kernel_bias("ACBlock.conv_kxk")
        terms = [(kernel, bias)]
        for name in ("conv_1xk", "conv_kx1"):
            branch: BranchConv = getattr(self, name)
            k, b = branch.kernel_bias(f"ACBlock.{name}")
            terms.append((embed_kernel(k, branch.geometry, g), b))
        return add_branches(*terms)
