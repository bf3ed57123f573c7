"""Coupling rules: how each traced op ties the channel spaces of its inputs, outputs and parameters.

`coupler` holds the context a rule receives (`Coupler`); `registry` maps ops to rules and takes new
ones (`register_rule`); every other module is one family of ops.
"""

from .coupler import Coupler, Kept, Rule, Unsupported, describe, tensor_metas
from .elementwise import rule_unary
from .registry import is_opaque, is_rule_leaf, lookup_rule, models_macs, register_rule, rule_for

__all__ = [
    "Coupler",
    "Kept",
    "Rule",
    "Unsupported",
    "describe",
    "is_opaque",
    "models_macs",
    "is_rule_leaf",
    "lookup_rule",
    "register_rule",
    "rule_for",
    "rule_unary",
    "tensor_metas",
]
