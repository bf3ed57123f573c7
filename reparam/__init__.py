"""reparam: structural re-parameterization for PyTorch.

Train a network in a multi-branch form, deploy an exactly equivalent plain one
(`reparam.merge`), and remove channels across coupled groups (`reparam.graph`).
"""
__version__ = "0.1.0"

from reparam.merge import MergeReport, merge
from reparam.ops.blocks import (
    ACBlock,
    Compactor,
    DilatedReparamBlock,
    DiverseBranchBlock,
    MobileOneBlock,
    PostBNBlock,
    RepLKBlock,
    RepVGGBlock,
)
from reparam.verify import verify_equivalence

__all__ = [
    "ACBlock",
    "Compactor",
    "DilatedReparamBlock",
    "DiverseBranchBlock",
    "MergeReport",
    "MobileOneBlock",
    "PostBNBlock",
    "RepLKBlock",
    "RepVGGBlock",
    "merge",
    "verify_equivalence",
]
