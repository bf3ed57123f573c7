"""Surgery: pruned models run, shrink as predicted, keep module names; bad keep-sets are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from reparam.graph import PruneError, prune, trace

from .helpers import random_keep
from .nets import TRICKY, CifarResNet, TransformerNet


@pytest.mark.parametrize("name", sorted(TRICKY))
@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_pruned_model_runs_and_shrinks_as_predicted(name, fraction):
    cls, shape = TRICKY[name]
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(shape)
    before = copy.deepcopy(model.state_dict())
    g = trace(model, x)
    keep = random_keep(g, fraction, np.random.default_rng(1))
    assert keep, "every tricky net has something to prune"
    small = prune(model, x, keep, graph=g)
    y = small(x)
    assert y.shape == model(x).shape and torch.isfinite(y).all()
    widths = {k: len(v) for k, v in keep.items()}
    assert sum(p.numel() for p in small.parameters()) == g.params(widths) < g.params()
    assert trace(small, x).macs() == g.macs(widths) < g.macs()
    # the original is untouched, the pruned one keeps the original module names
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert set(small.state_dict()) <= set(before)
    for k, v in small.state_dict().items():
        assert v.dim() == before[k].dim()
    # and a pruned model can be pruned again
    g2 = trace(small, x)
    again = prune(small, x, random_keep(g2, 0.5, np.random.default_rng(2)), graph=g2)
    assert again(x).shape == y.shape


def test_pruned_rows_are_the_kept_rows():
    torch.manual_seed(0)
    model, x = CifarResNet().eval(), torch.randn(1, 3, 8, 8)
    g = trace(model, x)
    grp = g.group_of("layer1.0.a.0")
    small = prune(model, x, {grp.id: [1, 4, 6]})
    torch.testing.assert_close(small.get_submodule("layer1.0.a.0").weight, model.layer1[0].a[0].weight[[1, 4, 6]])
    torch.testing.assert_close(small.get_submodule("layer1.0.b.0").weight, model.layer1[0].b[0].weight[:, [1, 4, 6]])
    conv = small.get_submodule("layer1.0.a.0")
    assert (conv.out_channels, small.get_submodule("layer1.0.a.1").num_features) == (3, 3)
    stage = g.group_of("stem.0")
    small = prune(model, x, {stage: [0, 2]})  # a ChannelGroup works as a key as well
    assert small.get_submodule("layer1.1.b.1").running_mean.shape == (2,)


def test_hard_coded_widths_and_chunks_are_rewritten():
    torch.manual_seed(0)
    model, x = TransformerNet().eval(), torch.randn(2, 3, 8, 8)
    g = trace(model, x)
    keep = {g.group_of("blocks.0.attn.qkv").id: [0, 3, 5], g.group_of("embed").id: list(range(0, 16, 2))}
    small = prune(model, x, keep, graph=g)
    assert small(x).shape == (2, 3)
    assert small.get_submodule("blocks.0.attn.qkv").weight.shape == (18, 8)
    assert small.get_submodule("blocks.0.n1").normalized_shape == (8,)
    assert small.pos.shape == (1, 4, 8)
    # the written-out attention reshapes to the hard-coded width 16: it now reads 6
    assert "6" in small.code


def test_refuses_fixed_groups_bad_indices_and_multiples():
    model, x = CifarResNet().eval(), torch.randn(1, 3, 8, 8)
    g = trace(model, x, round_to=4)
    out = g.group_of("fc")
    with pytest.raises(PruneError, match="model output"):
        prune(model, x, {out.id: [0, 1]}, graph=g)
    grp = g.group_of("layer1.0.a.0")
    with pytest.raises(PruneError, match="multiple of 4"):
        prune(model, x, {grp.id: [0, 1, 2, 3, 4, 5]}, graph=g)
    with pytest.raises(PruneError, match="at least 4"):
        prune(model, x, {grp.id: []}, graph=g)
    with pytest.raises(PruneError, match=r"\[0, 8\)"):
        prune(model, x, {grp.id: [0, 1, 2, 99]}, graph=g)
    with pytest.raises(PruneError, match="repeat"):
        prune(model, x, {grp.id: [0, 0, 1, 2]}, graph=g)
    with pytest.raises(PruneError, match="no channel group"):
        prune(model, x, {999: [0]}, graph=g)
    full = prune(model, x, {out.id: range(out.size)}, graph=g)  # keeping everything is always fine
    assert full(x).shape == (1, 5)


def test_keeps_dtype_and_device():
    model, x = CifarResNet().double().eval(), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    g = trace(model, x)
    small = prune(model, x, random_keep(g, 0.5, np.random.default_rng(0)), graph=g)
    assert all(p.dtype == torch.float64 for p in small.parameters())
    assert small(x).dtype == torch.float64


def test_training_mode_pruned_model_trains():
    model, x = CifarResNet().train(), torch.randn(4, 3, 8, 8)
    g = trace(model, x)
    small = prune(model, x, random_keep(g, 0.5, np.random.default_rng(0)), graph=g)
    assert small.training
    small(x).sum().backward()
    assert all(p.grad is not None for p in small.parameters())
