"""Dilated re-parameterisation block: a large kernel conv-BN + dilated smaller conv-BN branches."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from reparam.ops.blocks.base import ConvBlock, Size2
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, embed_kernel

DEFAULT_BRANCHES: tuple[tuple[int, int], ...] = ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))
"""(kernel, rate) of the dilated branches of a 13x13 block."""


@register_block
class DilatedReparamBlock(ConvBlock):
    """`act(BN(conv_K(x)) + Σ_j BN_j(conv_{k_j, rate r_j}(x)))`.

    Branch j is a `k_j` conv with dilation `r_j·d` spanning `r_j(k_j − 1) + 1 ≤ K` taps of the
    main kernel, centred on it. Merged: each folded branch kernel is spread onto the dense grid
    (`W_dense[r·u, r·v] = W[u, v]`) and embedded at its aligned offset (`embed_kernel`).
    """

    def build(self, branches: Sequence[tuple[Size2, Size2]] = DEFAULT_BRANCHES) -> None:
        self.conv_large = self.branch_conv()
        self.dilated = nn.ModuleList(self.branch_conv(k, rate) for k, rate in branches)

    def branch(self, x: Tensor) -> Tensor:
        padded = self.pad(x)
        y = self.conv_large(padded)
        for conv in self.dilated:
            y = y + conv(padded)
        return y

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor]:
        g = self.geometry
        terms = [self.conv_large.kernel_bias("DilatedReparamBlock.conv_large")]
        for i, conv in enumerate(self.dilated):
            k, b = conv.kernel_bias(f"DilatedReparamBlock.dilated.{i}")
            terms.append((embed_kernel(k, conv.geometry, g), b))
        return add_branches(*terms)
