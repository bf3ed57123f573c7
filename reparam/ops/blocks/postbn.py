"""Post-BN block: linear branches summed, then a single BN (exact in training mode too)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from reparam.ops.blocks.base import (
    ConvBlock,
    mean_over_taps,
    resolve_identity,
    subsample,
    with_act,
)
from reparam.ops.blocks.registry import register_block
from reparam.ops.branches import add_branches, avg_pool_kernel, embed_kernel, identity_kernel
from reparam.ops.modules import norm_stats_from_module
from reparam.ops.norm import fuse_bn


@register_block
class PostBNBlock(ConvBlock):
    """`act(BN(conv_kxk(x) + conv_1x1(x) + x[..., ::s, ::s] + avgpool(x)))`: no BN inside the branches.

    The branches are linear, so their sum is one conv `(W_Σ, b_Σ)` (`linear_kernel_bias()`, exact
    and differentiable in any mode; the identity needs C_in = C_out and centred padding, the
    average pool — `count_include_pad` semantics, dilation `d`, stride `s`, the block's padding and
    padding mode — needs C_in = C_out). `merged()` in eval mode folds the BN into it; in training
    mode it returns `Sequential(conv(W_Σ, b_Σ), copy of the BN)`, which equals the block in training
    mode too (batch statistics included), with the same gradients with respect to the input.
    """

    def build(self, one_by_one: bool = True, identity: bool | None = None, avg_pool: bool = False) -> None:
        if avg_pool and self.in_channels != self.out_channels:
            raise ValueError(
                f"the average-pool branch needs in_channels == out_channels (got {self.in_channels}, {self.out_channels})"
            )
        self.conv_kxk = self.branch_conv(norm=False)
        self.conv_1x1 = self.branch_conv(1, norm=False) if one_by_one else None
        self.identity = resolve_identity(identity, self.in_channels, self.out_channels, self.geometry)
        self.avg_pool = avg_pool
        self.bn = self.make_norm()

    def branch(self, x: Tensor) -> Tensor:
        return self.bn(self.linear(x))

    def linear(self, x: Tensor) -> Tensor:
        """The branch sum before the BN: `conv(x; W_Σ, geometry) + b_Σ` (see `linear_kernel_bias`)."""
        padded = self.pad(x)
        y = self.conv_kxk(padded)
        if self.conv_1x1 is not None:
            y = y + self.conv_1x1(padded)
        if self.identity:
            y = y + subsample(x, self.geometry.stride)
        if self.avg_pool:
            y = y + mean_over_taps(padded, self.geometry)
        return y

    def linear_kernel_bias(self) -> tuple[Tensor, Tensor | None]:
        """The branch sum before the BN as one conv `(W_Σ, b_Σ)` of the main geometry."""
        g = self.geometry
        kernel, bias = self.conv_kxk.kernel_bias("PostBNBlock.conv_kxk")
        terms = [(kernel, bias)]
        if self.conv_1x1 is not None:
            k, b = self.conv_1x1.kernel_bias("PostBNBlock.conv_1x1")
            terms.append((embed_kernel(k, self.conv_1x1.geometry, g), b))
        if self.identity:
            terms.append((identity_kernel(self.out_channels, g.groups, g, like=kernel), None))
        if self.avg_pool:
            terms.append((avg_pool_kernel(self.out_channels, g.groups, g.kernel_size, like=kernel), None))
        return add_branches(*terms)

    def merged_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = self.linear_kernel_bias()
        return fuse_bn(kernel, bias, norm_stats_from_module(self.bn, name="PostBNBlock.bn"))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        if not self.bn.training:
            return super().merged()
        kernel, bias = self._folding_copy().linear_kernel_bias()
        conv = self._deploy_conv(kernel, bias)
        return with_act(nn.Sequential(conv, copy.deepcopy(self.bn)), copy.deepcopy(self.act)).train(self.training)
