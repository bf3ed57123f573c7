"""`reparam.merge(model)`: the one-call deploy conversion.

1. Every registered block (`reparam.ops.blocks`) is replaced by its `merged()` plain module.
2. Every conv / transposed conv / linear whose output feeds only a batch norm is folded with it
   (`W' = s·W`, `b' = s(b − μ) + β`), found by dataflow in a torch.fx trace, not by module order;
   the norm becomes `nn.Identity` in the module tree, so module names stay stable.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from reparam.ops.blocks.base import MergeableBlock
from reparam.ops.blocks.registry import is_registered_block
from reparam.ops.errors import MergeError
from reparam.ops.modules import is_batch_norm, norm_stats_from_module
from reparam.ops.norm import fuse_bn, fuse_bn_transposed
from reparam.verify import verify_equivalence

__all__ = ["MergeReport", "fold_norm_into", "merge"]


@dataclass
class MergeReport:
    """What `merge` did; attached to the merged model as `merge_report`."""

    blocks: list[str] = field(default_factory=list)
    """Qualified names of the blocks replaced by their `merged()` module."""
    folded: list[tuple[str, str]] = field(default_factory=list)
    """(layer, norm) pairs folded into the layer."""
    skipped: list[str] = field(default_factory=list)
    """Why candidate pairs or subtrees were left alone (the model stays exact)."""
    max_rel_error: float | None = None
    """`max|Δ|/max|y|` of the merged model against the original (with `verify=True`)."""


class _Tracer(fx.Tracer):
    """The default tracer, also keeping torchvision's FrozenBatchNorm2d as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batch_norm(m) or super().is_leaf_module(m, module_qualified_name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _merge_blocks(module: nn.Module, prefix: str, report: MergeReport) -> None:
    """Replace registered blocks below `module` by their merged modules, in place."""
    for name, child in list(module.named_children()):
        path = _join(prefix, name)
        if is_registered_block(child):
            try:
                merged = child.merged()
            except MergeError as err:
                raise MergeError(f"{path}: {err}") from err
            setattr(module, name, merged)
            report.blocks.append(path)
        else:
            _warn_unregistered(child, path, report)
            _merge_blocks(child, path, report)


def _warn_unregistered(module: nn.Module, path: str, report: MergeReport) -> None:
    """A `MergeableBlock` whose class was never registered stays unmerged: say so, and how to fix it."""
    if isinstance(module, MergeableBlock) and not is_registered_block(module):
        why = (
            f"{path or '<root>'} ({type(module).__name__}): a MergeableBlock whose class is not registered, left "
            f"unmerged; decorate the class with @reparam.ops.register_block"
        )
        report.skipped.append(why)
        warnings.warn(why, stacklevel=3)


def _fold_reason(root: nn.Module, bn_node: fx.Node, calls: Counter, shapes: bool) -> str | None:
    """Why the norm at `bn_node` cannot be folded into its producer (None: it can)."""
    producer = bn_node.args[0] if bn_node.args else None
    if len(bn_node.args) != 1 or bn_node.kwargs or not isinstance(producer, fx.Node) or producer.op != "call_module":
        return "its input is not the output of a module"
    layer = root.get_submodule(producer.target)
    if not isinstance(layer, (_ConvNd, nn.Linear)):
        return f"its input comes from {type(layer).__name__}, not a conv or linear layer"
    if len(producer.users) != 1:
        return f"{producer.target}'s output has {len(producer.users)} users"
    if parametrize.is_parametrized(layer):
        return (
            f"{producer.target}'s weight is computed by a parametrization (weight_norm, spectral_norm …), "
            "so writing the fused kernel into it changes nothing; call "
            "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') first"
        )
    owners = [n for n, t in root.named_parameters(remove_duplicate=False) if t is layer.weight]
    if len(owners) > 1:
        return f"{producer.target}'s weight is shared ({', '.join(owners)}), so folding would change every user"
    if calls[producer.target] != 1 or calls[bn_node.target] != 1:
        return "a module is called more than once"
    bn = root.get_submodule(bn_node.target)
    if getattr(bn, "running_mean", None) is None:
        return "it has no running statistics (track_running_stats=False), so it normalises with batch statistics"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.running_mean.shape[0] != channels:
        return f"the norm has {bn.running_mean.shape[0]} features but {producer.target} has {channels} outputs"
    if isinstance(layer, nn.Linear):
        meta = producer.meta.get("tensor_meta")
        if not shapes:
            return "a Linear → norm pair folds only when example_inputs show the Linear output is (N, C)"
        if meta is None or len(meta.shape) != 2:
            return "the Linear output is not (N, C), so the norm does not normalise its features"
    return None


def fold_norm_into(layer: nn.Module, bn: nn.Module, name: str | None = None) -> None:
    """Fold the eval-mode norm `bn` that reads `layer`'s output into `layer`, in place (a bias is added if
    it has none); `bn` itself is left as it is, for the caller to drop. `name` labels errors."""
    # half precision: the fold is computed in float32 and only its result rounded to the layer's dtype
    half = layer.weight.dtype in (torch.float16, torch.bfloat16)
    stats = norm_stats_from_module(copy.deepcopy(bn).float() if half else bn, name=name)
    weight = layer.weight.float() if half else layer.weight
    old_bias = None if layer.bias is None else (layer.bias.float() if half else layer.bias)
    with torch.no_grad():
        if isinstance(layer, _ConvNd) and layer.transposed:
            kernel, bias = fuse_bn_transposed(weight, old_bias, stats, layer.groups)
        else:
            kernel, bias = fuse_bn(weight, old_bias, stats)
        layer.weight.copy_(kernel)
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.detach().to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(bias)


def _fold_norms(module: nn.Module, prefix: str, inputs: tuple[Tensor, ...] | None, report: MergeReport) -> None:
    """Fold every traced layer → norm pair below `module`; untraceable subtrees are tried child by child."""
    try:
        graph = _Tracer().trace(module)
    except Exception as err:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        where = prefix or type(module).__name__
        message = f"conv-BN folding skipped in {where}: torch.fx cannot trace it ({type(err).__name__}: {err}); its children are folded one by one"
        warnings.warn(message, stacklevel=3)
        report.skipped.append(message)
        for name, child in module.named_children():
            _fold_norms(child, _join(prefix, name), None, report)
        return
    gm = fx.GraphModule(module, graph)
    shapes = False
    if inputs is not None:
        try:
            ShapeProp(gm).propagate(*inputs)
            shapes = True
        except Exception as err:  # shape propagation is only needed for Linear → norm pairs
            report.skipped.append(f"shape propagation failed in {prefix or type(module).__name__}: {err}")
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or not is_batch_norm(module.get_submodule(node.target)):
            continue
        bn_path = _join(prefix, node.target)
        reason = _fold_reason(module, node, calls, shapes)
        if reason is not None:
            report.skipped.append(f"{bn_path} left alone: {reason}")
            continue
        layer_path = _join(prefix, node.args[0].target)
        fold_norm_into(module.get_submodule(node.args[0].target), module.get_submodule(node.target), bn_path)
        parent_name, _, attr = node.target.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, nn.Identity())
        report.folded.append((layer_path, bn_path))


def _example_args(model: nn.Module, example_inputs: Tensor | Sequence | None) -> tuple[Tensor, ...] | None:
    """`example_inputs` as call arguments: tensors as given, or a shape (ints) → a normal sample."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if all(isinstance(n, int) for n in example_inputs):
        like = next((t for t in model.state_dict().values() if t.is_floating_point()), torch.empty(0))
        return (torch.randn(tuple(example_inputs), dtype=like.dtype, device=like.device),)
    return tuple(example_inputs)


def merge(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor] | Sequence[int] | None = None,
    *,
    verify: bool = False,
    rtol: float | None = None,
) -> nn.Module:
    """An eval-mode deep copy of `model` with every block merged and every conv/linear → BN folded.

    `example_inputs` (tensors, or an input shape for a random normal sample with the model's dtype
    and device) enables folding Linear → BatchNorm1d pairs (their shapes are checked) and
    `verify=True`, which compares the merged model with the eval-mode original and raises
    `MergeError` when `max|Δ|/max|y|` exceeds `rtol` (default 1e-10 for float64, 1e-5 for
    float32 outputs). The report (`MergeReport`) is attached as `merged.merge_report`. A model
    torch.fx cannot trace is still merged block by block and folded child by child (with a
    warning). Merging a merged model changes nothing; dtype and device are kept.
    """
    args = _example_args(model, example_inputs)
    if verify and args is None:
        raise ValueError("merge(verify=True) needs example_inputs (tensors, or an input shape)")
    report = MergeReport()
    merged = copy.deepcopy(model).eval()
    if is_registered_block(merged):
        merged = merged.merged().eval()
        report.blocks.append(type(model).__name__)
    else:
        _warn_unregistered(merged, "", report)
        _merge_blocks(merged, "", report)
    _fold_norms(merged, "", args, report)
    if verify:
        report.max_rel_error = verify_equivalence(copy.deepcopy(model).eval(), merged, args, rtol=rtol)
    merged.merge_report = report
    return merged
