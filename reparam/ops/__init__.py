"""Kernel algebra (pure functions over any array-API array: numpy, torch, jax …) and mergeable blocks.

Every algebra function is exact or raises `MergeError`; see each docstring for the math. The algebra
imports no torch: with torch installed this package also holds the torch side (`conv_nd`, the module
readers and builders of `reparam.ops.modules`, and the blocks of `reparam.ops.blocks`).
"""

from .branches import (
    add_branches,
    avg_pool_kernel,
    dilate_kernel,
    dirac_plus,
    embed_kernel,
    embed_offset,
    identity_kernel,
)
from .concat import concat_out, split_in, ungroup_kernel
from .errors import MergeError
from .geometry import ConvGeometry
from .linear import conv1x1_to_linear, conv_to_linear, linear_to_conv, repeat_norm_for_fc
from .norm import (
    NormStats,
    bn_scale_shift,
    compose_affine,
    fold_norm_affine,
    fuse_bn,
    fuse_bn_transposed,
    fuse_pre_bn,
    propagate_bias,
    scale_in,
    scale_out,
    shift_to_bias,
)
from .sequential import (
    compose,
    compose_1x1_kxk,
    compose_depthwise_pointwise,
    compose_kxk_1x1,
    compose_linear,
    composed_groups,
    pad_value_for_1x1_bias,
)
from .slicing import matching_group_channels, select_in, select_norm, select_out

try:
    import torch as _torch
except ImportError:  # the algebra above still works on numpy / jax / any array-API library
    _torch = None

if _torch is not None:
    from .blocks import (
        ACBlock,
        Compactor,
        DilatedReparamBlock,
        DiverseBranchBlock,
        MergeableBlock,
        MobileOneBlock,
        PostBNBlock,
        RepLKBlock,
        RepVGGBlock,
        register_block,
    )
    from .modules import (
        AsymmetricPadConv,
        PadNd,
        check_avg_pool_mergeable,
        geometry_from_module,
        geometry_to_module,
        is_batch_norm,
        norm_stats_from_module,
    )
    from .torch_conv import conv_nd, conv_to_fc, pad_nd

__all__ = [
    "ACBlock",
    "AsymmetricPadConv",
    "Compactor",
    "ConvGeometry",
    "DilatedReparamBlock",
    "DiverseBranchBlock",
    "MergeError",
    "MergeableBlock",
    "MobileOneBlock",
    "NormStats",
    "PadNd",
    "PostBNBlock",
    "RepLKBlock",
    "RepVGGBlock",
    "add_branches",
    "avg_pool_kernel",
    "bn_scale_shift",
    "check_avg_pool_mergeable",
    "compose",
    "compose_1x1_kxk",
    "compose_affine",
    "compose_depthwise_pointwise",
    "compose_kxk_1x1",
    "compose_linear",
    "composed_groups",
    "concat_out",
    "conv1x1_to_linear",
    "conv_nd",
    "conv_to_fc",
    "conv_to_linear",
    "dilate_kernel",
    "dirac_plus",
    "embed_kernel",
    "embed_offset",
    "fold_norm_affine",
    "fuse_bn",
    "fuse_bn_transposed",
    "fuse_pre_bn",
    "geometry_from_module",
    "geometry_to_module",
    "identity_kernel",
    "is_batch_norm",
    "linear_to_conv",
    "matching_group_channels",
    "norm_stats_from_module",
    "pad_nd",
    "pad_value_for_1x1_bias",
    "propagate_bias",
    "register_block",
    "repeat_norm_for_fc",
    "scale_in",
    "scale_out",
    "select_in",
    "select_norm",
    "select_out",
    "shift_to_bias",
    "split_in",
    "ungroup_kernel",
]

_TORCH_SIDE = frozenset(
    {
        "ACBlock",
        "AsymmetricPadConv",
        "Compactor",
        "DilatedReparamBlock",
        "DiverseBranchBlock",
        "MergeableBlock",
        "MobileOneBlock",
        "PadNd",
        "PostBNBlock",
        "RepLKBlock",
        "RepVGGBlock",
        "check_avg_pool_mergeable",
        "conv_nd",
        "conv_to_fc",
        "geometry_from_module",
        "geometry_to_module",
        "is_batch_norm",
        "norm_stats_from_module",
        "pad_nd",
        "register_block",
    }
)
"""The names that need torch (modules, blocks, functional convolutions)."""

if _torch is None:
    __all__ = [n for n in __all__ if n not in _TORCH_SIDE]


def __getattr__(name: str):
    if name in _TORCH_SIDE:
        raise ImportError(f"reparam.ops.{name} needs torch, which is not installed; the array algebra works without it")
    raise AttributeError(f"module 'reparam.ops' has no attribute {name!r}")
