"""Pruned models round-trip through a JSON channel plan plus a weights-only state_dict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reparam.graph import PruneError, load_pruned, prune, save_pruned, trace

from .helpers import random_keep
from .nets import CifarResNet, TransformerNet


@pytest.mark.parametrize("cls,shape", [(CifarResNet, (2, 3, 8, 8)), (TransformerNet, (2, 3, 8, 8))])
def test_save_load_roundtrip_twice_pruned(tmp_path, cls, shape, monkeypatch):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(shape)
    g = trace(model, x)
    once = prune(model, x, random_keep(g, 0.6, np.random.default_rng(0)), graph=g)
    g2 = trace(once, x)
    twice = prune(once, x, random_keep(g2, 0.6, np.random.default_rng(1)), graph=g2)
    with torch.no_grad():
        for p in twice.parameters():
            p.add_(0.01)  # weights trained after pruning are what gets saved
    save_pruned(twice, tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "plan.json").read_text())
    assert plan["format"].startswith("reparam.graph.plan") and len(plan["stages"]) == 2

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    torch.manual_seed(1)
    fresh = cls().eval()
    loaded = load_pruned(fresh, tmp_path / "m").eval()
    assert calls and all(k.get("weights_only") for k in calls)
    torch.testing.assert_close(loaded(x), twice(x), rtol=0, atol=0)
    assert all(p.shape == q.shape for p, q in zip(fresh.parameters(), cls().parameters()))


def test_plan_for_another_architecture_is_refused(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    model = CifarResNet(width=8).eval()
    g = trace(model, x)
    save_pruned(prune(model, x, random_keep(g, 0.5, np.random.default_rng(0)), graph=g), tmp_path)
    with pytest.raises(PruneError, match="different architecture"):
        load_pruned(CifarResNet(width=12).eval(), tmp_path)


def test_save_needs_a_plan(tmp_path):
    with pytest.raises(PruneError, match="no channel plan"):
        save_pruned(CifarResNet(), tmp_path)


def test_a_plan_made_in_float64_rebuilds_a_float32_model(tmp_path):
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    model = CifarResNet(width=8).double().eval()
    g = trace(model, x)
    pruned = prune(model, x, random_keep(g, 0.5, np.random.default_rng(0)), graph=g)
    save_pruned(pruned.float(), tmp_path)
    loaded = load_pruned(CifarResNet(width=8).eval(), tmp_path).eval()
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(loaded(x.float()), pruned.float()(x.float()), rtol=0, atol=0)


class Switched(torch.nn.Module):
    """A branch on an argument: torch.fx traces it only with ``concrete_args``, which the plan records
    and redoes the trace with."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 1)
        self.c, self.head = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 2, 1)

    def forward(self, x, deep=True):
        y = torch.relu(self.a(x))
        if deep:
            y = torch.relu(self.b(y))
        return self.head(torch.relu(self.c(y)))


class SizeLoop(torch.nn.Module):
    """Python on sizes: torch.fx cannot trace it, the torch.export fallback can; the plan redoes that."""

    def __init__(self):
        super().__init__()
        self.a, self.head = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        for _ in range(y.shape[1] // 8):
            y = y * 2
        return self.head(y)


@pytest.mark.parametrize(
    "cls, options, frontend",
    [(Switched, {"concrete_args": {"deep": True}}, "fx"), (SizeLoop, {}, "export")],
)
def test_a_plan_redoes_the_trace_it_was_made_with(tmp_path, cls, options, frontend):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(1, 3, 4, 4)
    g = trace(model, x, **options)
    assert g.frontend == frontend
    pruned = prune(model, x, random_keep(g, 0.5, np.random.default_rng(0)), graph=g)
    save_pruned(pruned, tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["frontend"] == frontend and plan["concrete_args"] == options.get("concrete_args", {})
    loaded = load_pruned(cls().eval(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
