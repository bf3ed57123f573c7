"""The rule registry: which rule handles each traced op, and `register_rule` to teach it new ones.

Module rules match along the class's MRO, function rules by the ``call_function`` target, method rules
by the ``call_method`` name. Families live beside this file, one per op family: `elementwise`,
`resampling` (pooling, interpolation, padding), `convolution` (convs and linear layers), `norms`,
`attention` (matmul, attention, einsum) and `shape` (reshape, permute, cat, split, indexing, reductions).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from .attention import rule_einsum, rule_matmul, rule_sdpa
from .convolution import (
    rule_conv_function,
    rule_conv_module,
    rule_linear_function,
    rule_linear_module,
)
from .coupler import Rule
from .elementwise import rule_broadcast, rule_prelu_module, rule_unary
from .norms import (
    rule_aten_batch_norm,
    rule_batch_norm_function,
    rule_batch_norm_module,
    rule_group_norm_function,
    rule_group_norm_module,
    rule_layer_norm_function,
    rule_layer_norm_module,
)
from .resampling import rule_pad, rule_pad_module, rule_patch_merging_pad, rule_pool
from .shape import (
    rule_aten_index,
    rule_aten_slice,
    rule_cat,
    rule_expand,
    rule_getitem,
    rule_permute,
    rule_reduce,
    rule_reshape,
    rule_split,
    rule_stack,
)

__all__ = [
    "FUNCTION_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "NO_RULE_REASONS",
    "is_opaque",
    "models_macs",
    "is_rule_leaf",
    "lookup_rule",
    "register_rule",
    "rule_for",
]


_PAD_MODULES = (
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
_UNARY_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.LocalResponseNorm,
)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)

MODULE_RULES: dict[type, Rule] = {
    **{t: rule_unary for t in _UNARY_MODULES},
    **{t: rule_pool for t in _POOL_MODULES},
    **{t: rule_pad_module for t in _PAD_MODULES},
    nn.PReLU: rule_prelu_module,
    nn.Conv1d: rule_conv_module,
    nn.Conv2d: rule_conv_module,
    nn.Conv3d: rule_conv_module,
    nn.ConvTranspose1d: rule_conv_module,
    nn.ConvTranspose2d: rule_conv_module,
    nn.ConvTranspose3d: rule_conv_module,
    nn.Linear: rule_linear_module,
    nn.BatchNorm1d: rule_batch_norm_module,
    nn.BatchNorm2d: rule_batch_norm_module,
    nn.BatchNorm3d: rule_batch_norm_module,
    nn.SyncBatchNorm: rule_batch_norm_module,
    nn.GroupNorm: rule_group_norm_module,
    nn.LayerNorm: rule_layer_norm_module,
    nn.Flatten: rule_reshape,
    nn.Unflatten: rule_reshape,
}

_UNARY_FUNCTIONS = (
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.softmax,
    F.log_softmax,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.hardtanh,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.sqrt,
    torch.rsqrt,
    torch.softmax,
    torch.clamp,
    torch.clone,
    torch.nn.functional.relu_,
    operator.neg,
    torch.erf,
)
_BROADCAST_FUNCTIONS = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    operator.isub,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.where,
    torch.pow,
    operator.pow,
)

FUNCTION_RULES: dict[Any, Rule] = {
    **{f: rule_unary for f in _UNARY_FUNCTIONS},
    **{f: rule_broadcast for f in _BROADCAST_FUNCTIONS},
    F.conv1d: rule_conv_function,
    F.conv2d: rule_conv_function,
    F.conv3d: rule_conv_function,
    F.linear: rule_linear_function,
    F.batch_norm: rule_batch_norm_function,
    F.layer_norm: rule_layer_norm_function,
    F.group_norm: rule_group_norm_function,
    F.adaptive_avg_pool1d: rule_pool,
    F.adaptive_avg_pool2d: rule_pool,
    F.adaptive_max_pool2d: rule_pool,
    F.max_pool2d: rule_pool,
    F.avg_pool2d: rule_pool,
    F.interpolate: rule_pool,
    F.pad: rule_pad,
    torch.flatten: rule_reshape,
    torch.reshape: rule_reshape,
    torch.squeeze: rule_reshape,
    torch.unsqueeze: rule_reshape,
    torch.permute: rule_permute,
    torch.transpose: rule_permute,
    torch.swapaxes: rule_permute,
    torch.cat: rule_cat,
    torch.concat: rule_cat,
    torch.stack: rule_stack,
    torch.split: rule_split,
    torch.chunk: rule_split,
    torch.unbind: rule_split,
    operator.getitem: rule_getitem,
    torch.mean: rule_reduce,
    torch.sum: rule_reduce,
    torch.amax: rule_reduce,
    torch.matmul: rule_matmul,
    torch.bmm: rule_matmul,
    operator.matmul: rule_matmul,
    F.scaled_dot_product_attention: rule_sdpa,
    torch.einsum: rule_einsum,
}

METHOD_RULES: dict[str, Rule] = {
    **{
        m: rule_unary
        for m in (
            "relu",
            "relu_",
            "sigmoid",
            "sigmoid_",
            "tanh",
            "exp",
            "abs",
            "neg",
            "sqrt",
            "rsqrt",
            "softmax",
            "log_softmax",
            "contiguous",
            "clone",
            "detach",
            "float",
            "double",
            "half",
            "to",
            "type",
            "type_as",
            "clamp",
            "clamp_",
            "requires_grad_",
            "erf",
        )
    },
    **{m: rule_broadcast for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow")},
    **{m: rule_reshape for m in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten")},
    **{m: rule_permute for m in ("permute", "transpose", "swapaxes", "t")},
    **{m: rule_split for m in ("split", "chunk", "unbind")},
    "expand": rule_expand,
    "expand_as": rule_expand,
    "mean": rule_reduce,
    "sum": rule_reduce,
    "amax": rule_reduce,
    "matmul": rule_matmul,
    "bmm": rule_matmul,
}


_TORCHVISION_RULES_ADDED = False


def _add_torchvision_rules() -> None:
    """Rules for torchvision's fx-wrapped helpers (leaf functions in a trace), added the first time a
    rule is looked up after torchvision was imported: the graph package never imports torchvision
    itself (no torchvision function can be in a trace before it is), and rules registered by the user
    for the same functions are kept."""
    global _TORCHVISION_RULES_ADDED
    if _TORCHVISION_RULES_ADDED or "torchvision" not in sys.modules:
        return
    _TORCHVISION_RULES_ADDED = True
    from torchvision.models import swin_transformer
    from torchvision.ops import stochastic_depth

    FUNCTION_RULES.setdefault(stochastic_depth, rule_unary)
    FUNCTION_RULES.setdefault(swin_transformer._patch_merging_pad, rule_patch_merging_pad)


def _aten_rules() -> dict[Any, Rule]:
    """Rules for the ATen ops of a `torch.export` graph (the export front end), by op family."""
    aten = torch.ops.aten
    names: dict[Rule, tuple[str, ...]] = {
        rule_unary: (
            "relu.default",
            "relu_.default",
            "gelu.default",
            "silu.default",
            "silu_.default",
            "sigmoid.default",
            "tanh.default",
            "hardswish.default",
            "hardswish_.default",
            "hardsigmoid.default",
            "hardtanh.default",
            "hardtanh_.default",
            "leaky_relu.default",
            "elu.default",
            "mish.default",
            "dropout.default",
            "dropout_.default",
            "clone.default",
            "contiguous.default",
            "_softmax.default",
            "softmax.int",
            "erf.default",
            "exp.default",
            "abs.default",
            "neg.default",
        ),
        rule_broadcast: (
            "add.Tensor",
            "add_.Tensor",
            "sub.Tensor",
            "mul.Tensor",
            "mul_.Tensor",
            "div.Tensor",
            "maximum.default",
            "minimum.default",
        ),
        rule_conv_function: ("conv1d.default", "conv2d.default", "conv3d.default"),
        rule_linear_function: ("linear.default",),
        rule_aten_batch_norm: ("batch_norm.default",),
        rule_layer_norm_function: ("layer_norm.default",),
        rule_group_norm_function: ("group_norm.default",),
        rule_pool: (
            "max_pool2d.default",
            "avg_pool2d.default",
            "adaptive_avg_pool2d.default",
            "adaptive_max_pool2d.default",
            "adaptive_avg_pool1d.default",
            "upsample_nearest2d.vec",
            "upsample_bilinear2d.vec",
        ),
        rule_reshape: (
            "view.default",
            "reshape.default",
            "_unsafe_view.default",
            "flatten.using_ints",
            "unflatten.int",
            "unsqueeze.default",
            "squeeze.dim",
            "squeeze.dims",
        ),
        rule_permute: ("permute.default", "transpose.int", "t.default"),
        rule_cat: ("cat.default",),
        rule_split: ("split.Tensor", "split_with_sizes.default", "chunk.default", "unbind.int"),
        rule_aten_slice: ("slice.Tensor",),
        rule_aten_index: ("index.Tensor",),
        rule_pad: ("pad.default",),
        rule_reduce: ("mean.dim", "sum.dim_IntList", "amax.default"),
        rule_matmul: ("matmul.default", "bmm.default"),
        rule_sdpa: ("scaled_dot_product_attention.default",),
    }
    rules: dict[Any, Rule] = {}
    for rule, ops in names.items():
        for name in ops:
            packet, _, overload = name.partition(".")
            op = getattr(getattr(aten, packet, None), overload, None)
            if op is not None:
                rules[op] = rule
    return rules


FUNCTION_RULES.update(_aten_rules())


NO_RULE_REASONS: dict[type, str] = {
    nn.MultiheadAttention: "ties embed_dim to its input width and its head count, so its input and output "
    "channels stay unpruned (its fused in-projection is not split)",
}


_USER_MODULE_TYPES: set[type] = set()


def register_rule(target: type[nn.Module] | Callable[..., Any] | str, rule: Rule) -> None:
    """Teach the channel graph an op: ``rule(c, node)`` is called for every traced node of ``target``.

    ``target`` is a module class (matched along the MRO; its instances become leaves of the trace, so
    the rule sees the whole module as one ``call_module`` node), a function (a ``call_function``
    target: a torch function, or a function of your own made a leaf with ``torch.fx.wrap``), or a
    tensor method name (``call_method``, e.g. ``"roll"``). A later registration for the same target
    replaces the earlier one, built-in rules included.

    The rule declares how the node ties its channels, through the `Coupler` ``c``:
    ``c.dims(n, i)`` / ``c.sp(n, dim, i)`` are the space ids of the dims of output ``i`` of node ``n``;
    ``c.param(qualname)`` those of a parameter or buffer; ``c.union(a, b, node)`` says two spaces hold
    the same channels; ``c.union_all(x, node, node)`` passes every dim of ``x`` through;
    ``c.s.link(a, ia, b, ib)`` ties single elements; ``c.s.poison_space(a, reason)`` fixes a space's
    size; ``c.module_fixups[node.target] = fix`` lets surgery update module attributes after slicing
    (``fix(module, kept)``). Raise `Unsupported` to fix every space the node touches, with a reason.
    """
    if isinstance(target, type) and issubclass(target, nn.Module):
        MODULE_RULES[target] = rule
        _USER_MODULE_TYPES.add(target)
    elif isinstance(target, str):
        METHOD_RULES[target] = rule
    elif callable(target):
        FUNCTION_RULES[target] = rule
    else:
        raise TypeError(
            f"register_rule: target must be an nn.Module class, a function or a method name, got {target!r}"
        )


def is_rule_leaf(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a class given to `register_rule` (traced as one node)."""
    return any(t in _USER_MODULE_TYPES for t in type(module).__mro__)


#: Rules that model a node's MACs unless they refuse the node.
_MACS_RULES = frozenset(
    {
        rule_conv_module,
        rule_conv_function,
        rule_linear_module,
        rule_linear_function,
        rule_matmul,
        rule_sdpa,
        rule_einsum,
    }
)


def is_opaque(node: Node, modules: dict[str, nn.Module]) -> bool:
    """Nodes whose MACs the rules do not model: ops without a rule (measured instead, and fixed)."""
    return lookup_rule(node, modules) is None


def models_macs(node: Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the rule of ``node`` models MACs (as `MacsTerm`s): conv, linear, matmul, attention,
    einsum. Where such a rule refuses the node (`Unsupported`), its MACs must be measured instead."""
    return lookup_rule(node, modules) in _MACS_RULES


def lookup_rule(node: Node, modules: dict[str, nn.Module]) -> Rule | None:
    """The rule of ``node`` (module class along its MRO, function, or method name), None without one."""
    if node.op == "call_module":
        for t in type(modules[node.target]).__mro__:
            if t in MODULE_RULES:
                return MODULE_RULES[t]
        return None
    if node.op == "call_function":
        _add_torchvision_rules()
        try:
            return FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None


def rule_for(node: Node, modules: dict[str, nn.Module]) -> Rule | str:
    """`lookup_rule`, or (a string) why the node has none, for the reason its channels stay fixed."""
    rule = lookup_rule(node, modules)
    if rule is not None:
        return rule
    if node.op == "call_module":
        for t, reason in NO_RULE_REASONS.items():
            if isinstance(modules[node.target], t):
                return reason
    return "has no channel rule (teach it one with reparam.graph.register_rule)"
