"""`SFP`: Soft Filter Pruning and CR-SFP on a copy of a model, as a method object over the shared engine.

Per pruned channel group of `reparam.graph` the channels are ranked by the criterion and the lowest are
zeroed (their producers' filter rows set to 0) before training and after every epoch; in between they
train and may regrow. With ``method="cr-sfp"`` the model is a `CRSFPNet`: in training it takes two views
per image and returns the logits of the P-NN (filters times the mask, so the mask also gates their
gradient; the network's own head) and of the R-NN (raw filters, a second head); `SFP.loss` is the
spec's CE + CE + α·½(KL + KL). In eval mode it is the P-NN. `convert` exports the P-NN narrow
(`apps.sfp.export`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from fnmatch import fnmatch
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from reparam.graph import ChannelGroup, trace
from reparam.graph.tracing import as_tuple

from ..engine.groups import candidate_groups, min_keep, widths_for_target
from .config import SFPConfig
from .criteria import fpgm_scores, l2_scores, taylor_scores
from .export import ExportReport, InexactExportError, export_narrow, group_key, sees_borders

__all__ = ["CRSFPNet", "SFP"]


def _key(name: str) -> str:
    return "mask__" + name.replace(".", "__")


class CRSFPNet(nn.Module):
    """CR-SFP's two networks on one backbone: ``net`` (whose head is the P-NN's) and ``head_r`` (the
    R-NN's head, a copy of ``net.<head>``); a row mask per masked weight (buffers), shared norms.

    Training takes (B, 2, ...) batches (one dimension more than ``input_ndim``; anything else is refused)
    and returns ``(z_P, z_R)``: the P-NN on view 1 (weights times their masks), the R-NN on view 2 (raw
    weights, ``head_r``). In eval mode it returns the P-NN's logits."""

    def __init__(self, net: nn.Module, head: str, masked: Sequence[str], input_ndim: int = 4) -> None:
        super().__init__()
        self.net, self.head, self.input_ndim = net, head, input_ndim
        self.head_r = copy.deepcopy(net.get_submodule(head))
        self.masked = tuple(masked)
        params = dict(net.named_parameters())
        for name in self.masked:
            w = params[name]
            self.register_buffer(
                _key(name), torch.ones((w.shape[0],) + (1,) * (w.ndim - 1), dtype=w.dtype, device=w.device)
            )

    def row_mask(self, name: str) -> Tensor:
        return getattr(self, _key(name))

    def masked_weights(self) -> dict[str, Tensor]:
        return {n: self.net.get_parameter(n) * self.row_mask(n) for n in self.masked}

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.training and not (x.ndim == self.input_ndim + 1 and x.shape[1] == 2):
            raise ValueError(
                f"CR-SFP trains on two views of every image, batches of shape (B, 2, ...), got {tuple(x.shape)}: "
                "build the loaders with views=2 (apps.engine.data.build_loaders(..., views=2)); evaluate in eval mode"
            )
        if self.training:
            z_p = functional_call(self.net, self.masked_weights(), (x[:, 0],))
            head_r = {f"{self.head}.{k}": v for k, v in self.head_r.named_parameters()}
            z_r = functional_call(self.net, head_r, (x[:, 1],))
            return z_p, z_r
        return functional_call(self.net, self.masked_weights(), (x,))


def _outputs(model: nn.Module, inputs: tuple) -> tuple[list[tuple[str, tuple, Any]], Any]:
    """``([(name, args, output) of every submodule call], model output)`` of one forward of `inputs`, in
    eval mode (the norms' running statistics stay as they are)."""
    calls: list[tuple[str, tuple, Any]] = []
    was_training = model.training
    model.eval()
    hooks = [
        m.register_forward_hook(lambda _m, args, out, n=n: calls.append((n, args, out)))
        for n, m in model.named_modules()
        if n
    ]
    try:
        with torch.no_grad():
            output = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return calls, output


class SFP:
    """SFP or CR-SFP (``config.method``) on a copy of ``model``.

    ``example_inputs`` trace the channel groups and check the export; ``iters_per_epoch`` sets when the
    filters are re-zeroed (after every epoch); ``total_iters`` (a run about to train) also zeroes them
    once now when ``zero_before_training``. Raises ValueError when no group can be pruned, the target is
    out of reach, or the criterion needs a gradient that does not exist yet."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor | Sequence[Tensor],
        config: SFPConfig | None = None,
        *,
        iters_per_epoch: int | None = None,
        total_iters: int | None = None,
        leaf_modules: Sequence[str | type[nn.Module]] = (),
    ) -> None:
        self.config = cfg = config if config is not None else SFPConfig()
        self.iters_per_epoch, self.total_iters = iters_per_epoch, total_iters
        self.net = copy.deepcopy(model)
        device = next(self.net.parameters()).device
        self.example_inputs: tuple[Tensor, ...] = tuple(x.to(device) for x in as_tuple(example_inputs))
        self._leaf_modules = tuple(leaf_modules)
        self.graph = trace(self.net, self.example_inputs, leaf_modules=self._leaf_modules)
        calls, output = _outputs(self.net, self.example_inputs)
        given = {id(x) for x in self.example_inputs}
        self.stem = {n for n, args, _ in calls if any(id(t) in given for t in args)}  # layers reading the input
        self.groups, self.skipped = candidate_groups(
            self.net, self.example_inputs, self.graph, self._reason, self._min_keep, "SFP"
        )
        if not self.groups:
            raise ValueError(
                f"SFP found no channel group it can prune and export with mode={cfg.mode!r} "
                f"(why, per group id: {dict(list(self.skipped.items())[:8])})"
            )
        self.base_macs = int(self.graph.macs())
        self.widths = self._widths()
        params = dict(self.net.named_parameters())
        self._rows: dict[int, list[tuple[str, Tensor, Tensor]]] = {
            g.id: [
                (
                    p.member.name,
                    torch.as_tensor(p.member.positions, dtype=torch.long, device=device),
                    torch.as_tensor(p.member.channels, dtype=torch.long, device=device),
                )
                for p in g.producers
                if p.member.name in params
            ]
            for g in self.groups
        }
        self.masks = {g.id: torch.ones(g.size, dtype=torch.bool, device=device) for g in self.groups}
        self._device = device
        self._grads: dict[str, Tensor] = {}
        self.model: nn.Module = self.net
        if cfg.method == "cr-sfp":
            masked = sorted({n for rows in self._rows.values() for n, _, _ in rows})
            ndim = self.example_inputs[0].ndim
            self.model = CRSFPNet(self.net, self._head(self.net, calls, output), masked, ndim)
        if total_iters is not None and cfg.zero_before_training:
            self.zero()

    # ------------------------------------------------------------------ structure
    def _reason(self, group: ChannelGroup) -> str | None:
        """Why ``group`` is not pruned (None: it is a candidate)."""
        cfg = self.config
        if not group.prunable:
            return f"not prunable: {group.reason}"
        if not group.producers:
            return "no producer layer"
        if cfg.mode == "paper" and len(group.producers) > 1:
            return "mode='paper' keeps residual-coupled groups at full width"
        names = [p.module for p in group.producers]
        for n in names:
            hit = next((pat for pat in cfg.skip_patterns if fnmatch(n, pat)), None)
            if hit:
                return f"produced by {n}, which skip={cfg.skip!r} excludes ({hit})"
            if not cfg.prunes_stem and n in self.stem:
                why = "prune_stem=False" if cfg.prune_stem is False else "cr-sfp keeps the stem, as the spec does"
                return f"produced by the stem {n} ({why})"
        for m in group.members:
            if m.kind == "node":
                continue
            owner = m.name.rpartition(".")[0]
            module = self.net.get_submodule(owner)
            if isinstance(module, _ConvNd):
                if module.transposed:
                    return f"{owner} is a transposed convolution, which SFP does not export"
                if m.dim == 1 and module.groups != 1:
                    return f"it feeds the grouped convolution {owner} (groups={module.groups}): its constant cannot be folded"
            elif not isinstance(module, (nn.Linear, _BatchNorm)):
                return (
                    f"{m.name} belongs to a {type(module).__name__}, whose channels SFP cannot zero and remove exactly"
                )
        if not group.consumers:
            return "no layer reads its channels"
        return None

    def _sees_borders(self, group: ChannelGroup) -> bool:
        return any(sees_borders(self.net.get_submodule(m.name.rpartition(".")[0])) for m in group.consumers)

    def _min_keep(self, group: ChannelGroup) -> int:
        return min_keep(group, self.config.num_at_least)

    def _widths(self) -> dict[int, int]:
        cfg = self.config
        sizes = {g.id: g.size for g in self.groups}
        minimum = {g.id: self._min_keep(g) for g in self.groups}
        multiple = {g.id: g.multiple for g in self.groups}
        if cfg.flops_target > 0:  # a carrier channel per group whose readers see borders (`apps.sfp.export`)
            reserve = {g.id: int(g.multiple == 1 and self._sees_borders(g)) for g in self.groups}

            def macs(widths: dict[int, int]) -> float:
                return self.graph.macs({k: min(sizes[k], w + reserve[k]) for k, w in widths.items()})

            target = cfg.flops_target * self.base_macs
            return widths_for_target(sizes, minimum, multiple, macs, target)
        out = {}
        for g in self.groups:
            keep = g.size - math.floor(g.size * cfg.prune_ratio)
            out[g.id] = min(g.size, max(minimum[g.id], math.ceil(keep / g.multiple) * g.multiple))
        return out

    @staticmethod
    def _head(model: nn.Module, calls: list[tuple[str, tuple, Any]], output: Any) -> str:
        """The layer whose output is the model's (CR-SFP's P-NN head, copied for the R-NN)."""
        match = [n for n, _, out in calls if out is output and isinstance(model.get_submodule(n), (nn.Linear, _ConvNd))]
        if not match:
            raise ValueError(
                "CR-SFP needs a model whose output is the output of one linear or convolution layer (its "
                f"classifier head, copied for the unpruned network); {type(model).__name__}'s is not"
            )
        return match[-1]

    # ------------------------------------------------------------------ masks
    def _follow_device(self) -> None:
        """Index tensors and masks follow the network: built on one device, it may train on another
        (`fit` moves the model)."""
        device = next(self.net.parameters()).device
        if device != self._device:
            self._rows = {g: [(n, p.to(device), c.to(device)) for n, p, c in rows] for g, rows in self._rows.items()}
            self.masks = {g: m.to(device) for g, m in self.masks.items()}
            self._grads = {n: v.to(device) for n, v in self._grads.items()}
            self._device = device

    def scores(self) -> dict[int, Tensor]:
        """The criterion's score of every channel of every pruned group (low: zeroed)."""
        self._follow_device()
        params = dict(self.net.named_parameters())
        out = {}
        for g in self.groups:
            blocks = [(params[n].detach().index_select(0, pos), ch) for n, pos, ch in self._rows[g.id]]
            if self.config.criterion == "l2":
                out[g.id] = l2_scores(blocks, g.size)
            elif self.config.criterion == "fpgm":
                out[g.id] = fpgm_scores(blocks, g.size)
            else:
                missing = [n for n, _, _ in self._rows[g.id] if n not in self._grads]
                if missing:
                    raise ValueError(
                        f"criterion='taylor' needs a gradient of {missing[0]}, and none has been computed yet "
                        "(zero_before_training zeroes before the first step): set zero_before_training=False "
                        "or use criterion='l2' or 'fpgm'"
                    )
                grads = [self._grads[n].index_select(0, pos) for n, pos, _ in self._rows[g.id]]
                out[g.id] = taylor_scores(blocks, grads, g.size)
        return out

    @torch.no_grad()
    def zero(self, rerank: bool = True) -> None:
        """Re-rank every pruned group and zero the filters of its lowest-scoring channels (the soft prune);
        ``rerank=False`` zeroes the channels the masks already name."""
        for gid, score in (self.scores() if rerank else {}).items():
            keep = torch.zeros_like(self.masks[gid])
            keep[torch.argsort(score, descending=True, stable=True)[: self.widths[gid]]] = True
            self.masks[gid] = keep
        self._zero_masked_rows(self.net)
        if isinstance(self.model, CRSFPNet):
            for name, pos, keep in self._row_masks():
                row_mask = self.model.row_mask(name)
                row_mask.index_copy_(0, pos, keep.to(row_mask.dtype).reshape(-1, *row_mask.shape[1:]))

    def _row_masks(self):
        """``(weight name, rows, kept?)`` of every producer's rows that hold pruned-group channels."""
        self._follow_device()
        for gid, rows in self._rows.items():
            for name, pos, ch in rows:
                yield name, pos, self.masks[gid][ch]

    @torch.no_grad()
    def _zero_masked_rows(self, net: nn.Module) -> None:
        """Set the masked filter rows of `net` (the backbone or a copy of it) to exactly 0."""
        for name, pos, keep in self._row_masks():
            net.get_parameter(name).index_fill_(0, pos[~keep], 0.0)

    # ------------------------------------------------------------------ training
    def param_groups(self) -> list[dict[str, Any]]:
        """Every parameter, decayed (the spec's recipes decay all of them)."""
        return [
            {
                "params": [p for p in self.model.parameters() if p.requires_grad],
                "weight_decay": self.config.weight_decay,
            }
        ]

    def optimizer(self) -> torch.optim.SGD:
        """SGD with Nesterov momentum over `param_groups`."""
        return torch.optim.SGD(self.param_groups(), lr=self.config.lr, momentum=self.config.momentum, nesterov=True)

    def loss(self, output: Tensor | tuple[Tensor, Tensor], labels: Tensor, reduction: str = "mean") -> Tensor:
        """Cross entropy (``reduction`` as in `F.cross_entropy`, for validation); for CR-SFP's training
        output ``(z_P, z_R)``: CE(z_P) + CE(z_R) + α·½[KL(sg(p_R) ‖ p_P) + KL(sg(p_P) ‖ p_R)], batch means."""
        if not isinstance(output, tuple):
            return F.cross_entropy(output, labels, reduction=reduction)
        z_p, z_r = output
        log_p, log_r = F.log_softmax(z_p, dim=1), F.log_softmax(z_r, dim=1)
        kl_p = F.kl_div(log_p, log_r.detach(), reduction="batchmean", log_target=True)  # KL(sg(p_R) ‖ p_P)
        kl_r = F.kl_div(log_r, log_p.detach(), reduction="batchmean", log_target=True)  # KL(sg(p_P) ‖ p_R)
        return F.cross_entropy(z_p, labels) + F.cross_entropy(z_r, labels) + self.config.alpha * 0.5 * (kl_p + kl_r)

    @torch.no_grad()
    def after_backward(self) -> None:
        """Keep the last gradient of every producer filter (Taylor); CR-SFP with FPGM also zeroes the masked
        filters' whole gradient, as FPGM does."""
        taylor = self.config.criterion == "taylor"
        fpgm_pnn = self.config.method == "cr-sfp" and self.config.criterion == "fpgm"
        if not (taylor or fpgm_pnn):
            return
        rows = [(name, pos, keep, self.net.get_parameter(name).grad) for name, pos, keep in self._row_masks()]
        rows = [r for r in rows if r[3] is not None]
        if taylor and rows:
            # an fp16 step the GradScaler will skip has inf/NaN gradients: the last finite one stays (no host sync)
            finite = torch.stack([torch.isfinite(grad).all() for _, _, _, grad in rows]).all()
            for name, _, _, grad in rows:
                old = self._grads.get(name, torch.zeros_like(grad))
                self._grads[name] = torch.where(finite, grad.detach(), old)
        if fpgm_pnn:
            for _, pos, keep, grad in rows:
                grad.index_fill_(0, pos[~keep], 0.0)

    def after_step(self, iteration: int) -> None:
        """Re-zero after the last step of every epoch (and of the run)."""
        if self.iters_per_epoch is None:
            raise ValueError("SFP re-zeroes after every epoch: pass SFP(..., iters_per_epoch=len(train_loader))")
        done = iteration + 1
        last = self.total_iters is not None and done == self.total_iters
        if done % self.iters_per_epoch == 0 or last:
            self.zero(rerank=self.config.rerank_last or not last)

    def extend(self, total_iters: int) -> None:
        """Lengthen the run (a resumed run given more epochs): zeroing goes on after every epoch."""
        self.total_iters = total_iters

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {int(k): v.clone() for k, v in self.masks.items()},
            "grads": dict(self._grads),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        masks = {int(k): v for k, v in state["masks"].items()}
        if set(masks) != set(self.masks) or any(masks[k].shape != v.shape for k, v in self.masks.items()):
            raise ValueError("the saved masks belong to other channel groups (another model or mode)")
        self._follow_device()
        self.masks = {k: v.to(device=self._device, dtype=torch.bool) for k, v in masks.items()}
        self._grads = {k: v.to(self._device) for k, v in state.get("grads", {}).items()}

    def epoch_metrics(self) -> dict[str, int]:
        """Columns of the training log: channels zeroed now."""
        return {"zeroed": sum(int((~m).sum()) for m in self.masks.values())}

    def summary(self) -> dict[str, Any]:
        """What a prune run's ``summary.json`` adds: kept widths per group, the variant and criterion."""
        return {
            "variant": self.config.method,
            "criterion": self.config.criterion,
            "group_widths": {str(g.id): {"size": g.size, "kept": self.widths[g.id]} for g in self.groups},
        }

    # ------------------------------------------------------------------ export
    def masked_network(self) -> nn.Module:
        """The P-NN as a plain network: a copy of the backbone with the zeroed filters at exactly 0 (its head
        is the P-NN's)."""
        pnn = copy.deepcopy(self.net)
        self._zero_masked_rows(pnn)
        return pnn

    def convert(self, verify_inputs: Tensor | Sequence[Tensor] | None = None) -> tuple[nn.Module, ExportReport]:
        """``(narrow, report)``: the P-NN with its zeroed channels removed and their constants folded
        (`apps.sfp.export.export_narrow`), verified against the masked P-NN. Not exact to
        ``export_tolerance`` (a fold at padded borders): `InexactExportError` with
        ``on_inexact="raise"``, else a warning with the measured error."""
        removed = {group_key(g): torch.nonzero(~self.masks[g.id]).flatten().tolist() for g in self.groups}
        narrow, report = export_narrow(
            self.masked_network(),
            self.example_inputs,
            removed,
            verify_inputs=verify_inputs,
            tolerance=self.config.export_tolerance,
            leaf_modules=self._leaf_modules,
        )
        target = self.config.flops_target * self.base_macs
        if self.config.flops_target > 0 and report.macs_after > target:
            warnings.warn(
                f"the exported SFP model keeps {report.macs_after / self.base_macs:.4f} of the MACs, above "
                f"flops_target={self.config.flops_target}: its carrier channels ({report.carriers}) outnumber "
                "the one per group the widths reserved",
                RuntimeWarning,
                stacklevel=2,
            )
        if not report.border_layers and not report.unfoldable and report.max_rel_error > 1e-10:
            raise InexactExportError(
                f"the SFP export is not exact: max relative error {report.max_rel_error:.3e} > 1e-10 in float64 "
                "although every fold is exact; a layer between the zeroed filters and their readers mixes channels"
            )
        if not report.exact:
            where = []
            if report.border_layers:
                where.append(
                    f"{len(report.border_layers)} padded layer(s) with k>1 read a removed channel's constant "
                    f"(largest |constant| {report.largest_constant:.3g}) only partly at their borders and no "
                    f"carrier channel could stand in (the group's width must stay a multiple), e.g. "
                    f"{report.border_layers[0]}"
                )
            if report.unfoldable:
                where.append(f"removed channels are not constant at {report.unfoldable[0]}")
            message = (
                f"the SFP export is not exact: the narrow model differs from the masked P-NN by max relative "
                f"error {max(report.max_rel_error, report.max_rel_error_native):.3e} > export_tolerance "
                f"{report.tolerance:.0e}: {'; '.join(where)}"
            )
            if self.config.on_inexact == "raise":
                raise InexactExportError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return narrow, report
