"""RepLK block: a large-kernel conv-BN plus a small-kernel conv-BN on the same taps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reparam.ops.blocks.base import BranchConv, ConvBlock, Norm, Size2
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, embed_kernel


@register_block
class RepLKBlock(ConvBlock):
    """`act(BN(conv_KxK(x)) + BN(conv_kxk(x)))`, the small kernel aligned on the large one's centre.

    Usually depthwise (`groups = channels`), but any groups work. Merged:
    `W = s_L·W_L + embed(s_k·W_k)`, `b = b_L + b_k` (both folded).
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
        small_kernel: Size2 = 3,
        conv_bias: bool = False,
        norm: Norm = nn.BatchNorm2d,
        act: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, act)
        g = self.geometry
        self.conv_large = BranchConv(in_channels, out_channels, g, bias=conv_bias, norm=norm)
        self.conv_small = BranchConv(in_channels, out_channels, g, small_kernel, bias=conv_bias, norm=norm)
        self.to(device=device, dtype=dtype)

    def branch(self, x: Tensor) -> Tensor:
        padded = self.pad(x)
        return self.conv_large(padded) + self.conv_small(padded)

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = self.conv_large.kernel_bias("RepLKBlock.conv_large")
        k, b = self.conv_small.kernel_bias("RepLKBlock.conv_small")
        return add_branches((kernel, bias), (embed_kernel(k, self.conv_small.geometry, self.geometry), b))
