"""Saving a pruned model as a channel plan (JSON) plus a `state_dict`, and rebuilding it without pickle.

A plan records how to redo the surgery on a freshly constructed model: the example input shapes
and dtypes to trace with, the trace options, and one keep-set per pruning stage (a pruned model can
be pruned again). It also fingerprints the groups each stage was planned on, so a plan applied to
the wrong architecture is refused instead of producing a different model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from reparam.atomic import atomic_save, atomic_write_text

from .channel_graph import trace
from .errors import PruneError
from .plan import PLAN_FILE, WEIGHTS_FILE, PrunePlan, fingerprint, leaf_specs
from .surgery import prune


def save_pruned(model_pruned: nn.Module, path_or_dir: str | os.PathLike, plan: PrunePlan | None = None) -> Path:
    """Write `plan.json` and `weights.pt` (a plain state_dict) into the directory `path_or_dir`."""
    plan = plan if plan is not None else getattr(model_pruned, "meta", {}).get("reparam.plan")
    if not isinstance(plan, PrunePlan):
        raise PruneError("no channel plan: pass the plan, or save a model returned by reparam.graph.prune")
    d = Path(path_or_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model_pruned.state_dict().items()}
    atomic_save(state, d / WEIGHTS_FILE)
    atomic_write_text(plan.to_json(), d / PLAN_FILE)
    return d


def apply_plan(constructor_model: nn.Module, plan: PrunePlan, source: str = "the channel plan") -> nn.Module:
    """Redo the surgery of every stage of ``plan`` on a freshly constructed original (not modified);
    the weights are the constructor's, to be replaced by the saved ones. A plan made for another
    architecture is refused (its group fingerprints do not match)."""
    ref = next(iter(constructor_model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")

    def dtype_of(name: str) -> torch.dtype:  # floating inputs follow the model (a plan made in float64 fits float32)
        dt = getattr(torch, name)
        return ref.dtype if dt.is_floating_point and ref is not None and ref.is_floating_point() else dt

    inputs = tuple(
        torch.zeros(s, dtype=dtype_of(dt), device=device) for s, dt in zip(plan.input_shapes, plan.input_dtypes)
    )
    if plan.concrete_args is None:
        raise PruneError(
            f"{source} was traced with torch.fx concrete_args that JSON cannot hold, so it cannot be redone "
            "from the plan: trace and prune the fresh model with the same concrete_args"
        )
    model: nn.Module = constructor_model
    for i, stage in enumerate(plan.stages):
        graph = trace(
            model,
            inputs,
            leaf_modules=leaf_specs(plan.leaf_modules),
            round_to=plan.round_to,
            frontend=plan.frontend if i == 0 else "auto",
            concrete_args=(plan.concrete_args or None) if i == 0 else None,
        )
        if fingerprint(graph) != stage.fingerprint:
            raise PruneError(
                f"{source} (stage {i}) was made for a different architecture: "
                f"its channel groups do not match this model's"
            )
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
