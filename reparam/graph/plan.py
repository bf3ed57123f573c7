"""Saving a pruned model as a channel plan (JSON) plus a `state_dict`, and rebuilding it without pickle.

A plan records how to redo the surgery on a freshly constructed model: the example input shapes
and dtypes to trace with, the trace options, and one keep-set per pruning stage (a pruned model can
be pruned again). It also fingerprints the groups each stage was planned on, so a plan applied to
the wrong architecture is refused instead of producing a different model.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .channel_graph import ChannelGraph, trace
from .errors import PruneError

PLAN_FORMAT = "reparam.graph.plan/1"
PLAN_FILE, WEIGHTS_FILE = "plan.json", "weights.pt"


@dataclass(frozen=True)
class Stage:
    keep: dict[int, list[int]]
    fingerprint: list[list]          # [group id, size, producer modules] of the prunable groups planned on


@dataclass(frozen=True)
class PrunePlan:
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    leaf_modules: list[str] = field(default_factory=list)   # qualified names, or "module:Class" for classes
    round_to: int = 1
    stages: list[Stage] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=1)

    @staticmethod
    def from_json(text: str) -> "PrunePlan":
        raw = json.loads(text)
        if raw.pop("format", None) != PLAN_FORMAT:
            raise PruneError(f"not a {PLAN_FORMAT} channel plan")
        stages = [Stage({int(k): list(v) for k, v in s["keep"].items()}, s["fingerprint"]) for s in raw.pop("stages")]
        return PrunePlan(stages=stages, **raw)


def fingerprint(graph: ChannelGraph) -> list[list]:
    return [[g.id, g.size, [p.module for p in g.producers]] for g in graph.groups if g.prunable]


def leaf_spec_names(specs: Sequence) -> list[str]:
    return [s if isinstance(s, str) else f"{s.__module__}:{s.__qualname__}" for s in specs]


def _leaf_specs(names: Sequence[str]) -> tuple:
    out = []
    for n in names:
        if ":" in n:
            mod, _, qual = n.partition(":")
            obj = importlib.import_module(mod)
            for part in qual.split("."):
                obj = getattr(obj, part)
            out.append(obj)
        else:
            out.append(n)
    return tuple(out)


def next_plan(graph: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> PrunePlan:
    """The plan of `prune(graph.model, ..., keep)`: the model's own plan (if it was pruned before) plus this stage."""
    before = getattr(graph.model, "meta", {}).get("reparam.plan") if hasattr(graph.model, "meta") else None
    stage = Stage({int(k): sorted(int(i) for i in v) for k, v in keep.items()}, fingerprint(graph))
    if before is not None:
        return PrunePlan(before.input_shapes, before.input_dtypes, before.leaf_modules, before.round_to,
                         [*before.stages, stage])
    return PrunePlan([list(t.shape) for t in graph.example_inputs], [str(t.dtype).removeprefix("torch.")
                                                                      for t in graph.example_inputs],
                     leaf_spec_names(graph.leaf_modules), graph.round_to, [stage])


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_pruned(model_pruned: nn.Module, path_or_dir: str | os.PathLike, plan: PrunePlan | None = None) -> Path:
    """Write `plan.json` and `weights.pt` (a plain state_dict) into the directory `path_or_dir`."""
    plan = plan if plan is not None else getattr(model_pruned, "meta", {}).get("reparam.plan")
    if not isinstance(plan, PrunePlan):
        raise PruneError("no channel plan: pass the plan, or save a model returned by reparam.graph.prune")
    d = Path(path_or_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model_pruned.state_dict().items()}
    _atomic_write(d / WEIGHTS_FILE, lambda f: torch.save(state, f))
    _atomic_write(d / PLAN_FILE, lambda f: f.write(plan.to_json().encode()))
    return d


def apply_plan(constructor_model: nn.Module, plan: PrunePlan, source: str = "the channel plan") -> nn.Module:
    """Redo the surgery of every stage of ``plan`` on a freshly constructed original (not modified);
    the weights are the constructor's, to be replaced by the saved ones. A plan made for another
    architecture is refused (its group fingerprints do not match)."""
    from .surgery import prune
    ref = next(iter(constructor_model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    inputs = tuple(torch.zeros(s, dtype=getattr(torch, dt), device=device)
                   for s, dt in zip(plan.input_shapes, plan.input_dtypes))
    model: nn.Module = constructor_model
    for i, stage in enumerate(plan.stages):
        graph = trace(model, inputs, leaf_modules=_leaf_specs(plan.leaf_modules), round_to=plan.round_to)
        if fingerprint(graph) != stage.fingerprint:
            raise PruneError(f"{source} (stage {i}) was made for a different architecture: "
                             f"its channel groups do not match this model's")
        model = prune(model, inputs, stage.keep, graph=graph)
    return model


def load_pruned(constructor_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved pruned model from a freshly constructed original (`constructor_model`, which is
    not modified) and the saved plan, then load the saved weights (`weights_only=True`)."""
    d = Path(path)
    model = apply_plan(constructor_model, PrunePlan.from_json((d / PLAN_FILE).read_text()), f"the channel plan in {d}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    state = torch.load(d / WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model
