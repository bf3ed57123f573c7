"""Mergeable blocks: multi-branch `nn.Module`s for training, each with an exact plain `merged()` module."""

from reparam.ops.blocks.acb import ACBlock
from reparam.ops.blocks.base import ConvBlock, MergeableBlock
from reparam.ops.blocks.compactor import Compactor
from reparam.ops.blocks.dbb import DiverseBranchBlock
from reparam.ops.blocks.dilated import DilatedReparamBlock
from reparam.ops.blocks.mobileone import MobileOneBlock
from reparam.ops.blocks.postbn import PostBNBlock
from reparam.ops.blocks.registry import BLOCKS, is_registered_block, register_block
from reparam.ops.blocks.replk import RepLKBlock
from reparam.ops.blocks.repvgg import RepVGGBlock

__all__ = [
    "ACBlock",
    "BLOCKS",
    "Compactor",
    "ConvBlock",
    "DilatedReparamBlock",
    "DiverseBranchBlock",
    "MergeableBlock",
    "MobileOneBlock",
    "PostBNBlock",
    "RepLKBlock",
    "RepVGGBlock",
    "is_registered_block",
    "register_block",
]
