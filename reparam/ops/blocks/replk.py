"""RepLK block: a large-kernel conv-BN plus a small-kernel conv-BN on the same taps."""

from __future__ import annotations

from torch import Tensor

from reparam.ops.blocks.base import ConvBlock, Size2
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, embed_kernel


@register_block
class RepLKBlock(ConvBlock):
    """`act(BN(conv_KxK(x)) + BN(conv_kxk(x)))`, the small kernel aligned on the large one's centre.

    Usually depthwise (`groups = channels`), but any groups work. Merged:
    `W = s_L·W_L + embed(s_k·W_k)`, `b = b_L + b_k` (both folded).
    """

    def build(self, small_kernel: Size2 = 3) -> None:
        self.conv_large = self.branch_conv()
        self.conv_small = self.branch_conv(small_kernel)

    def branch(self, x: Tensor) -> Tensor:
        padded = self.pad(x)
        return self.conv_large(padded) + self.conv_small(padded)

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = self.conv_large.kernel_bias("RepLKBlock.conv_large")
        k, b = self.conv_small.kernel_bias("RepLKBlock.conv_small")
        return add_branches((kernel, bias), (embed_kernel(k, self.conv_small.geometry, self.geometry), b))
