"""Exact conversion of a ResRep-trained network into the plain, narrower original architecture.

Steps (eval mode; BN folded with its running statistics):

1. Zero the masked compactor rows. This is the *reference* the conversion must reproduce; the
   trained rows of masked channels should have decayed to ≈0 (the largest removed row norm is
   reported, and a warning is raised above ``config.threshold``).
2. For every producer (conv/linear) of the channel graph, fold its BatchNorm: ``Ŵ = s·W``,
   ``b̂ = s·b + t``; where it carries a compactor Q, merge it: ``W' = Q·Ŵ`` (over the output axis),
   ``b' = Q·b̂``. The BN slot becomes ``nn.Identity`` and the compactor disappears. A zero row of Q
   gives an output channel that is exactly 0 (kernel and bias), so after the following ReLU/sum it
   only ever multiplies consumer weights by 0.
3. Remove the masked channels of each group with `reparam.graph.prune`, which trims the producers'
   rows and every consumer's input slices.
4. Verify: the converted model against the reference on the example (or given) inputs; the max
   error relative to max|y| must not exceed the tolerance in float64 (``verify_tolerance``, default
   1e-10) and, for a float32 model, 1e-5 in float32 (the error in the model's own dtype is reported
   for any dtype).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from reparam.graph import ChannelGraph, ChannelGroup, prune, trace
from reparam.graph.tracing import as_tuple
from reparam.merge import fold_norm_into
from reparam.ops.blocks import Compactor
from reparam.verify import relative_error

from ..engine.models import biased_like

__all__ = ["CompactorModel", "ConversionError", "ConversionReport", "convert"]

#: Bound on the converted model's error relative to max|y| in float32 (the float64 proof uses ``verify_tolerance``).
FLOAT32_TOLERANCE = 1e-5


class CompactorModel(Protocol):
    """What the conversion reads of a trained ResRep run (`apps.resrep.ResRep` is one): the model with its
    compactors, its channel graph and groups, the compactor sites, the masks and the settings."""

    config: Any  # verify_tolerance, on_inexact, threshold (ResRepConfig)
    model: nn.Module
    example_inputs: tuple[Tensor, ...]
    graph: ChannelGraph
    groups: list[ChannelGroup]
    sites: list[Any]
    masks: dict[int, Tensor]
    base_macs: int

    def row_keep(self, site: Any) -> Tensor: ...

    def widths(self, masked: bool = True) -> dict[str, int]: ...


class ConversionError(ValueError):
    """The converted network does not reproduce the compactor network; the message says by how much."""


@dataclass(frozen=True)
class ConversionReport:
    """What the conversion did and how exact it is.

    ``max_rel_error``: converted vs the compactor model with masked rows zeroed (max|Δ| / max|y|), both
    run in float64 on the verification inputs: the exactness proof, whatever dtype the model trains in
    (bounded by ``tolerance``). ``max_rel_error_native``: the same in the model's own dtype, i.e. its
    rounding error (float32: ~1e-7 per layer, growing with depth). ``max_rel_error_vs_trained``:
    converted vs the compactor model as trained (masked rows not zeroed), in the model's dtype; small once
    the masked rows have decayed. ``largest_removed_norm``: the largest L2 norm of a removed
    compactor row. Widths are kept output channels per producer layer.
    """

    max_rel_error: float
    max_rel_error_native: float
    max_rel_error_vs_trained: float
    largest_removed_norm: float
    tolerance: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]

    @property
    def macs_reduction(self) -> float:
        """Fraction of the MACs removed."""
        return 1.0 - self.macs_after / self.macs_before

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs_reduction": self.macs_reduction, "params_reduction": self.params_reduction}


def _widened(inputs: Iterator[Tensor]) -> tuple[Tensor, ...]:
    """Floating inputs in float64 (the conversion's working precision), others as they are."""
    return tuple(x.double() if x.is_floating_point() else x for x in inputs)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def _foldable(layer: nn.Module) -> bool:
    return type(layer) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain_layer(layer: nn.Module, kernel: Tensor, bias: Tensor) -> nn.Module:
    """A fresh biased conv/linear with ``layer``'s geometry holding ``kernel`` and ``bias``."""
    new = biased_like(layer).to(dtype=kernel.dtype, device=kernel.device)
    with torch.no_grad():
        new.weight.copy_(kernel)
        new.bias.copy_(bias)
    return new


@torch.no_grad()
def _fold_producers(rr: CompactorModel, model: nn.Module) -> None:
    """In place on a compacted copy: every producer becomes a biased conv/linear holding its BN and
    compactor; BN slots become ``nn.Identity``. Paths end up as in the original model. Producers of
    other types (no compactor on them) keep their BN."""
    sites = {s.module: s for s in rr.sites}
    norms = {p.module: p.norm for g in rr.graph.groups for p in g.producers}  # a layer may feed several groups
    for module, norm_path in norms.items():
        site = sites.get(module)
        layer = model.get_submodule(site.conv if site is not None else module)
        if site is None and (norm_path is None or not _foldable(layer)):
            continue
        if norm_path is not None:
            norm = model.get_submodule(norm_path)
            fold_norm_into(layer, norm.host if site is not None else norm, norm_path)
        kernel = layer.weight.detach()
        bias = layer.bias.detach() if layer.bias is not None else kernel.new_zeros(kernel.shape[0])
        if site is not None:
            kernel, bias = model.get_submodule(site.host).compactor.fold_into(kernel, bias)
        model.set_submodule(module, _plain_layer(layer, kernel, bias))
        if norm_path is not None:
            model.set_submodule(norm_path, nn.Identity())


def _keep_in(plain: ChannelGraph, group: ChannelGroup, keep: Tensor) -> tuple[int, list[int]]:
    """``group``'s kept channels as ``(group id, kept indices)`` of the folded model's graph ``plain``.

    The group is found through its first producer: the folded graph has a group whose entry for the
    same layer covers the same rows; channels are mapped row by row (ids and order may differ)."""
    p = group.producers[0]
    row_of = dict(zip(p.member.channels.tolist(), p.member.positions.tolist()))
    for candidate in plain.groups_of(p.module):
        for q in candidate.producers:
            if q.module == p.module and sorted(q.member.positions.tolist()) == sorted(row_of.values()):
                if candidate.size != group.size:
                    break
                channel_of_row = dict(zip(q.member.positions.tolist(), q.member.channels.tolist()))
                kept = sorted(channel_of_row[row_of[c]] for c in keep.nonzero().flatten().tolist())
                return candidate.id, kept
    raise ConversionError(
        f"the channels of {p.module} (group {group.id}, {group.size} channels) have no counterpart in the "
        "BN-folded model's channel graph; folding changed the coupling, so the masks cannot be applied"
    )


def _param_count(model: nn.Module, skip: tuple[type[nn.Module], ...] = ()) -> int:
    return sum(p.numel() for m in model.modules() if not isinstance(m, skip) for p in m.parameters(recurse=False))


@torch.no_grad()
def convert(
    rr: CompactorModel, verify_inputs: Tensor | Sequence[Tensor] | None = None
) -> tuple[nn.Module, ConversionReport]:
    """``(deploy, report)``: the narrow plain network equal to ``rr.model`` with masked rows zeroed,
    as the `torch.fx.GraphModule` that `reparam.graph.prune` returns (the original module names).

    Raises `ConversionError` when the verification error exceeds the tolerance (``config.on_inexact
    = "warn"`` warns instead) and warns when a removed compactor row was not ≈0 (then the deploy
    network differs from the trained one by ``max_rel_error_vs_trained``).
    """
    cfg = rr.config
    first = next(rr.model.parameters())
    device, dtype = first.device, first.dtype
    example = _widened(x.to(device) for x in rr.example_inputs)
    inputs = example if verify_inputs is None else _widened(x.to(device) for x in as_tuple(verify_inputs))
    # the conversion runs on a float64 copy (folds and removals exact to ~1e-16), is verified there, and
    # only then is cast to the model's dtype: that cast is the deploy model's one rounding
    reference = copy.deepcopy(rr.model).eval().double()
    largest = 0.0
    for site in rr.sites:
        q = reference.get_submodule(site.host).compactor.weight
        removed = ~rr.row_keep(site).to(q.device)
        if bool(removed.any()):
            largest = max(largest, float(q[removed].reshape(int(removed.sum()), -1).norm(dim=1).max()))
        q[removed] = 0
    deploy = copy.deepcopy(reference)
    _fold_producers(rr, deploy)
    plain = trace(deploy, example)
    keep_plan = {
        gid: keep
        for gid, keep in (_keep_in(plain, group, rr.masks[group.id]) for group in rr.groups)
        if len(keep) < plain.groups[gid].size
    }
    pruned = prune(deploy, example, keep_plan, graph=plain).eval()
    error = relative_error(reference(*inputs), pruned(*inputs))
    pruned = pruned.to(dtype)
    native_inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    output = pruned(*native_inputs)
    with _evaluating(rr.model) as trained:
        native = relative_error(reference.to(dtype)(*native_inputs), output)
        error_trained = relative_error(trained(*native_inputs), output)
    tolerance = cfg.verify_tolerance if cfg.verify_tolerance is not None else 1e-10
    widths_after = {}
    for group in rr.graph.groups:
        for p in group.producers:
            widths_after[p.module] = int(pruned.get_submodule(p.module).weight.shape[0])
    report = ConversionReport(
        max_rel_error=error,
        max_rel_error_native=native,
        max_rel_error_vs_trained=error_trained,
        largest_removed_norm=largest,
        tolerance=tolerance,
        macs_before=rr.base_macs,
        macs_after=int(plain.macs({gid: len(keep) for gid, keep in keep_plan.items()})),
        params_before=_param_count(rr.model, skip=(Compactor,)),
        params_after=_param_count(pruned),
        widths_before=rr.widths(masked=False),
        widths_after=widths_after,
    )
    if error <= tolerance and dtype == torch.float32 and not native <= FLOAT32_TOLERANCE:
        message = (
            f"ResRep conversion is exact in float64 (max relative error {error:.1e}) but not in float32: "
            f"{native:.3e} > {FLOAT32_TOLERANCE:.0e}; the float32 rounding of the folded weights is too coarse "
            "for this model: deploy it in float64, or check for near-zero BN running variances"
        )
        if cfg.on_inexact == "raise":
            raise ConversionError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    if not error <= tolerance:
        shifting = [n for n, m in pruned.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        message = (
            f"ResRep conversion is not exact: max relative error {error:.3e} > tolerance {tolerance:.1e} "
            "between the converted model and the compactor model with masked rows zeroed (both in float64); "
            "a layer between a producer and its consumers does not map a zero channel to zero"
            + (
                f": the norm layers {shifting[:5]} do not directly follow a conv, so they add "
                "their shift to removed channels; put each BatchNorm right after its conv"
                if shifting
                else " (a bias-adding or non-zero-preserving op); mark it a leaf module "
                "(ResRep(..., leaf_modules=...)) so its channels stay unpruned"
            )
        )
        if cfg.on_inexact == "raise":
            raise ConversionError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    if largest > cfg.threshold:
        warnings.warn(
            f"ResRep conversion removed compactor rows that had not decayed: largest removed row norm "
            f"{largest:.3e} > threshold {cfg.threshold:.0e}; the converted model equals the masked model, "
            f"which differs from the trained one by max relative error {error_trained:.3e} (train longer "
            "after the last mask change)",
            RuntimeWarning,
            stacklevel=4,
        )
    return pruned, report
