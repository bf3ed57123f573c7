"""The physical export of a soft-pruned network: zeroed channels removed, what they still emit kept exact.

A channel whose filters are zero still emits a constant: its norm's shift (and the conv's bias) through
the activation, the same value at every position and for every input. Removing it is exact once every
layer that reads it accounts for that constant:

* a layer that sees it the same everywhere (a linear layer, after a flatten too; a 1×1 or unpadded
  convolution) adds ``Σ_taps W[:, c] · v_c`` to its bias;
* a zero-padded convolution with a larger kernel sees it only partly at the borders, so no bias can
  stand in for it. There one removed channel stays, the *carrier* (its filters are zero: it emits its
  own constant u, zero-padded like the others), and the reader's kernel for it becomes
  ``W[:, carrier] + Σ_c (v_c / u) · W[:, c]``: exact at every position, for one channel of width.

`export_narrow` works on any model `reparam.graph` traces: the constants are measured (float64, on the
inputs given) at the input of every consumer, not derived from the layer types in between, so any chain
of per-channel ops (norms, activations, residual sums of zeroed channels) is covered; a removed channel
that is not constant there, or a border reader with no usable carrier (a group whose width must stay a
multiple), is reported with the measured error.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from reparam.graph import ChannelGroup, prune, trace
from reparam.graph.tracing import as_tuple
from reparam.verify import relative_error

__all__ = ["ExportReport", "InexactExportError", "export_narrow", "group_key", "sees_borders"]


class InexactExportError(ValueError):
    """The narrow model differs from the masked network by more than the tolerance (see the message)."""


@dataclass(frozen=True)
class ExportReport:
    """How `export_narrow` removed the zeroed channels and how exact the narrow model is.

    ``max_rel_error``: narrow vs masked network, both in float64 (≤1e-10 when every fold is exact);
    ``max_rel_error_native``: the same in the model's own dtype. ``carriers``: per group, the removed
    channels kept to carry the constants into border-seeing readers (counted in ``widths``);
    ``border_layers``: border-seeing readers folded without a carrier (inexact at their borders);
    ``unfoldable``: removed channels that were not constant at a consumer's input; ``largest_constant``:
    the largest |constant| a removed channel emitted into a consumer."""

    max_rel_error: float
    max_rel_error_native: float
    tolerance: float
    exact: bool
    carriers: dict[int, list[int]]
    border_layers: tuple[str, ...]
    unfoldable: tuple[str, ...]
    largest_constant: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    widths: dict[int, int]

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs_reduction": self.macs_reduction}


def group_key(group: ChannelGroup) -> tuple[str, ...]:
    """A group's identity across traces of the same architecture: its producer layers."""
    return tuple(sorted(p.module for p in group.producers))


def _with_biases(model: nn.Module, layers: Sequence[str]) -> None:
    """Give every layer in `layers` a (zero) bias, so that a fold has somewhere to go; the function is unchanged."""
    for name in layers:
        layer = model.get_submodule(name)
        if layer.bias is None:
            out = (
                layer.weight.shape[0] if isinstance(layer, nn.Linear) or not layer.transposed else layer.weight.shape[1]
            )
            layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))


@torch.no_grad()
def _consumer_inputs(model: nn.Module, layers: Sequence[str], inputs: tuple) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, args[0]))
        for n in layers
    ]
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def sees_borders(layer: nn.Module) -> bool:
    """Whether `layer` reads a constant input channel differently at its borders: a zero-padded
    convolution with a kernel larger than 1 in some dimension."""
    if not isinstance(layer, _ConvNd) or layer.padding_mode != "zeros" or all(k == 1 for k in layer.kernel_size):
        return False
    return isinstance(layer.padding, str) and layer.padding != "valid" or any(p > 0 for p in layer.padding)


@dataclass
class _Read:
    """The removed channels of one group as one layer reads them: their input ``columns`` (one row per
    input position, flattened over batch and space) and what the layer can absorb."""

    owner: str
    layer: nn.Module
    positions: Tensor  # input positions (conv in-channels, linear features) of removed channels
    channels: Tensor  # group channel of each position
    columns: Tensor  # (positions, N) float64

    @property
    def scale(self) -> float:
        return max(1.0, float(self.columns.abs().max()))

    @property
    def constant(self) -> bool:
        return bool(((self.columns - self.columns[:, :1]).abs() <= 1e-12 * self.scale).all())

    @property
    def needs_carrier(self) -> bool:
        """Whether no bias can absorb these channels: not constant here, or constant into a layer that sees
        borders; all zero never needs anything."""
        if not bool(self.columns.any()):
            return False
        return not self.constant or sees_borders(self.layer)

    def ratios(self, carrier: int) -> Tensor | None:
        """Each removed column as a multiple of `carrier`'s (None when `carrier` is zero here or some
        column is not a multiple of it: then it cannot carry the others into this layer)."""
        at = self.channels == carrier
        if not bool(at.any()):
            return None
        base = self.columns[at][0]
        norm = float(base.square().sum())
        if norm == 0.0:
            return None
        r = self.columns @ base / norm
        if bool(((self.columns - r[:, None] * base[None]).abs() > 1e-12 * self.scale).any()):
            return None
        return r


def _reads(model: nn.Module, group: ChannelGroup, channels: Sequence[int], seen: Mapping[str, Tensor]) -> list[_Read]:
    """How every consumer of `group` reads its removed `channels` (measured on the recorded inputs)."""
    gone = torch.zeros(group.size, dtype=torch.bool)
    gone[list(channels)] = True
    reads = []
    for member in group.consumers:
        owner = member.name.rpartition(".")[0]
        layer = model.get_submodule(owner)
        member_channels = torch.as_tensor(member.channels)
        sel = gone[member_channels]
        if not bool(sel.any()):
            continue
        x = seen[owner]
        dim = 1 if isinstance(layer, _ConvNd) else x.ndim - 1
        positions = torch.as_tensor(member.positions)[sel].to(x.device)
        columns = x.index_select(dim, positions).movedim(dim, 0).reshape(len(positions), -1)
        reads.append(_Read(owner, layer, positions, member_channels[sel].to(x.device), columns))
    return reads


def _carriers(group: ChannelGroup, channels: Sequence[int], reads: Sequence[_Read]) -> list[int]:
    """The removed channels kept to carry the others into the layers no bias can stand in for: as few as
    cover every such layer (greedy set cover); none when no layer needs one or the group's width must
    stay a multiple of more than 1."""
    needing = [r for r in reads if r.needs_carrier]
    if not needing or group.multiple > 1:
        return []
    chosen: list[int] = []
    open_reads = list(range(len(needing)))
    while open_reads:
        covers = {int(c): [i for i in open_reads if needing[i].ratios(int(c)) is not None] for c in channels}
        best = max((c for c in covers if c not in chosen), key=lambda c: len(covers[c]), default=None)
        if best is None or not covers[best]:
            break  # the rest are folded as well as a bias can and reported
        chosen.append(best)
        open_reads = [i for i in open_reads if i not in covers[best]]
    return chosen


def _absorb(read: _Read, carriers: Sequence[int], border: set[str], unfoldable: list[str]) -> None:
    """Make `read.layer` independent of the removed non-carrier channels: through a carrier's column
    where one carries them all exactly, else into its bias (exact for constant channels and a layer that
    sees no borders; otherwise noted in `border` / `unfoldable`)."""
    w = read.layer.weight
    shape = (1, -1, *([1] * (w.ndim - 2)))
    kept = torch.isin(
        read.channels, torch.as_tensor(list(carriers), dtype=read.channels.dtype, device=read.channels.device)
    )
    rest = ~kept
    if not bool(rest.any()):
        return
    if read.needs_carrier:
        for c in carriers:
            r = read.ratios(c)
            if r is not None:
                column = read.positions[read.channels == c][:1]
                w.index_add_(
                    1, column.expand(int(rest.sum())), w.index_select(1, read.positions[rest]) * r[rest].reshape(shape)
                )
                return
        (
            border.add(read.owner)
            if read.constant
            else unfoldable.append(f"{read.owner} (input positions {read.positions.tolist()[:4]})")
        )
    values = read.columns[rest].mean(dim=1)
    read.layer.bias += (w.index_select(1, read.positions[rest]) * values.reshape(shape)).sum(
        dim=tuple(range(1, w.ndim))
    )


def export_narrow(
    masked: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    removed: Mapping[tuple[str, ...], Sequence[int]],
    *,
    verify_inputs: Tensor | Sequence[Tensor] | None = None,
    tolerance: float = 1e-5,
    leaf_modules: Sequence[Any] = (),
) -> tuple[nn.Module, ExportReport]:
    """``(narrow, report)``: `masked` (a plain network whose removed channels have zero filters)
    with the channels ``removed[group_key]`` of every group deleted by `reparam.graph.prune` (but a
    carrier where one is needed), their constants folded into the layers that read them, verified against `masked` in float64
    on ``verify_inputs`` (default: the example) and in the model's dtype. The report says whether the
    result is exact to `tolerance`; raising or warning is the caller's choice."""
    first = next(masked.parameters())
    device, dtype = first.device, first.dtype
    wide = lambda xs: tuple(x.to(device).double() if x.is_floating_point() else x.to(device) for x in xs)  # noqa: E731
    example = wide(as_tuple(example_inputs))
    inputs = example if verify_inputs is None else wide(as_tuple(verify_inputs))
    reference = copy.deepcopy(masked).eval().double()
    model = copy.deepcopy(reference)

    graph = trace(model, example, leaf_modules=tuple(leaf_modules))
    by_key = {group_key(g): g for g in graph.groups if g.producers}
    missing = [k for k in removed if k not in by_key]
    if missing:
        raise ValueError(f"no channel group is produced by {list(missing[0])} in this model: another architecture?")
    work = {by_key[k]: sorted(set(map(int, v))) for k, v in removed.items() if v}
    consumers = sorted({m.name.rpartition(".")[0] for g in work for m in g.consumers})
    _with_biases(model, consumers)
    graph = trace(model, example, leaf_modules=tuple(leaf_modules))  # the biases are members now
    by_key = {group_key(g): g for g in graph.groups if g.producers}
    work = {by_key[group_key(g)]: chans for g, chans in work.items()}

    seen = _consumer_inputs(model, consumers, inputs)
    border, unfoldable, largest, carriers = set(), [], 0.0, {}
    with torch.no_grad():
        for group, channels in work.items():
            reads = _reads(model, group, channels, seen)
            largest = max([largest, *(float(r.columns.abs().max()) for r in reads)])
            chosen = _carriers(group, channels, reads)
            if chosen:
                carriers[group.id] = chosen
            for read in reads:
                _absorb(read, chosen, border, unfoldable)

    keep = {
        g.id: sorted([c for c in range(g.size) if c not in set(chans)] + carriers.get(g.id, []))
        for g, chans in work.items()
    }
    narrow = prune(model, example, keep, graph=graph).eval()
    with torch.no_grad():
        error = relative_error(reference(*inputs), narrow(*inputs))
        narrow = narrow.to(dtype)
        native = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
        was_training = masked.training
        error_native = relative_error(masked.eval()(*native), narrow(*native))
        masked.train(was_training)
    report = ExportReport(
        max_rel_error=error,
        max_rel_error_native=error_native,
        tolerance=tolerance,
        # exact by construction only with every fold exact; the measured errors confirm it on these inputs
        exact=not border and not unfoldable and error <= tolerance and error_native <= tolerance,
        carriers=carriers,
        border_layers=tuple(sorted(border)),
        unfoldable=tuple(unfoldable),
        largest_constant=largest,
        macs_before=int(graph.macs()),
        macs_after=int(graph.macs({g.id: len(v) for g, v in zip(work, keep.values())})),
        params_before=sum(p.numel() for p in masked.parameters()),
        params_after=sum(p.numel() for p in narrow.parameters()),
        widths={g.id: len(v) for g, v in zip(work, keep.values())},
    )
    return narrow, report
