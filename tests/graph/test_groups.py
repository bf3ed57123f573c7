"""Group discovery: which channels are coupled, who produces them, and why a group is fixed."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

from reparam.graph import ChannelGraph, GraphTraceError, trace

from .nets import TRICKY, CifarResNet


def _trace(name: str) -> tuple[nn.Module, torch.Tensor, ChannelGraph]:
    cls, shape = TRICKY[name]
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(shape)
    return model, x, trace(model, x)


def _producers(g) -> set[str]:
    return {p.module for p in g.producers}


def test_residual_groups_couple_every_branch_and_shortcut():
    _, _, g = _trace("cifar_resnet")
    assert isinstance(g.nx, nx.DiGraph) and nx.is_directed_acyclic_graph(g.nx)
    stage1 = g.group_of("stem.0")
    assert _producers(stage1) == {"stem.0", "layer1.0.b.0", "layer1.1.b.0"}
    stage2 = g.group_of("layer2.0.short.0")
    assert _producers(stage2) == {"layer2.0.b.0", "layer2.0.short.0", "layer2.1.b.0"}
    assert stage2 is g.group_of("fc", dim="in")
    inner = g.group_of("layer1.0.a.0")
    assert _producers(inner) == {"layer1.0.a.0"} and inner.prunable and inner.size == 8
    assert {p.norm for p in inner.producers} == {"layer1.0.a.1"}
    assert {m.name for m in inner.consumers} == {"layer1.0.b.0.weight"}
    names = {(m.name, m.dim) for m in inner.members}
    assert {("layer1.0.a.0.weight", 0), ("layer1.0.a.1.running_var", 0), ("layer1.0.b.0.weight", 1)} <= names
    for m in inner.members:
        np.testing.assert_array_equal(np.sort(m.channels), np.arange(8))


def test_inputs_and_outputs_are_fixed_with_reasons():
    _, _, g = _trace("cifar_resnet")
    first, last = g.group_of("stem.0", dim="in"), g.group_of("fc")
    assert not first.prunable and "model input" in first.reason
    assert not last.prunable and "model output" in last.reason


def test_groups_are_deterministic_and_ordered():
    a, b = _trace("concat_residual")[2], _trace("concat_residual")[2]
    assert [(g.id, g.size, tuple(p.module for p in g.producers)) for g in a.groups] == [
        (g.id, g.size, tuple(p.module for p in g.producers)) for g in b.groups
    ]
    assert [g.id for g in a.groups] == list(range(len(a.groups)))


def test_concat_of_residual_branches_maps_both_halves_to_one_group():
    _, _, g = _trace("concat_residual")
    shared, inner = g.group_of("stem.0"), g.group_of("b2.0")
    assert shared is not inner and shared.prunable and inner.prunable
    assert _producers(shared) == {"stem.0", "b1.0", "c1.0", "mix.0"}
    # both halves of the concat are "branch + stem": stem channel i sits at positions i and 6 + i
    mix_in = next(m for m in shared.members if m.name == "mix.0.weight" and m.dim == 1)
    order = np.argsort(mix_in.positions)
    np.testing.assert_array_equal(mix_in.positions[order], np.arange(12))
    np.testing.assert_array_equal(mix_in.channels[order][:6], mix_in.channels[order][6:])
    assert {m.name for m in inner.consumers} == {"c1.0.weight"}
    assert shared.producers[0].offset == 0


def test_channel_shuffle_couples_the_two_halves():
    _, _, g = _trace("shuffle")
    prunable = [gr for gr in g.groups if gr.prunable]
    # every branch output channel i is interleaved with the passthrough channel i: shared groups
    assert any(len(_producers(gr)) > 1 for gr in prunable)
    assert all(gr.size >= 1 for gr in prunable)


def test_se_scale_joins_the_scaled_group_and_grouped_conv_prunes_uniformly():
    _, _, g = _trace("se_grouped")
    scaled = g.group_of("grouped.0")
    assert _producers(scaled) == {"grouped.0", "fc2"}
    # groups=2 over 8 channels: one logical channel is one position in each conv group
    assert scaled.size == 4
    rows = scaled.producers[0].member
    assert sorted(rows.positions.tolist()) == list(range(8))
    np.testing.assert_array_equal(rows.channels[:4], rows.channels[4:])


def test_shared_module_couples_both_calls():
    _, _, g = _trace("shared_conv")
    grp = g.group_of("shared")
    assert _producers(grp) == {"stem.0", "shared"} and grp.prunable


def test_flatten_linear_expands_each_channel_to_its_spatial_columns():
    _, _, g = _trace("flatten_linear")
    grp = g.group_of("body.0.0")
    fc1_in = next(m for m in grp.members if m.name == "fc1.weight" and m.dim == 1)
    assert len(fc1_in.positions) == 6 * 16
    np.testing.assert_array_equal(np.bincount(fc1_in.channels), np.full(6, 16))


def test_attention_heads_prune_head_width_uniformly():
    _, _, g = _trace("transformer")
    head = g.group_of("blocks.0.attn.qkv")
    assert head.prunable and head.size == 8  # 16 wide / 2 heads
    qkv_rows = head.producers[0].member
    assert len(qkv_rows.positions) == 48  # q, k, v of both heads
    resid = g.group_of("embed")
    assert resid.prunable and _producers(resid) >= {"embed", "blocks.0.attn.proj", "blocks.1.fc2"}
    assert g.group_of("blocks.0.fc1").size == 24


def test_round_to_sets_multiples():
    model, x = CifarResNet().eval(), torch.randn(1, 3, 8, 8)
    g = trace(model, x, round_to=4)
    for grp in g.groups:
        if grp.prunable:
            assert grp.multiple == 4 and grp.min_channels == 4


def test_unknown_op_fixes_its_channels_with_a_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), 1))

    g = trace(Odd().eval(), torch.randn(1, 3, 4, 4))
    grp = g.group_of("a")
    assert not grp.prunable and "cumsum" in grp.reason and "no channel rule" in grp.reason


def test_untraceable_model_names_the_module_and_the_fix():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gate = nn.Conv2d(3, 3, 1), Branchy()

        def forward(self, x):
            return self.gate(self.conv(x))

    with pytest.raises(GraphTraceError, match=r"'gate' \(Branchy\).*leaf_modules=\('gate',\)"):
        trace(Net(), torch.randn(1, 3, 4, 4))
    g = trace(Net(), torch.randn(1, 3, 4, 4), leaf_modules=("gate",))
    assert not g.group_of("conv").prunable


def test_multiple_inputs_and_outputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 5, 1), nn.Conv2d(2, 5, 1), nn.Conv2d(5, 4, 1)

        def forward(self, x, y):
            h = torch.relu(self.a(x) + self.b(y))
            return self.c(h), h.mean()

    g = trace(Two(), (torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)))
    assert _producers(g.group_of("a")) == {"a", "b"}
    assert g.group_of("a").prunable  # h.mean() reduces every dim: the scalar output pins nothing
    assert not g.group_of("c").prunable
