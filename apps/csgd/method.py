"""`CSGD`: Centripetal SGD on a copy of a model, as a method object over the shared training engine.

Per prunable channel group of `reparam.graph` (residual-coupled ones too, with ``mode="residual"``) the
channels are split into as many clusters as the group's target width; every tensor slice that defines a
channel (producer kernel rows, biases, the norm's γ/β and running statistics) is *output side*, every
slice that reads one (consumer input columns, after a flatten too) is *input side*. `after_backward`
replaces each output-side gradient row by the centripetal rule; `convert` keeps the first member of every
cluster, adds the removed members' input slices into it in every consumer and removes the rest with
`reparam.graph.prune`, verifying the result.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from reparam.graph import ChannelGroup, Member, prune, trace
from reparam.graph.tracing import as_tuple
from reparam.verify import relative_error

from ..engine.groups import candidate_groups, min_keep, widths_for_target
from ..engine.selection import fill_to_target, select_masks
from .clusters import even_clusters, kmeans_clusters, merge_costs
from .config import CSGDConfig

__all__ = ["CSGD", "ClusterMergeReport", "UnconvergedError"]


class UnconvergedError(ValueError):
    """`convert` was asked before the clusters converged: the merged model would differ from the trained one."""


@dataclass(frozen=True)
class ClusterMergeReport:
    """What `CSGD.convert` did and how exact it is.

    ``max_rel_error``: the merged model vs the trained one with every cluster set to its kept member
    (both in float64): the exactness of the merge itself. ``max_rel_error_vs_trained``: the merged model
    vs the model as trained, in its own dtype (small once the clusters have converged). ``spread``: the
    largest deviation of a member from its cluster's mean, relative to its tensor's largest entry.
    """

    max_rel_error: float
    max_rel_error_vs_trained: float
    spread: float
    tolerance: float
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


@dataclass(frozen=True)
class _Slice:
    """Rows (dim 0) of one output-side tensor that hold a clustered group's channels."""

    name: str
    rows: Tensor  # positions along dim 0
    cluster: Tensor  # bucket of each position: (cluster, offset within its channel), see `_mapping`
    count: Tensor  # positions per bucket (at least 1)
    source: Tensor  # for each position, the position of its cluster's kept member (same offset)
    weight: Tensor  # each position's weight in its cluster's center (`CSGDConfig.center`)
    mass: Tensor  # the weights' sum per bucket


@dataclass(frozen=True)
class _Columns:
    """Columns (dim 1) of one consumer weight that read a clustered group's channels."""

    name: str
    columns: Tensor
    target: Tensor  # for each column, the local index of its kept member's column (same offset)
    share: Tensor  # for each column, 1 / the size of its channel's cluster


def _by_channel(rows: Tensor, member: Member, channels: int) -> np.ndarray:
    """``rows`` (one per position of ``member``'s tensor) rearranged to one per channel of its group."""
    out = np.zeros((channels, rows.shape[1]))
    out[np.asarray(member.channels)] = rows.double().cpu().numpy()[np.asarray(member.positions)]
    return out


def _mapping(member: Member, cluster_of: np.ndarray, keep_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bucket per position, the position of the kept member's matching entry per position).

    A channel may own several positions of a tensor (the rows of a depthwise conv with a channel
    multiplier, the columns of a linear after a flatten); its r-th position matches the r-th of every
    other member of its cluster, so a bucket is a (cluster, r) pair: the entries that must become equal."""
    positions, channels = np.asarray(member.positions), np.asarray(member.channels)
    order: dict[int, list[int]] = {}
    for pos, ch in sorted(zip(positions.tolist(), channels.tolist())):
        order.setdefault(ch, []).append(pos)
    rank = {pos: i for ps in order.values() for i, pos in enumerate(ps)}
    ranks = np.array([rank[pos] for pos in positions.tolist()], dtype=np.int64)
    source = np.array([order[int(keep_of[ch])][rank[pos]] for pos, ch in zip(positions.tolist(), channels.tolist())])
    per_channel = int(ranks.max()) + 1 if len(ranks) else 1
    return cluster_of[channels] * per_channel + ranks, source


class CSGD:
    """C-SGD on a copy of ``model``: clusters, optimizer groups, the centripetal gradient rule, the merge.

    ``example_inputs`` trace the channel groups and verify the merge; ``total_iters`` (the run's length)
    sets the budget rule's centripetal strength. Raises ValueError when no group can be clustered or the
    MACs target is out of reach.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor | Sequence[Tensor],
        config: CSGDConfig | None = None,
        *,
        total_iters: int | None = None,
        leaf_modules: Sequence[str | type[nn.Module]] = (),
    ) -> None:
        self.config = config if config is not None else CSGDConfig()
        self.total_iters = total_iters
        self.plan_iters = total_iters  # the length the collapse was planned for (`extend` keeps it)
        self.model = copy.deepcopy(model)
        device = next(self.model.parameters()).device
        self.example_inputs: tuple[Tensor, ...] = tuple(x.to(device) for x in as_tuple(example_inputs))
        self._leaf_modules = tuple(leaf_modules)
        self.graph = trace(self.model, self.example_inputs, leaf_modules=self._leaf_modules)
        self.groups, self.skipped = candidate_groups(
            self.model, self.example_inputs, self.graph, self._cluster_reason, self._min_keep, "C-SGD"
        )
        if not self.groups:
            raise ValueError(
                f"C-SGD found no channel group it can cluster with mode={self.config.mode!r} "
                f"(why, per group id: {dict(list(self.skipped.items())[:8])})"
            )
        self.base_macs = int(self.graph.macs())
        features = {g.id: self._features(g) for g in self.groups}
        self.importance = {
            g.id: self._importance(g) if self.config.center == "importance" else np.ones(g.size) for g in self.groups
        }
        self.widths = self._target_widths(features)
        self.clusters: dict[int, list[list[int]]] = {
            g.id: self._cluster(g, self.widths[g.id], features[g.id]) for g in self.groups
        }
        self.strength = self.config.strength(total_iters)  # the largest ε of the run (`current_strength` now)
        self.vector_strength = self.config.vector_strength(total_iters)  # the same for γ/β and biases
        self.iteration = -1
        self.spread_log: list[tuple[int, float]] = []  # (iterations done, spread), see `after_step`
        self._index()

    # ------------------------------------------------------------------ structure
    def _sides(self, group: ChannelGroup) -> tuple[list[Member], list[Member], str | None]:
        """(output-side members, input-side members, why the group cannot be clustered)."""
        out_side, in_side = [], []
        for m in group.members:
            if m.kind == "node":
                continue
            owner, _, attr = m.name.rpartition(".")
            module = self.model.get_submodule(owner)
            if isinstance(module, _ConvNd) and not module.transposed or isinstance(module, nn.Linear):
                if attr == "weight" and m.dim == 1:
                    if getattr(module, "groups", 1) != 1:
                        return (
                            [],
                            [],
                            (
                                f"it feeds the grouped convolution {owner} (groups={module.groups}), whose input "
                                "slices cannot be summed across its groups"
                            ),
                        )
                    in_side.append(m)
                else:
                    out_side.append(m)
            elif isinstance(module, _BatchNorm):
                out_side.append(m)
            else:
                return (
                    [],
                    [],
                    (
                        f"{m.name} belongs to a {type(module).__name__}, which C-SGD cannot make channel-wise "
                        "identical (only convolutions, linear layers and batch norms)"
                    ),
                )
        if not in_side:
            return [], [], "no layer reads its channels, so removed members have nowhere to go"
        return out_side, in_side, None

    def _cluster_reason(self, group: ChannelGroup) -> str | None:
        """Why ``group`` is not clustered (None: it is a candidate)."""
        if not group.prunable:
            return f"not prunable: {group.reason}"
        if not group.producers:
            return "no producer layer"
        if self.config.mode == "paper" and len(group.producers) > 1:
            return "mode='paper' keeps residual-coupled groups at full width"
        return self._sides(group)[2]

    def _min_keep(self, group: ChannelGroup) -> int:
        return min_keep(group, self.config.num_at_least)

    def _target_widths(self, features: dict[int, np.ndarray]) -> dict[int, int]:
        """Per group, its number of clusters: the widths that meet ``flops_target`` by ``config.widths``
        (``features``: each group's `_features`)."""
        target = self.config.flops_target * self.base_macs
        minimum = {g.id: self._min_keep(g) for g in self.groups}
        if self.config.widths == "uniform":
            sizes, multiple = {g.id: g.size for g in self.groups}, {g.id: g.multiple for g in self.groups}
            return widths_for_target(sizes, minimum, multiple, lambda w: self.graph.macs(w), target)
        ids, multiple = [g.id for g in self.groups], [g.multiple for g in self.groups]
        scores = [torch.as_tensor(merge_costs(features[i])) for i in ids]
        macs = lambda w: self.graph.macs(dict(zip(ids, w)))  # noqa: E731
        minimum_widths = [minimum[i] for i in ids]
        masks = select_masks(scores, macs=macs, target_macs=target, min_keep=minimum_widths, multiple=multiple)
        grown = fill_to_target([int(m.sum()) for m in masks], scores, macs=macs, target_macs=target, multiple=multiple)
        widths = dict(zip(ids, grown))
        if self.graph.macs(widths) > target:
            raise ValueError(
                f"the MACs target {self.config.flops_target} is out of reach: with every clustered group at its "
                f"minimum width the model keeps {self.graph.macs(widths) / self.base_macs:.3f} of its MACs"
            )
        return widths

    def _features(self, group: ChannelGroup) -> np.ndarray:
        """One row per channel of ``group``: the kernels of its producers (reshaped to out x in·k·k), side by
        side (the spec's clustering space; a residual group concatenates its producers')."""
        state = dict(self.model.named_parameters())
        rows = []
        for m in self._sides(group)[0]:
            tensor = state.get(m.name)
            if tensor is None or tensor.ndim < 2:
                continue  # kernels only (spec: the layer's kernel reshaped to out x in·k·k)
            rows.append(_by_channel(tensor.detach().reshape(tensor.shape[0], -1), m, group.size))
        return np.concatenate(rows, axis=1)

    def _importance(self, group: ChannelGroup) -> np.ndarray:
        """Per channel, Σ_consumers ‖C[:, c]‖² · mean_producers (γ_c/σ_c)² (see `CSGDConfig.center`),
        normalised to mean 1 over the group and floored at 1e-6 of it."""
        state = dict(self.model.named_parameters())
        energy = np.zeros(group.size)
        for m in self._sides(group)[1]:
            w = state[m.name].detach().double().transpose(0, 1).reshape(state[m.name].shape[1], -1)
            np.add.at(energy, np.asarray(m.channels), (w * w).sum(1).cpu().numpy()[np.asarray(m.positions)])
        gain, count = np.zeros(group.size), np.zeros(group.size)
        for p in group.producers:
            norm = self.model.get_submodule(p.norm) if p.norm is not None else None
            rows = np.ones(self.model.get_submodule(p.module).weight.shape[0])
            if isinstance(norm, _BatchNorm) and norm.weight is not None:
                rows = norm.weight.detach().double().cpu().numpy() ** 2
                if norm.running_var is not None:
                    rows = rows / (norm.running_var.detach().double().cpu().numpy() + norm.eps)
            np.add.at(gain, np.asarray(p.member.channels), rows[np.asarray(p.member.positions)])
            np.add.at(count, np.asarray(p.member.channels), 1.0)
        score = energy * gain / np.maximum(count, 1.0)
        score = score / (score.mean() or 1.0)
        return np.maximum(score, 1e-6)

    def _cluster(self, group: ChannelGroup, k: int, features: np.ndarray) -> list[list[int]]:
        if self.config.clustering == "even" or k == group.size:
            return even_clusters(group.size, k)
        weights = self.importance[group.id] if self.config.center == "importance" else None
        return kmeans_clusters(features, k, seed=self.config.cluster_seed, weights=weights)

    def _index(self) -> None:
        """Index tensors for the gradient rule and the merge, from ``self.clusters``, on the model's device."""
        device = next(self.model.parameters()).device
        self._indexed_on = device
        self._slices: dict[str, list[_Slice]] = {}
        self._columns: list[_Columns] = []
        for group in self.groups:
            cluster_of = np.zeros(group.size, dtype=np.int64)
            keep_of = np.zeros(group.size, dtype=np.int64)
            for c, members in enumerate(self.clusters[group.id]):
                cluster_of[members], keep_of[members] = c, members[0]
            out_side, in_side, _ = self._sides(group)
            for m in out_side:
                bucket, source = _mapping(m, cluster_of, keep_of)
                as_t = lambda a: torch.as_tensor(a, dtype=torch.long, device=device)  # noqa: E731
                counts = as_t(np.maximum(np.bincount(bucket), 1))
                weight = self.importance[group.id][np.asarray(m.channels)]
                mass = np.bincount(bucket, weights=weight, minlength=len(counts))
                mass = np.where(mass > 0, mass, 1.0)
                as_f = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
                self._slices.setdefault(m.name, []).append(
                    _Slice(m.name, as_t(m.positions), as_t(bucket), counts, as_t(source), as_f(weight), as_f(mass))
                )
            for m in in_side:
                _, source = _mapping(m, cluster_of, keep_of)
                local = {int(p): i for i, p in enumerate(np.asarray(m.positions).tolist())}
                target = torch.as_tensor([local[int(s)] for s in source], dtype=torch.long, device=device)
                sizes = np.bincount(cluster_of)[cluster_of[np.asarray(m.channels)]]
                share = torch.as_tensor(1.0 / sizes, device=device)
                columns = torch.as_tensor(m.positions, dtype=torch.long, device=device)
                self._columns.append(_Columns(m.name, columns, target, share))
        params = dict(self.model.named_parameters())
        self.centripetal: dict[str, nn.Parameter] = {n: params[n] for n in self._slices if n in params}

    def _follow_device(self) -> None:
        """The index tensors follow the model: built on one device, it may train on another (`fit` moves it)."""
        if next(self.model.parameters()).device != self._indexed_on:
            self._index()

    # ------------------------------------------------------------------ training
    def param_groups(self) -> list[dict[str, Any]]:
        """Clustered kernels without the optimizer's decay (η is inside the rule), other kernels with decay
        η, biases and norm parameters at ``bias_lr_factor`` x lr without decay."""
        cfg = self.config
        clustered = {id(p) for n, p in self.centripetal.items() if p.ndim > 1}
        kernels = [p for p in self.model.parameters() if p.requires_grad and p.ndim > 1 and id(p) not in clustered]
        vectors = [p for p in self.model.parameters() if p.requires_grad and p.ndim <= 1]
        return [
            {"params": [p for p in self.model.parameters() if id(p) in clustered], "weight_decay": 0.0},
            {"params": kernels, "weight_decay": cfg.weight_decay},
            {"params": vectors, "weight_decay": 0.0, "lr": cfg.lr * cfg.bias_lr_factor},
        ]

    def optimizer(self) -> torch.optim.SGD:
        """SGD, Nesterov momentum, over `param_groups` (the spec's optimizer)."""
        groups = [g for g in self.param_groups() if g["params"]]
        return torch.optim.SGD(groups, lr=self.config.lr, momentum=self.config.momentum, nesterov=True)

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR | None:
        """The learning-rate shape of a run of ``total_iters``: constant while the clusters collapse (the
        first ``collapse_fraction``), then a cosine to 0 over the rest (None without ``total_iters``: the
        engine's cosine over the whole run)."""
        total = self.total_iters
        if not total:
            return None
        hold = int(self.config.collapse_fraction * (self.plan_iters or total))

        def factor(i: int) -> float:
            return 1.0 if i < hold else 0.5 * (1.0 + math.cos(math.pi * min(1.0, (i - hold) / max(1, total - hold))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def extend(self, total_iters: int) -> None:
        """Lengthen the run to ``total_iters`` (a resumed run given more epochs): the collapse keeps its
        strength and its phase, the cosine after it spans the longer run."""
        if self.total_iters is not None and total_iters < self.total_iters:
            raise ValueError(f"a run can be extended, not shortened ({self.total_iters} → {total_iters} iterations)")
        self.total_iters = total_iters

    @torch.no_grad()
    def after_backward(self) -> None:
        """The centripetal rule on every output-side row: ``g̃ = G_H(g) + η·W + ε·(W − c_H(W))`` for
        kernels, ``G_H(g) + ε_v·(v − c_H(v))`` for vectors (`CSGDConfig.vector_strength`), both ramped
        alike; ``c_H`` is the cluster's center (`CSGDConfig.center`: importance-weighted or plain mean),
        ``G_H`` its mean task gradient, or its sum with ``cluster_gradient="sum"``, which also gives every
        consumer column that reads a cluster of k channels 1/k of its gradient."""
        self._follow_device()
        cfg, ramp = self.config, self.config.ramp(self.iteration + 1, self.plan_iters)
        now, now_vector = self.strength * ramp, self.vector_strength * ramp
        summed = cfg.cluster_gradient == "sum"
        if summed:
            params = dict(self.model.named_parameters())
            for c in self._columns:
                grad = params[c.name].grad
                if grad is not None:
                    shape = (1, -1) + (1,) * (grad.ndim - 2)
                    grad.index_copy_(1, c.columns, grad.index_select(1, c.columns) * c.share.to(grad.dtype).view(shape))
        for name, p in self.centripetal.items():
            if p.grad is None:
                continue
            kernel = p.ndim > 1
            eta, eps = (cfg.weight_decay, now) if kernel else (0.0, now_vector)
            updates = []
            for s in self._slices[name]:
                g = p.grad.index_select(0, s.rows).reshape(len(s.rows), -1)
                w = p.index_select(0, s.rows).reshape(len(s.rows), -1)
                weight = s.weight.to(g.dtype)[:, None]
                sum_g, sum_w = (
                    torch.zeros((s.count.numel(), g.shape[1]), dtype=g.dtype, device=g.device).index_add_(
                        0, s.cluster, t
                    )
                    for t in (g, weight * w)
                )
                task = sum_g if summed else sum_g / s.count.to(g.dtype)[:, None]
                mean_w = sum_w / s.mass.to(g.dtype)[:, None]
                updates.append((s.rows, task[s.cluster] + eta * w + eps * (w - mean_w[s.cluster])))
            if eta:
                p.grad.add_(p, alpha=eta)  # rows outside every clustered group: plain weight decay
            for rows, new in updates:
                p.grad.index_copy_(0, rows, new.reshape((-1,) + tuple(p.shape[1:])))

    @property
    def current_strength(self) -> float:
        """ε of the step about to be taken (the budget rule ramps it up over the collapse)."""
        return self.strength * self.config.ramp(self.iteration + 1, self.plan_iters)

    def after_step(self, iteration: int) -> None:
        """Record the within-cluster spread after every ``spread_every``-th step (and the first)."""
        self.iteration = iteration
        every = self.config.spread_every
        if every and (iteration == 0 or (iteration + 1) % every == 0):
            self.spread_log.append((iteration + 1, self.spread()))

    def epoch_metrics(self) -> dict[str, float]:
        """Columns of the training log: the largest within-cluster spread and the centripetal strength."""
        return {"spread": self.spread(), "centripetal_strength": self.current_strength}

    def summary(self) -> dict[str, Any]:
        """What a prune run's ``summary.json`` adds about C-SGD: clusters per group, the strength used and
        the spread log (``[iterations done, spread]`` every ``spread_every`` steps)."""
        return {
            "group_widths": {str(g.id): {"size": g.size, "kept": len(self.clusters[g.id])} for g in self.groups},
            "centripetal_strength": self.strength,
            "spread_log": [[i, v] for i, v in self.spread_log],
        }

    @torch.no_grad()
    def spread(self) -> float:
        """The largest deviation of any output-side entry (parameters and running statistics) from its
        cluster's mean, relative to its tensor's largest magnitude: 0 once the clusters have collapsed."""
        self._follow_device()
        tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        worst = 0.0
        for name, slices in self._slices.items():
            t = tensors[name].detach().double()
            scale = float(t.abs().max()) or 1.0
            for s in slices:
                rows = t.index_select(0, s.rows).reshape(len(s.rows), -1)
                mean = torch.zeros((s.count.numel(), rows.shape[1]), dtype=rows.dtype, device=rows.device)
                mean = mean.index_add_(0, s.cluster, rows) / s.count.to(rows.dtype)[:, None]
                worst = max(worst, float((rows - mean[s.cluster]).abs().max()) / scale)
        return worst

    def state_dict(self) -> dict[str, Any]:
        return {
            "clusters": {int(k): [list(map(int, c)) for c in v] for k, v in self.clusters.items()},
            "spread_log": [[int(i), float(v)] for i, v in self.spread_log],
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        clusters = {int(k): [list(c) for c in v] for k, v in state["clusters"].items()}
        if set(clusters) != {g.id for g in self.groups}:
            raise ValueError("the saved clusters belong to other channel groups (another model or mode)")
        self.clusters = clusters
        self.spread_log = [(int(i), float(v)) for i, v in state.get("spread_log", [])]
        self.iteration = int(state.get("iteration", -1))
        self._index()

    # ------------------------------------------------------------------ conversion
    def convert(self, verify_inputs: Tensor | Sequence[Tensor] | None = None) -> tuple[nn.Module, ClusterMergeReport]:
        """``(merged, report)``: one member per cluster, the removed members' input slices added into it in
        every consumer, the rest removed by `reparam.graph.prune`. The merge runs on a float64 copy with
        every cluster set to its kept member and is verified there (≤1e-10); the merged model, in the
        model's dtype, must match the trained one to ``merge_tolerance`` (`UnconvergedError` otherwise,
        with the measured spread; ``on_unconverged="warn"`` warns)."""
        self._follow_device()
        first = next(self.model.parameters())
        device, dtype = first.device, first.dtype
        wide = lambda xs: tuple(x.double() if x.is_floating_point() else x for x in xs)  # noqa: E731
        example = wide(x.to(device) for x in self.example_inputs)
        inputs = example if verify_inputs is None else wide(x.to(device) for x in as_tuple(verify_inputs))
        snapped = copy.deepcopy(self.model).eval().double()
        tensors = {**dict(snapped.named_parameters()), **dict(snapped.named_buffers())}
        with torch.no_grad():
            for name, slices in self._slices.items():
                for s in slices:
                    tensors[name].index_copy_(0, s.rows, tensors[name].index_select(0, s.source))
            merged = copy.deepcopy(snapped)
            merged_tensors = dict(merged.named_parameters())
            for c in self._columns:
                w = merged_tensors[c.name]
                part = w.index_select(1, c.columns)
                w.index_copy_(1, c.columns, torch.zeros_like(part).index_add_(1, c.target, part))
        keep = {g.id: sorted(members[0] for members in self.clusters[g.id]) for g in self.groups}
        wide_graph = trace(merged, example, leaf_modules=self._leaf_modules)
        smaller = {k: v for k, v in keep.items() if len(v) < wide_graph.groups[k].size}
        merged = prune(merged, example, smaller, graph=wide_graph).eval()
        with torch.no_grad():
            error = relative_error(snapped(*inputs), merged(*inputs))
            merged = merged.to(dtype)
            native = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
            was_training = self.model.training
            error_trained = relative_error(self.model.eval()(*native), merged(*native))
            self.model.train(was_training)
        spread = self.spread()
        report = ClusterMergeReport(
            max_rel_error=error,
            max_rel_error_vs_trained=error_trained,
            spread=spread,
            tolerance=self.config.merge_tolerance,
            macs_before=self.base_macs,
            macs_after=int(self.graph.macs({g.id: len(keep[g.id]) for g in self.groups})),
            params_before=sum(p.numel() for p in self.model.parameters()),
            params_after=sum(p.numel() for p in merged.parameters()),
            widths={g.id: len(keep[g.id]) for g in self.groups},
        )
        if not error <= 1e-10:
            raise UnconvergedError(
                f"the C-SGD merge is not exact: max relative error {error:.3e} > 1e-10 in float64 with every cluster "
                "set to its kept member; a layer between the clustered channels and their consumers mixes channels"
            )
        if not error_trained <= self.config.merge_tolerance:
            message = (
                f"C-SGD clusters have not converged: the merged model differs from the trained one by max relative "
                f"error {error_trained:.3e} > merge_tolerance {self.config.merge_tolerance:.0e} (largest member "
                f"deviation from its cluster mean {spread:.2e} of its tensor's scale); train longer or raise "
                f"centripetal_strength (now {self.strength:.3g}, reached at iteration "
                f"{int(self.config.collapse_fraction * (self.plan_iters or 0))}; the budget rule ramps it by "
                f"the iteration `after_step` reports, {self.iteration + 1} steps so far)"
            )
            if self.config.on_unconverged == "raise":
                raise UnconvergedError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return merged, report
