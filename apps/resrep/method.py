"""`ResRep`: compactors on the channel groups of a network, the gradient rule and the mask schedule.

Drop-in use in any training loop::

    rr = ResRep(model, example_inputs, ResRepConfig(flops_target=0.5),
                iters_per_epoch=len(loader), total_iters=epochs * len(loader))
    opt = rr.optimizer()                 # SGD over `param_groups`, bound so masking clears momentum
    sched = rr.lr_scheduler(opt)         # the recipe's learning-rate shape
    for it, (x, y) in enumerate(batches):
        loss = F.cross_entropy(rr.model(x), y)
        opt.zero_grad(); loss.backward()
        rr.after_backward()          # after DDP's all-reduce and after GradScaler.unscale_
        opt.step(); sched.step()
        rr.after_step(it)            # masks and forgetting on schedule
    rr.check_target()                # TargetMissedError if the run ended above flops_target
    deploy, report = rr.convert()

The recipe (`ResRepConfig.recipe`, resolved into ``rr.plan``) decides the schedule: the paper's, or
the budget recipe for short runs (see `apps.resrep.config`).

`ResRep` works on a deep copy of ``model`` (the original is untouched); ``rr.model`` is the network
to train. Every producer (conv or linear whose output rows define a channel group's channels, see
`reparam.graph`) of every candidate group gets an identity-initialised compactor right after its
BatchNorm (or after the producer itself when it has none). The compactors of one group share one
mask, so residual-coupled groups (stem, projection shortcuts, last conv of each block) are pruned as
a whole; ``mode="paper"`` keeps only single-producer groups (the internal layers of blocks).
Pass the bare model (wrap ``rr.model`` in DDP afterwards, not before).

Deliberate differences from the original ResRep code:

* compactors on residual-coupled groups too (one mask per group, shared by all its producers; a
  channel scores the RMS of its compactor rows' norms); ``mode="paper"`` restores internal-only;
* every round selects from all-ones, so a layer with no masked channel this round is reset (the
  original kept such a layer's previous, stale mask);
* channels skipped because their group is at its minimum width do not consume the round's budget
  (the original counted them), and a zero budget masks nothing;
* the MACs target uses `reparam.graph`'s MACs model (1x1 projections at their true cost);
* norm weights are exempt from weight decay by module type, not by a "bn" in the parameter name;
* a zero compactor row gets the penalty subgradient 0 instead of a division by zero;
* conversion removes the *masked* channels (the decision) rather than rows under the 1e-5
  threshold, zeroes them exactly, reports the largest removed row norm and verifies the result;
* the budget recipe (ours, the default for short runs): see `apps.resrep.config`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from reparam.graph import ChannelGroup, trace
from reparam.graph.tracing import as_tuple
from reparam.ops.blocks import Compactor

from ..engine.groups import candidate_groups, min_keep, widths_for_target
from ..engine.selection import select_masks
from .config import ResRepConfig
from .convert import ConversionReport, convert
from .recipe import Plan, paper_min_iters, resolve
from .selection import channel_scores, mask_budget

__all__ = [
    "Compacted",
    "CompactorSite",
    "ResRep",
    "TargetMissedError",
    "compactor_gradient",
]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class TargetMissedError(ValueError):
    """A ResRep run ended with more MACs than ``flops_target`` allows; the message says by how much and
    what to change."""


def compactor_gradient(weight: Tensor, grad: Tensor | None, keep: Tensor, lasso_strength: float | Tensor) -> Tensor:
    """ResRep's compactor gradient, row by row (row j = output channel j of the compactor):

        G_j = m_j · ∂L/∂Q_j + λ_j · Q_j / ‖Q_j‖₂

    The keep-mask m resets the task gradient of masked rows; the group-lasso subgradient acts with
    strength λ_j (one number for all rows, as in the paper, or one per row). A zero row takes the
    subgradient 0 (no division by zero). ``grad=None`` is a zero task gradient. Same shape, dtype and
    device as ``weight``.
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    penalty = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)  # 0 for a zero row
    m = keep.to(device=weight.device, dtype=weight.dtype).reshape(-1, 1)
    task = torch.zeros_like(rows) if grad is None else grad.reshape(rows.shape) * m
    lam = torch.as_tensor(lasso_strength, device=weight.device, dtype=weight.dtype)
    return (task + (lam.reshape(-1, 1) if lam.ndim else lam) * penalty).reshape(weight.shape)


class Compacted(nn.Module):
    """``compactor(host(x))``: a producer's BatchNorm (or the producer itself) followed by its compactor."""

    def __init__(self, host: nn.Module, compactor: Compactor) -> None:
        super().__init__()
        self.host = host
        self.compactor = compactor

    def forward(self, x: Tensor) -> Tensor:
        return self.compactor(self.host(x))


@dataclass(frozen=True, eq=False)
class CompactorSite:
    """The compactor after producer ``module`` (after its BatchNorm ``norm`` when it has one).

    ``slices`` maps the producer's rows to candidate groups: ``(group id, rows, channels)`` says
    row ``rows[k]`` of the producer (and of its compactor) carries channel ``channels[k]`` of the group.
    A producer may feed several groups (e.g. a zero-padded shortcut splits a stage's channels)."""

    module: str
    norm: str | None
    slices: tuple[tuple[int, Tensor, Tensor], ...]

    @property
    def host(self) -> str:
        """Path of the `Compacted` wrapper: the norm's slot, or the producer's when it has no norm."""
        return self.norm if self.norm is not None else self.module

    @property
    def conv(self) -> str:
        """The producer's path inside the compacted model."""
        return self.module + ".host" if self.norm is None else self.module


class ResRep:
    """ResRep on a copy of ``model``: compactors, optimizer groups, gradient rule, mask schedule, conversion.

    ``example_inputs`` (a tensor or tuple) is used to trace the channel groups and to verify the
    conversion. ``iters_per_epoch`` resolves ``config.before_mask_iters=None`` (5 epochs);
    ``total_iters`` (the run's length) lets ``recipe="auto"`` choose and the budget recipe schedule.
    Raises `reparam.graph.GraphTraceError` for untraceable models and ValueError when no group can
    be pruned or the MACs target is out of reach.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor | Sequence[Tensor],
        config: ResRepConfig | None = None,
        *,
        iters_per_epoch: int | None = None,
        total_iters: int | None = None,
        leaf_modules: Sequence[str | type[nn.Module]] = (),
    ) -> None:
        self.config = config if config is not None else ResRepConfig()
        self.iters_per_epoch = iters_per_epoch
        self.total_iters = total_iters
        self._plan: Plan | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.model = copy.deepcopy(model)
        device = next(self.model.parameters()).device
        self.example_inputs: tuple[Tensor, ...] = tuple(x.to(device) for x in as_tuple(example_inputs))
        self.graph = trace(
            self.model, self.example_inputs, leaf_modules=tuple(leaf_modules), round_to=self.config.round_to
        )
        self.groups, self.skipped = candidate_groups(
            self.model, self.example_inputs, self.graph, self._skip_reason, self._min_keep, "ResRep"
        )
        if not self.groups:
            raise ValueError(
                f"ResRep found no prunable channel group with mode={self.config.mode!r} "
                f"(why, per group id: {dict(list(self.skipped.items())[:8])}); "
                "use mode='residual' or a model with prunable convs"
            )
        slices: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
        norms: dict[str, str | None] = {}
        for group in self.groups:
            for p in group.producers:
                rows = torch.as_tensor(p.member.positions, dtype=torch.long)
                channels = torch.as_tensor(p.member.channels, dtype=torch.long)
                slices.setdefault(p.module, []).append((group.id, rows, channels))
                norms[p.module] = p.norm
        self.sites: list[CompactorSite] = []
        for module, parts in slices.items():
            site = CompactorSite(module, norms[module], tuple(parts))
            weight = self.model.get_submodule(module).weight
            compactor = Compactor(weight.shape[0], device=weight.device, dtype=weight.dtype)
            self.model.set_submodule(site.host, Compacted(self.model.get_submodule(site.host), compactor))
            self.sites.append(site)
        self.masks: dict[int, Tensor] = {g.id: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        # budget recipe: the iteration that masked each channel (-1: kept) and the Taylor score averages
        self.masked_at: dict[int, Tensor] = {g.id: torch.full((g.size,), -1, dtype=torch.long) for g in self.groups}
        self.taylor: dict[int, Tensor] = {
            g.id: torch.zeros(g.size, dtype=torch.float64, device=device) for g in self.groups
        }
        single = {g.id for g in self.groups if len(g.producers) == 1}
        self._lasso_rows = {s.module: self._rows_of(s, {gid: gid in single for gid in self.masks}) for s in self.sites}
        self.iteration = -1
        self.base_macs = int(self.graph.macs())
        self.target_macs = self.config.flops_target * self.base_macs
        floor = self.graph.macs({g.id: self._min_keep(g) for g in self.groups})
        if floor > self.target_macs:
            raise ValueError(
                f"flops_target={self.config.flops_target} is out of reach: with every candidate group at its "
                f"minimum width the model still has {floor / self.base_macs:.3f} of its {self.base_macs} MACs "
                f"(mode={self.config.mode!r}); raise flops_target"
                + (" or use mode='residual'" if self.config.mode == "paper" else "")
            )

    # ------------------------------------------------------------------ structure
    def _skip_reason(self, group: ChannelGroup) -> str | None:
        """Why ``group`` gets no compactors (None: it is a candidate)."""
        if not group.prunable:
            return f"not prunable: {group.reason}"
        if not group.producers:
            return "no producer layer"
        if self.config.mode == "paper" and len(group.producers) > 1:
            return "mode='paper' keeps residual-coupled groups at full width"
        for p in group.producers:
            layer = self.model.get_submodule(p.module)
            if type(layer) is not nn.Conv2d or layer.groups != 1:
                return (
                    f"producer {p.module} is a {type(layer).__name__}"
                    f"{f' with groups={layer.groups}' if isinstance(layer, nn.Conv2d) else ''}; a dense 1x1 "
                    "compactor only merges into a plain Conv2d without keeping a grouped conv grouped"
                )
        return None

    def _min_keep(self, group: ChannelGroup) -> int:
        return min_keep(group, self.config.num_at_least)

    def compactor(self, site: CompactorSite) -> Compactor:
        """The compactor module at ``site``."""
        return self.model.get_submodule(site.host).compactor

    def compactors(self) -> list[tuple[CompactorSite, Compactor]]:
        """Every ``(site, compactor)`` pair, one per compacted producer layer."""
        return [(s, self.compactor(s)) for s in self.sites]

    def _rows_of(self, site: CompactorSite, per_group: Mapping[int, Any], fill: Any = 0) -> Tensor:
        """A row vector of the producer at ``site`` holding ``per_group[gid]`` on the rows of group
        ``gid`` (a scalar, or a tensor indexed by channel) and ``fill`` on rows outside every group."""
        first = next(iter(per_group.values()))
        dtype = first.dtype if isinstance(first, Tensor) else torch.bool if isinstance(first, bool) else torch.float64
        out = torch.full((self.layer(site.module).weight.shape[0],), fill, dtype=dtype)
        for gid, rows, channels in site.slices:
            value = per_group[gid]
            out[rows] = value[channels] if isinstance(value, Tensor) else value
        return out

    # ------------------------------------------------------------------ recipe
    @property
    def plan(self) -> Plan:
        """The recipe resolved for this run (`apps.resrep.recipe.Plan`); ValueError when
        ``recipe="auto"`` or ``"budget"`` lacks ``total_iters``."""
        if self._plan is None:
            c = self.config
            paper = None
            if c.recipe == "auto" and c.auto_switch_iters is None and self.total_iters is not None:
                paper = paper_min_iters(c, self._channels_to_mask(), self.iters_per_epoch)
            self._plan = resolve(c, self.total_iters, self.iters_per_epoch, paper)
        return self._plan

    def _channels_to_mask(self) -> int:
        """Channels to mask for the target when every group keeps the same fraction of its channels (the
        largest such fraction that meets it): the length of the paper recipe's timeline."""
        widths = widths_for_target(
            {g.id: g.size for g in self.groups},
            {g.id: self._min_keep(g) for g in self.groups},
            {g.id: g.multiple for g in self.groups},
            self.graph.macs,
            self.target_macs,
        )
        return sum(g.size - widths[g.id] for g in self.groups)

    def optimizer(self) -> torch.optim.SGD:
        """``torch.optim.SGD(self.param_groups(), lr=config.lr)``, bound to this ResRep so that masking a
        channel clears its momentum entries (budget recipe)."""
        self._optimizer = torch.optim.SGD(self.param_groups(), lr=self.config.lr)
        return self._optimizer

    def extend(self, total_iters: int) -> None:
        """Lengthen the run to ``total_iters`` (a resumed run given more epochs): the plan keeps what it
        decided for the original length (recipe, mask rounds, freeze) and only its last phase, the
        cosine after the freeze (paper: the cosine over the run), spans the longer run."""
        if self.total_iters is not None and total_iters < self.total_iters:
            raise ValueError(f"a run can be extended, not shortened ({self.total_iters} → {total_iters} iterations)")
        self._plan = replace(self.plan, total_iters=total_iters)
        self.total_iters = total_iters

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The recipe's per-iteration learning-rate shape (`Plan.lr_factor`) as a scheduler stepped
        once per optimizer step: paper, a cosine to 0 over the run; budget, constant until the masks
        freeze, then a cosine to 0."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.plan.lr_factor)

    # ------------------------------------------------------------------ optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        """SGD parameter groups (dampening 0, no Nesterov):

        ========================== ============ ================== ==============
        tensors                    lr           momentum           weight decay
        ========================== ============ ================== ==============
        conv / linear kernels      lr           momentum           weight_decay
        norm weights               lr           momentum           0
        biases                     bias_lr_factor·lr  momentum     0
        depthwise conv kernels     lr           momentum           0
        compactor kernels          lr           compactor_momentum 0
        ========================== ============ ================== ==============

        ``bias_lr_factor`` and ``compactor_momentum`` are the recipe's (paper 2 and 0.99, budget 1 and
        0.9) unless the config sets them. Norm weights are recognised by module type (not by a "bn" in
        the name), so any norm layer is exempt from decay. Each group carries a ``name`` key.
        """
        c, plan = self.config, self.plan
        spec = {
            "weight": (c.lr, c.momentum, c.weight_decay),
            "norm": (c.lr, c.momentum, 0.0),
            "bias": (plan.bias_lr_factor * c.lr, c.momentum, 0.0),
            "depthwise": (c.lr, c.momentum, 0.0),
            "compactor": (c.lr, plan.compactor_momentum, 0.0),
        }
        buckets: dict[str, list[nn.Parameter]] = {k: [] for k in spec}
        for module in self.model.modules():
            for pname, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if isinstance(module, Compactor):
                    kind = "compactor"
                elif pname.endswith("bias"):
                    kind = "bias"
                elif isinstance(module, _NORMS):
                    kind = "norm"
                elif (
                    isinstance(module, nn.modules.conv._ConvNd)
                    and module.groups > 1
                    and module.groups == module.in_channels
                ):
                    kind = "depthwise"
                else:
                    kind = "weight"
                buckets[kind].append(param)
        return [
            {"params": params, "lr": spec[k][0], "momentum": spec[k][1], "weight_decay": spec[k][2], "name": k}
            for k, params in buckets.items()
            if params
        ]

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def after_backward(self) -> None:
        """Rewrite every compactor's ``.grad`` by `compactor_gradient` with its rows' masks.

        Paper recipe: the lasso λ on every row (masked rows feel only it). Budget recipe: λ on kept
        rows only (of single-producer groups unless ``residual_lasso``) and none after the freeze;
        masked rows, and the kept rows of residual-coupled groups unless ``train_residual_compactors``,
        get no task gradient; the task gradients first feed the Taylor scores. Call after
        ``loss.backward()`` (so after DDP's all-reduce) and, with a GradScaler, after
        ``scaler.unscale_(optimizer)``; the result then goes through the usual momentum step."""
        plan = self.plan
        step = self.iteration + 1
        if plan.needs_scores(step):
            self._accumulate_taylor()
        lasso = plan.lasso(step)
        for site, compactor in self.compactors():
            weight, keep = compactor.weight, compactor.mask.bool()
            single = self._lasso_rows[site.module].to(keep.device)
            eligible = single | plan.residual_lasso
            rows = eligible & keep if plan.recipe == "budget" else eligible | ~keep
            task = keep & (single | plan.train_residual_compactors)
            weight.grad = compactor_gradient(weight, weight.grad, task, lasso * rows.to(weight.dtype))

    @torch.no_grad()
    def _accumulate_taylor(self) -> None:
        """Budget recipe, Taylor score: per group channel c, the first-order loss change of removing it,
        t_c = Σ_producers Σ_i Q_ci ∂L/∂Q_ci, enters an average of t_c² (momentum `Plan.score_momentum`)."""
        beta = self.plan.score_momentum
        device = next(self.model.parameters()).device
        if any(t.device != device for t in self.taylor.values()):  # the model moved after construction
            self.taylor = {gid: t.to(device) for gid, t in self.taylor.items()}
        change = {gid: torch.zeros_like(t) for gid, t in self.taylor.items()}
        for site, compactor in self.compactors():
            w, g = compactor.weight, compactor.weight.grad
            if g is None:
                continue
            rows = (w * g).reshape(w.shape[0], -1).sum(1).to(torch.float64)
            for gid, r, ch in site.slices:
                change[gid].index_add_(0, ch.to(rows.device), rows[r.to(rows.device)])
        # an fp16 step the GradScaler will skip has inf/NaN gradients: it must not enter the averages
        # (tested on the device, without a host sync)
        finite = torch.stack([torch.isfinite(c).all() for c in change.values()]).all()
        for gid, t in self.taylor.items():
            t.copy_(torch.where(finite, t * beta + change[gid].square() * (1.0 - beta), t))

    @torch.no_grad()
    def after_step(self, iteration: int) -> None:
        """Call after ``optimizer.step()`` with the 0-based index of that step: fades the masked rows
        (budget recipe) and re-selects the masks when the recipe has a round after ``iteration``."""
        self.iteration = int(iteration)
        plan = self.plan
        if plan.recipe == "budget":
            self._fade()
        if plan.is_mask_update(self.iteration):
            self.update_masks()

    @torch.no_grad()
    def _fade(self) -> None:
        """Budget recipe: every masked row is multiplied so that it holds ``Plan.fade(age)`` of its value
        at masking time (exactly 0 from ``forget_iters`` on, by a multiplication with 0); kept rows are
        untouched."""
        plan = self.plan
        factors: dict[int, Tensor] = {}
        for gid, at in self.masked_at.items():
            age = self.iteration - at
            now, prev = plan.fade(age), plan.fade(age - 1)
            step = torch.where(prev > 0, now / prev.clamp_min(1e-300), torch.zeros_like(now))
            factors[gid] = torch.where((at >= 0) & (age >= 1), step, torch.ones_like(now))
        for site, compactor in self.compactors():
            f = self._rows_of(site, factors, fill=1.0)
            if bool((f != 1).any()):
                w = compactor.weight
                w.mul_(f.to(w.device, w.dtype).reshape(-1, *([1] * (w.ndim - 1))))

    def channel_scores(self) -> dict[int, Tensor]:
        """Per candidate group, the recipe's score of each channel (float64, CPU); low scores go first.

        ``norm``: the RMS of its compactor rows' L2 norms (the paper's metric); ``fused``: the RMS of
        the norms of its fused filter rows (Q·diag(γ/σ)·W)_c; ``taylor``: the averaged squared
        first-order loss change of removing it. The paper recipe ranks the raw scores. The budget recipe
        divides each group's scores by their mean (``score_normalize``; by default only the magnitude
        scores, which share no unit across layers) and then by the MACs one channel of the group costs
        at the current widths, relative to the mean cost (``score_per_mac``), so one global ranking
        trades importance against MACs saved."""
        c, score = self.config, self.plan.score
        if score == "taylor":
            raw = {gid: t.detach().to("cpu", torch.float64) for gid, t in self.taylor.items()}
        else:
            rows: dict[int, list[tuple[Tensor, Tensor]]] = {g.id: [] for g in self.groups}
            for site, compactor in self.compactors():
                norms = self._row_norms(site, compactor, fused=score == "fused")
                for gid, r, ch in site.slices:
                    rows[gid].append((ch, norms[r]))
            raw = {g.id: channel_scores(g.size, rows[g.id]) for g in self.groups}
        if self.plan.recipe == "paper":
            return raw
        tiny = torch.finfo(torch.float64).tiny
        if c.score_normalize if c.score_normalize is not None else score != "taylor":
            raw = {gid: s / s.mean().clamp_min(tiny) for gid, s in raw.items()}
        if c.score_per_mac:
            cost = self.channel_costs()
            mean = sum(cost.values()) / len(cost)
            raw = {gid: s / max(cost[gid] / mean, tiny) for gid, s in raw.items()}
        return raw

    def channel_costs(self) -> dict[int, float]:
        """MACs that one more removed channel of each group saves, at the current masked widths."""
        widths = self.group_widths()
        now = self.graph.macs(widths)
        return {gid: float(now - self.graph.macs({**widths, gid: max(w - 1, 0)})) for gid, w in widths.items()}

    def _row_norms(self, site: CompactorSite, compactor: Compactor, fused: bool) -> Tensor:
        """L2 norm of each compactor row, or of each fused filter row Q·diag(γ/σ)·W (float64, CPU)."""
        q = compactor.weight.detach().flatten(1).to(torch.float64)
        if fused:
            w = self.layer(site.module).weight.detach().flatten(1).to(torch.float64)
            norm = self.model.get_submodule(site.host).host if site.norm is not None else None
            scale = torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
            if norm is not None and getattr(norm, "weight", None) is not None:
                scale = norm.weight.detach().to(torch.float64)
            if norm is not None and getattr(norm, "running_var", None) is not None:
                scale = scale / (norm.running_var.detach().to(torch.float64) + norm.eps).sqrt()
            q = q @ (scale.reshape(-1, 1) * w)
        return q.norm(dim=1).cpu()

    def _select(self, scores: Sequence[Tensor], target_macs: float, budget: int | None) -> list[Tensor]:
        ids = [g.id for g in self.groups]
        return select_masks(
            scores,
            macs=lambda widths: self.graph.macs(dict(zip(ids, widths))),
            target_macs=target_macs,
            min_keep=[self._min_keep(g) for g in self.groups],
            multiple=[g.multiple for g in self.groups],
            budget=budget,
        )

    @torch.no_grad()
    def update_masks(self) -> None:
        """One selection round (`apps.engine.selection.select_masks`), deterministic (the same weights
        and scores give the same masks on every rank).

        Paper recipe: recomputed from all-ones, at most ``begin_granularity`` more masked channels while
        above the MACs target. Budget recipe: cumulative (masked channels stay masked) and unlimited,
        down to this round's goal on the cubic from 1 to ``flops_target``."""
        plan = self.plan
        scores = self.channel_scores()
        ids = [g.id for g in self.groups]
        if plan.cumulative:
            for gid in ids:
                scores[gid] = scores[gid].masked_fill(~self.masks[gid], -math.inf)
            budget = None
        else:
            num_masked = sum(int((~m).sum()) for m in self.masks.values())
            budget = mask_budget(num_masked, self.macs(), self.target_macs, self.config.begin_granularity)
        goal = plan.goal(self.iteration) * self.base_macs
        new = self._agree(self._select([scores[i] for i in ids], goal, budget))
        if plan.cumulative:
            new = [n & self.masks[i] for n, i in zip(new, ids)]
        self.set_masks(dict(zip(ids, new)))

    def _agree(self, masks: list[Tensor]) -> list[Tensor]:
        """Under DDP, rank 0's masks on every rank: a score may read rank-local state (BatchNorm running
        statistics, which each rank updates from its own batches), and ranks that masked different
        channels would train different networks."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return masks
        device = next(self.model.parameters()).device  # NCCL broadcasts CUDA tensors only
        flat = torch.cat([m.to(torch.uint8) for m in masks]).to(device)
        dist.broadcast(flat, src=0)
        return [m.to("cpu", torch.bool) for m in flat.split([len(m) for m in masks])]

    def set_masks(self, masks: Mapping[int, Tensor], *, clear_momentum: bool = True) -> None:
        """Adopt keep-masks (``True`` = kept) for every candidate group id (e.g. to prune by hand) and
        mirror them row by row into the compactors' ``mask`` buffers. Newly masked channels are stamped
        with the current iteration (their fading starts there) and, under the budget recipe with a
        bound optimizer and ``clear_momentum``, their compactor rows' momentum is cleared (the paper
        recipe keeps it, as the spec states)."""
        sizes = {g.id: g.size for g in self.groups}
        got = {int(k): int(v.numel()) for k, v in masks.items()}
        if got != sizes:
            raise ValueError(
                f"masks do not fit this model: got {{group id: size}} {got}, expected {sizes} "
                "(another architecture or mode?)"
            )
        new = {int(gid): m.detach().to("cpu", torch.bool).clone() for gid, m in masks.items()}
        newly = {gid: self.masks[gid] & ~m for gid, m in new.items()}
        for gid, m in new.items():
            self.masked_at[gid][newly[gid]] = max(self.iteration, 0)
            self.masked_at[gid][m] = -1
        self.masks = new
        with torch.no_grad():
            for site, compactor in self.compactors():
                compactor.mask.copy_(self.row_keep(site).to(compactor.mask.dtype))
                if not clear_momentum or self._optimizer is None or self.plan.recipe != "budget":
                    continue
                state = self._optimizer.state.get(compactor.weight, {})
                buf = state.get("momentum_buffer")
                if buf is not None:
                    buf[self._rows_of(site, newly).to(buf.device)] = 0

    def row_keep(self, site: CompactorSite) -> Tensor:
        """Keep flags of the producer's rows at ``site`` (rows outside candidate groups are kept)."""
        keep = torch.ones(self.layer(site.module).weight.shape[0], dtype=torch.bool)
        for gid, rows, channels in site.slices:
            keep[rows] = self.masks[gid][channels]
        return keep

    def check_target(self) -> None:
        """`TargetMissedError` when the masked widths keep more MACs than ``flops_target`` allows, with
        the shortfall and the remedy for the recipe that ran."""
        macs = self.macs()
        if macs <= self.target_macs:
            return
        c, plan = self.config, self.plan
        kept = macs / self.base_macs
        if plan.recipe == "paper":
            remedy = (
                f"the paper recipe masks at most {c.begin_granularity} channels every {c.mask_interval} "
                f"iterations after {c.mask_start(self.iters_per_epoch)} iterations of lasso; train longer, "
                "use recipe='budget' (or 'auto'), or raise begin_granularity / lower before_mask_iters"
            )
        else:
            remedy = (
                f"the budget recipe meets the target at its last mask round (iteration {plan.mask_end}); "
                f"the run stopped after iteration {self.iteration} of {plan.total_iters}: train all of it"
            )
        raise TargetMissedError(
            f"ResRep ended at {kept:.4f} of the MACs ({macs:,} of {self.base_macs:,}), above flops_target="
            f"{c.flops_target} by {kept - c.flops_target:.4f} ({macs - self.target_macs:,.0f} MACs; recipe "
            f"{plan.recipe!r}, {self.iteration + 1} iterations): {remedy}"
        )

    # ------------------------------------------------------------------ accounting
    def epoch_metrics(self) -> dict[str, int]:
        """Columns of the training log: MACs of the masked model and channels masked so far."""
        return {"macs": self.macs(masked=True), "masked": sum(int((~m).sum()) for m in self.masks.values())}

    def summary(self) -> dict[str, Any]:
        """What a prune run's ``summary.json`` adds about ResRep: kept widths per group and the plan."""
        return {
            "group_widths": {str(g.id): {"size": g.size, "kept": int(self.masks[g.id].sum())} for g in self.groups},
            "plan": self.plan.describe(),
        }

    def group_widths(self) -> dict[int, int]:
        """Kept channels per candidate group id."""
        return {gid: int(m.sum()) for gid, m in self.masks.items()}

    def macs(self, masked: bool = True) -> int:
        """MACs of the network at the masked widths (``masked=False``: the original)."""
        return int(self.graph.macs(self.group_widths())) if masked else self.base_macs

    def layer(self, name: str) -> nn.Module:
        """The producer layer ``name`` (qualified name in the original model) inside ``self.model``."""
        module = self.model.get_submodule(name)
        return module.host if isinstance(module, Compacted) else module

    def widths(self, masked: bool = True) -> dict[str, int]:
        """Output channels per producer layer (qualified names of the original model), every layer of
        the channel graph included; ``masked=True`` counts only the rows the masks keep."""
        out = {p.module: int(self.layer(p.module).weight.shape[0]) for g in self.graph.groups for p in g.producers}
        if masked:
            for site in self.sites:
                out[site.module] = int(self.row_keep(site).sum())
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors keyed by group id as text), the iteration that masked each channel, the
        Taylor score averages and the last iteration (weights_only-loadable). Compactor weights live in
        ``rr.model.state_dict()``."""
        return {
            "masks": {str(k): v.clone() for k, v in self.masks.items()},
            "masked_at": {str(k): v.clone() for k, v in self.masked_at.items()},
            "taylor": {str(k): v.detach().cpu().clone() for k, v in self.taylor.items()},
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict` output; ValueError when its masks belong to another model. The
        optimizer's momentum is the checkpoint's: nothing is cleared (a resumed run is the uninterrupted
        one)."""
        self.set_masks({int(k): v for k, v in state["masks"].items()}, clear_momentum=False)
        self.iteration = int(state["iteration"])
        for k, v in state.get("masked_at", {}).items():
            self.masked_at[int(k)] = v.to("cpu", torch.long).clone()
        for k, v in state.get("taylor", {}).items():
            self.taylor[int(k)].copy_(v)

    # ------------------------------------------------------------------ conversion
    def convert(self, verify_inputs: Tensor | Sequence[Tensor] | None = None) -> tuple[nn.Module, ConversionReport]:
        """``(deploy, report)``: the plain narrow network (original architecture, no compactors, no
        BN after producers), verified against the compactor model with masked rows zeroed; see
        `apps.resrep.convert.convert`."""
        return convert(self, verify_inputs)
