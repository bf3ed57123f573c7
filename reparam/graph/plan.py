"""The channel plan: how to redo a pruning on a freshly constructed model, as plain JSON.

A plan records the example input shapes and dtypes to trace with, the trace options, and one keep-set
per pruning stage (a pruned model can be pruned again). It also fingerprints the groups each stage was
planned on, so a plan applied to another architecture is refused. `reparam.graph.saved` writes and
rebuilds pruned models from it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .channel_graph import ChannelGraph
from .errors import PruneError

PLAN_FORMAT = "reparam.graph.plan/1"
PLAN_FILE, WEIGHTS_FILE = "plan.json", "weights.pt"


@dataclass(frozen=True)
class Stage:
    keep: dict[int, list[int]]
    fingerprint: list[list]  # [group id, size, producer modules] of the prunable groups planned on


@dataclass(frozen=True)
class PrunePlan:
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    leaf_modules: list[str] = field(default_factory=list)  # qualified names, or "module:Class" for classes
    round_to: int = 1
    stages: list[Stage] = field(default_factory=list)
    frontend: str = "auto"  # the front end the first stage was traced with ("fx" / "export")
    #: the first stage's torch.fx ``concrete_args``; None: values JSON cannot hold (the plan cannot redo it)
    concrete_args: dict[str, Any] | None = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=1)

    @staticmethod
    def from_json(text: str) -> PrunePlan:
        raw = json.loads(text)
        if raw.pop("format", None) != PLAN_FORMAT:
            raise PruneError(f"not a {PLAN_FORMAT} channel plan")
        stages = [Stage({int(k): list(v) for k, v in s["keep"].items()}, s["fingerprint"]) for s in raw.pop("stages")]
        return PrunePlan(stages=stages, **raw)


def fingerprint(graph: ChannelGraph) -> list[list]:
    return [[g.id, g.size, [p.module for p in g.producers]] for g in graph.groups if g.prunable]


def leaf_spec_names(specs: Sequence) -> list[str]:
    return [s if isinstance(s, str) else f"{s.__module__}:{s.__qualname__}" for s in specs]


def next_plan(graph: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> PrunePlan:
    """The plan of `prune(graph.model, ..., keep)`: the model's own plan (if it was pruned before) plus this stage."""
    before = getattr(graph.model, "meta", {}).get("reparam.plan") if hasattr(graph.model, "meta") else None
    stage = Stage({int(k): sorted(int(i) for i in v) for k, v in keep.items()}, fingerprint(graph))
    if before is not None:
        return replace(before, stages=[*before.stages, stage])
    try:
        concrete: dict[str, Any] | None = json.loads(json.dumps(graph.concrete_args))
    except (TypeError, ValueError):
        concrete = None
    return PrunePlan(
        [list(t.shape) for t in graph.example_inputs],
        [str(t.dtype).removeprefix("torch.") for t in graph.example_inputs],
        leaf_spec_names(graph.leaf_modules),
        graph.round_to,
        [stage],
        graph.frontend,
        concrete,
    )


def leaf_specs(names: Sequence[str]) -> tuple:
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
