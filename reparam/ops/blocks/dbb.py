"""Diverse Branch Block: kxk, 1x1, 1x1→avg and 1x1→kxk branches, each ending in a BN."""

from __future__ import annotations

from torch import Tensor, nn

from reparam.ops.blocks.base import ConvBlock, mean_over_taps, unpadded
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, avg_pool_kernel, dirac_plus, embed_kernel
from reparam.ops.geometry import ConvGeometry
from reparam.ops.modules import norm_stats_from_module
from reparam.ops.norm import fuse_bn
from reparam.ops.sequential import compose


@register_block
class DiverseBranchBlock(ConvBlock):
    """`act(BN(kxk(x)) + BN(1x1(x)) + BN(avg(BN(1x1(x̃)))) + BN(kxk'(BN(1x1'(x̃)))))`, `x̃ = pad(x)`.

    The two sequential branches pad the block input (padding P, the block's padding mode) *before*
    their 1x1 and run the second stage unpadded. For zero padding this is the "BN-and-pad" fix: the
    padded positions carry `BN(1x1(0)) = BN's shift`, exactly what the merged conv sees, so
    `1x1 ∘ kxk` composes exactly (`K = W_2 ∘ W_1`, `b = b_2 + Σ_{m,u,v} W_2[o,m,u,v]·b_1[m]`);
    for reflect/replicate/circular the padding commutes with the pointwise stages. The average
    pool is the `kh × kw` mean over the main kernel's (dilated) taps, stride s. The second 1x1 is
    identity-based (`W + Id`) when `internal_channels == in_channels` (the default).
    Composing the norms (never subclassing them) keeps `convert_sync_batchnorm` and friends safe.
    """

    def build(self, internal_channels: int | None = None) -> None:
        g = self.geometry
        cin, cout, groups, bias = self.in_channels, self.out_channels, g.groups, self.conv_bias
        internal = cin if internal_channels is None else internal_channels
        if internal % groups:
            raise ValueError(f"groups={groups} must divide internal_channels={internal}")
        self.identity_based = internal == cin
        self.conv_kxk = self.branch_conv()
        self.conv_1x1 = self.branch_conv(1)
        self.pool_1x1 = nn.Conv2d(cin, cout, 1, groups=groups, bias=bias)
        self.pool_bn1 = self.make_norm()
        self.pool_bn2 = self.make_norm()
        self.chain_1x1 = nn.Conv2d(cin, internal, 1, groups=groups, bias=bias)
        if self.identity_based:
            nn.init.zeros_(self.chain_1x1.weight)
        self.chain_bn1 = self.make_norm(internal)
        self.chain_kxk = nn.Conv2d(internal, cout, g.kernel_size, g.stride, 0, g.dilation, groups, bias=bias)
        self.chain_bn2 = self.make_norm()

    def _chain_weight(self) -> Tensor:
        w = self.chain_1x1.weight
        return dirac_plus(w, self.geometry.groups) if self.identity_based else w

    def branch(self, x: Tensor) -> Tensor:
        g = self.geometry
        padded = self.pad(x)
        pooled = self.pool_bn2(mean_over_taps(self.pool_bn1(self.pool_1x1(padded)), g))
        inner = self.chain_bn1(nn.functional.conv2d(padded, self._chain_weight(), self.chain_1x1.bias, groups=g.groups))
        chained = self.chain_bn2(self.chain_kxk(inner))
        return self.conv_kxk(padded) + self.conv_1x1(padded) + pooled + chained

    def _sequential(
        self, w1: Tensor, b1: Tensor | None, bn1: nn.Module, w2: Tensor, b2: Tensor | None, bn2: nn.Module, name: str
    ) -> tuple[Tensor, Tensor]:
        """`BN2(conv2(BN1(1x1(x̃))))` as one conv of the main kernel on the padded input."""
        g = self.geometry
        one = ConvGeometry.create(1, 1, 0, 1, g.groups)
        k1, b1 = fuse_bn(w1, b1, norm_stats_from_module(bn1, name=f"DiverseBranchBlock.{name}_bn1"))
        kernel, bias, _ = compose(k1, b1, one, w2, b2, unpadded(g))
        return fuse_bn(kernel, bias, norm_stats_from_module(bn2, name=f"DiverseBranchBlock.{name}_bn2"))

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor | None]:
        g = self.geometry
        kernel, bias = self.conv_kxk.kernel_bias("DiverseBranchBlock.conv_kxk")
        k1, b1 = self.conv_1x1.kernel_bias("DiverseBranchBlock.conv_1x1")
        avg = avg_pool_kernel(self.out_channels, g.groups, g.kernel_size, like=kernel)
        pool = self._sequential(
            self.pool_1x1.weight, self.pool_1x1.bias, self.pool_bn1, avg, None, self.pool_bn2, "pool"
        )
        chain = self._sequential(
            self._chain_weight(),
            self.chain_1x1.bias,
            self.chain_bn1,
            self.chain_kxk.weight,
            self.chain_kxk.bias,
            self.chain_bn2,
            "chain",
        )
        return add_branches((kernel, bias), (embed_kernel(k1, self.conv_1x1.geometry, g), b1), pool, chain)
