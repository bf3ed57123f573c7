"""reparam: structural re-parameterization for PyTorch.

Train a network in a multi-branch form, deploy an exactly equivalent plain one
(`reparam.merge`), and remove channels across coupled groups (`reparam.graph`).
"""

__version__ = "0.1.0"

from reparam import graph, ops  # noqa: E402  (subpackages as attributes: reparam.graph.trace, reparam.ops.fuse_bn)
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


def __getattr__(name: str):
    """`reparam.testing` on first use: it needs hypothesis, an optional dependency (``reparam[testing]``)."""
    if name == "testing":
        import importlib

        return importlib.import_module("reparam.testing")
    raise AttributeError(f"module 'reparam' has no attribute {name!r}")


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
    "graph",
    "merge",
    "ops",
    "testing",
    "verify_equivalence",
]
