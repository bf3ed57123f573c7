"""Kernel algebra (pure functions over numpy or torch arrays) and mergeable blocks.

Every function here is exact or raises `MergeError`; see each docstring for the math.
"""

from .branches import (
    add_branches,
    avg_pool_kernel,
    check_avg_pool_mergeable,
    dilate_kernel,
    dirac_plus,
    embed_kernel,
    embed_offset,
    identity_kernel,
)
from .concat import concat_out, split_in, ungroup_kernel
from .errors import MergeError
from .geometry import AsymmetricPadConv, ConvGeometry, PadNd, conv_nd, pad_nd
from .linear import conv1x1_to_linear, conv_to_fc, conv_to_linear, linear_to_conv, repeat_norm_for_fc
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

__all__ = [
    "MergeError",
    # geometry
    "ConvGeometry",
    "PadNd",
    "AsymmetricPadConv",
    "conv_nd",
    "pad_nd",
    # norm / affine (A)
    "NormStats",
    "bn_scale_shift",
    "fuse_bn",
    "fuse_bn_transposed",
    "fuse_pre_bn",
    "compose_affine",
    "scale_out",
    "scale_in",
    "fold_norm_affine",
    "propagate_bias",
    "shift_to_bias",
    # branches (B, D)
    "add_branches",
    "embed_kernel",
    "embed_offset",
    "dilate_kernel",
    "identity_kernel",
    "avg_pool_kernel",
    "check_avg_pool_mergeable",
    "dirac_plus",
    # sequential (C)
    "compose",
    "compose_1x1_kxk",
    "compose_kxk_1x1",
    "compose_linear",
    "compose_depthwise_pointwise",
    "composed_groups",
    "pad_value_for_1x1_bias",
    # concat (E)
    "concat_out",
    "split_in",
    "ungroup_kernel",
    # linear (F)
    "linear_to_conv",
    "conv1x1_to_linear",
    "conv_to_linear",
    "conv_to_fc",
    "repeat_norm_for_fc",
    # slicing (G)
    "select_out",
    "select_in",
    "select_norm",
    "matching_group_channels",
]

# blocks — the mergeable nn.Modules built on the algebra above (imports and __all__ additions below).
from .blocks import (  # noqa: E402  (the blocks import the algebra above)
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

__all__ += [
    "MergeableBlock",
    "register_block",
    "RepVGGBlock",
    "ACBlock",
    "DiverseBranchBlock",
    "MobileOneBlock",
    "RepLKBlock",
    "DilatedReparamBlock",
    "PostBNBlock",
    "Compactor",
]
# blocks: end
