"""Tools to prove merges, for the project's blocks and for users' own: hypothesis strategies for conv
geometries, norm statistics and small inputs, and `assert_mergeable`, the equivalence check every
mergeable block must pass. Needs hypothesis (``pip install 'reparam[testing]'``)."""

from reparam.testing.mergeable import MergeCheck, assert_mergeable, check_mergeable
from reparam.testing.strategies import (
    EPSILONS,
    PADDING_MODES,
    bn_module,
    bn_stats,
    conv_geometries,
    conv_layers,
    divisors,
    min_chain_input_size,
    min_input_size,
    random_tensor,
    randomise_norms,
    small_inputs,
    tensors,
)

__all__ = [
    "EPSILONS",
    "PADDING_MODES",
    "MergeCheck",
    "assert_mergeable",
    "bn_module",
    "bn_stats",
    "check_mergeable",
    "conv_geometries",
    "conv_layers",
    "divisors",
    "min_chain_input_size",
    "min_input_size",
    "random_tensor",
    "randomise_norms",
    "small_inputs",
    "tensors",
]
