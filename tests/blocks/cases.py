"""Hypothesis strategies for the mergeable blocks: random geometry, block options, norms and inputs."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from reparam.ops.blocks import (
    ACBlock,
    ConvBlock,
    DilatedReparamBlock,
    DiverseBranchBlock,
    MobileOneBlock,
    PostBNBlock,
    RepLKBlock,
    RepVGGBlock,
)
from reparam.ops.blocks.base import block_geometry
from reparam.testing import EPSILONS, conv_geometries, randomise_norms, small_inputs

CONV_BLOCKS: tuple[type[ConvBlock], ...] = (
    RepVGGBlock,
    ACBlock,
    DiverseBranchBlock,
    MobileOneBlock,
    RepLKBlock,
    DilatedReparamBlock,
    PostBNBlock,
)


@dataclass
class BlockCase:
    """A block class, its constructor arguments and a matching small input."""

    cls: type[ConvBlock]
    kwargs: dict[str, Any]
    x: torch.Tensor

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> ConvBlock:
        """The block in eval mode with randomised norm statistics (`seed`)."""
        torch.manual_seed(seed)
        block = self.cls(**self.kwargs, dtype=dtype)
        randomise_norms(block, seed)
        return block.eval()


@st.composite
def _dilated_branch(draw, span: int) -> tuple[int, int]:
    """(kernel k, rate r) with r(k−1)+1 ≤ span."""
    k = draw(st.integers(1, span))
    return k, draw(st.integers(1, max(1, (span - 1) // max(k - 1, 1))))


def _options(
    draw, cls: type[ConvBlock], in_ch: int, out_ch: int, kernel: tuple[int, int], groups: int
) -> dict[str, Any]:
    """Block-specific options."""
    if cls in (RepVGGBlock, MobileOneBlock, PostBNBlock):
        opts: dict[str, Any] = {"identity": draw(st.sampled_from([None, False]))}
    else:
        opts = {}
    if cls is MobileOneBlock:
        opts.update(num_branches=draw(st.integers(1, 3)), scale_branch=draw(st.booleans()))
    elif cls is RepLKBlock:
        opts["small_kernel"] = tuple(draw(st.integers(1, k)) for k in kernel)
    elif cls is DilatedReparamBlock:
        opts["branches"] = draw(st.lists(_dilated_branch(min(kernel)), min_size=1, max_size=3))
    elif cls is PostBNBlock:
        opts.update(one_by_one=draw(st.booleans()), avg_pool=in_ch == out_ch and draw(st.booleans()))
    elif cls is DiverseBranchBlock:
        opts["internal_channels"] = draw(st.sampled_from([None, groups * draw(st.integers(1, 3))]))
    return opts


@st.composite
def block_cases(draw, cls: type[ConvBlock], *, max_channels: int = 5) -> BlockCase:
    """A random `cls` configuration: odd/even/rectangular kernels, anisotropic stride and dilation,
    symmetric padding below/at/above centre (or None), groups up to depthwise, every padding mode,
    conv bias on/off, BN eps in {1e-5, 1e-3, 0.1} and affine on/off; plus a small float64 input."""
    in_ch = draw(st.integers(1, max_channels))
    out_ch = in_ch if draw(st.booleans()) else draw(st.integers(1, max_channels))
    large = cls in (RepLKBlock, DilatedReparamBlock)
    geometry = draw(
        conv_geometries(
            ndim=2, in_channels=in_ch, out_channels=out_ch, padding="symmetric", max_kernel=7 if large else 5
        )
    )
    padding = None if draw(st.booleans()) else tuple(b for b, _ in geometry.padding)
    norm = functools.partial(nn.BatchNorm2d, eps=draw(st.sampled_from(EPSILONS)), affine=draw(st.booleans()))
    kwargs = dict(
        in_channels=in_ch,
        out_channels=out_ch,
        kernel_size=geometry.kernel_size,
        stride=geometry.stride,
        padding=padding,
        dilation=geometry.dilation,
        groups=geometry.groups,
        padding_mode=geometry.padding_mode,
        conv_bias=draw(st.booleans()),
        norm=norm,
        **_options(draw, cls, in_ch, out_ch, geometry.kernel_size, geometry.groups),
    )
    geometry = block_geometry(
        geometry.kernel_size, geometry.stride, padding, geometry.dilation, geometry.groups, geometry.padding_mode
    )
    x = draw(small_inputs(in_ch, geometry, extra=2))
    return BlockCase(cls, kwargs, x)
