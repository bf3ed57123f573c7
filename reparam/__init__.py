"""reparam: structural re-parameterization for PyTorch.

Train a network in a multi-branch form, deploy an exactly equivalent plain one
(`reparam.merge`), and remove channels across coupled groups (`reparam.graph`). The kernel algebra
(`reparam.ops`) works on any array-API array and imports without torch; everything else needs torch.
"""

__version__ = "0.1.0"

try:
    import torch as _torch
except ImportError:  # only the array algebra, reparam.ops, is usable
    _torch = None

from reparam import ops

if _torch is not None:
    from reparam import graph  # subpackages as attributes: reparam.graph.trace, reparam.ops.fuse_bn
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
    if _torch is None and name in __all__:
        raise ImportError(f"reparam.{name} needs torch, which is not installed; only reparam.ops works without it")
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
