"""F.pad: a channel dim padded with zeros maps input channel k to output channel before + k, its pad
channels are prunable zeros (surgery shrinks the pad), and what cannot be exact is fixed with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reparam.graph import prune, trace

from .helpers import max_rel_err, random_keep, randomize_bn, zero_channels
from .nets import PadShortcut, conv_bn


def _rows(graph, group, module):
    """(weight rows, group channels) of `module` as a producer of `group`."""
    p = next(p for p in group.producers if p.module == module)
    return p.member.positions.tolist(), p.member.channels.tolist()


def _pad_args(gm):
    return [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is F.pad]


def test_option_a_groups_map_input_channel_k_to_before_plus_k():
    model = PadShortcut(width=4, pads=(2, 3)).eval()
    g = trace(model, torch.randn(2, 3, 6, 6))
    stream = g.group_of("stem.0")
    assert stream.prunable and stream.size == 4
    assert {p.module for p in stream.producers} == {"stem.0", "b.0"}
    rows, chans = _rows(g, stream, "b.0")
    assert rows == [2, 3, 4, 5] and chans == [0, 1, 2, 3]  # stem channel k is block channel 2 + k
    pads = [gr for gr in g.groups_of("b.0") if gr is not stream]
    assert len(pads) == 1 and pads[0].prunable and pads[0].size == 5
    assert _rows(g, pads[0], "b.0")[0] == [0, 1, 6, 7, 8]  # the zero channels, owned by the branch alone
    assert [p.module for p in pads[0].producers] == ["b.0"]


@pytest.mark.parametrize("seed", range(4))
def test_option_a_random_keep_sets_shrink_the_pad(seed):
    model = PadShortcut(width=4, pads=(2, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    g = trace(model, x)
    stream, pad = g.group_of("stem.0"), next(gr for gr in g.groups_of("b.0") if gr.size == 5)
    keep = random_keep(g, [0.3, 0.5, 0.7, 0.9][seed], np.random.default_rng(seed))
    keep[pad.id] = [0, 4] if seed % 2 else [2, 3]  # drop pad channels on one or both sides
    small = prune(model, x, keep, graph=g)
    assert small(x).shape == model(x).shape
    before, after = (1, 1) if seed % 2 else (0, 2)
    assert _pad_args(small) == [(0, 0, 0, 0, before, after), (1, 0, 0, 1)]  # spatial pad untouched
    assert small.get_submodule("b.0").out_channels == len(keep.get(stream.id, range(4))) + 2


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(
    width=st.integers(2, 5),
    pads=st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
    spatial=st.tuples(*[st.integers(0, 2)] * 4),
    seed=st.integers(0, 2**16),
)
def test_option_a_exact_float64(width, pads, spatial, seed):
    if width + min(pads[0], 0) + min(pads[1], 0) < 1 or width + sum(pads) < 2:
        return
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PadShortcut(width, pads, spatial).double().eval()
    randomize_bn(model, gen)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    g = trace(model, x)
    assert all(gr.prunable for gr in g.groups if gr.producers and gr.producers[0].module != "head")
    shape = model(x).shape
    assert prune(model, x, random_keep(g, 0.5, np.random.default_rng(seed)), graph=g)(x).shape == shape
    keep = zero_channels(model, g, np.random.default_rng(seed))
    y = model(x)
    assert max_rel_err(prune(model, x, keep, graph=g)(x), y) <= 1e-10


def test_real_option_a_resnet20_float64():
    models = pytest.importorskip("apps.engine.models")
    gen = torch.Generator().manual_seed(0)
    model = models.CifarResNet(20, 10, "A").double().eval()
    randomize_bn(model, gen)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    g = trace(model, x)
    assert [gr.id for gr in g.groups if not gr.prunable] == [0, len(g.groups) - 1]  # the input and the logits
    # the stage-1 stream runs through every stage; each pad adds a stream group of its own zeros
    s1, s2, s3 = (g.group_of(f"layer{i}.2.conv2") for i in (1, 2, 3))
    assert (s1.size, s2.size, s3.size) == (16, 16, 32)
    assert g.groups_of("layer2.0.conv2") == [s2, s1] and g.groups_of("layer3.0.conv2") == [s3, s1, s2]
    assert _rows(g, s1, "layer2.0.conv2")[0] == list(range(8, 24))
    assert _rows(g, s1, "layer3.0.conv2")[0] == list(range(24, 40))
    assert _rows(g, s2, "layer3.0.conv2")[0] == [*range(16, 24), *range(40, 48)]
    for seed in range(2):
        keep = random_keep(g, 0.4 + 0.3 * seed, np.random.default_rng(seed))
        assert keep.keys() == {gr.id for gr in g.groups if gr.prunable}
        assert prune(model, x, keep, graph=g)(x).shape == (2, 10)
    keep = zero_channels(model, g, np.random.default_rng(0))
    assert {s1.id, s2.id, s3.id} <= keep.keys()
    y = model(x)
    assert max_rel_err(prune(model, x, keep, graph=g)(x), y) <= 1e-10


class PadNet(nn.Module):
    """conv-BN, a pad along `dims` of the channel dim (1-D signal: pad[-4:-2] pads the channels)."""

    def __init__(self, pad: tuple[int, ...], mode: str = "constant", value: float | None = None):
        super().__init__()
        self.pad, self.mode, self.value = pad, mode, value
        self.a = nn.Conv1d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Conv1d(4 + pad[2] + pad[3], 2, 1)

    def forward(self, x):
        y = self.bn(self.a(x))
        y = F.pad(y, self.pad, self.mode) if self.value is None else F.pad(y, self.pad, value=self.value)
        return self.head(y).mean(2)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_constant_mode_along_channels_is_fixed_with_a_reason(mode):
    model = PadNet((1, 1, 1, 1), mode).eval()
    x = torch.randn(2, 3, 5)
    g = trace(model, x)
    gr = g.group_of("a")
    assert not gr.prunable and f"mode '{mode}'" in gr.reason and "copies channels of dim 1" in gr.reason
    # along the signal only, the channels stay prunable and exact
    model = PadNet((1, 2, 0, 0), mode).double().eval()
    randomize_bn(model, torch.Generator().manual_seed(0))
    g = trace(model, x.double())
    keep = zero_channels(model, g, np.random.default_rng(0))
    assert keep and max_rel_err(prune(model, x.double(), keep, graph=g)(x.double()), model(x.double())) <= 1e-10


def test_nonzero_value_fixes_only_the_pad_channels():
    model = PadNet((0, 0, 1, 2), value=0.5).double().eval()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    g = trace(model, x)
    passed = g.group_of("a")
    assert passed.prunable and passed.size == 4
    fixed = [gr for gr in g.groups_of("head", "in") if gr is not passed]
    assert len(fixed) == 1 and fixed[0].size == 3 and not fixed[0].prunable
    assert "constant 0.5, which is not zero" in fixed[0].reason
    randomize_bn(model, torch.Generator().manual_seed(1))
    keep = zero_channels(model, g, np.random.default_rng(1))
    small = prune(model, x, keep, graph=g)
    assert _pad_args(small) == [(0, 0, 1, 2)]
    assert max_rel_err(small(x), model(x)) <= 1e-10


def test_zero_pad_channels_without_a_producer_stay():
    """Pad channels straight into a conv: no layer produces them, so they are not a pruning target."""
    model = PadNet((0, 0, 1, 2)).eval()
    g = trace(model, torch.randn(2, 3, 5))
    assert g.group_of("a").prunable
    fixed = [gr for gr in g.groups_of("head", "in") if gr is not g.group_of("a")]
    assert len(fixed) == 1 and not fixed[0].prunable and "no convolution" in fixed[0].reason


def test_computed_channel_pad_is_fixed():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 4, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.head(F.pad(y, (0, 0, 0, 0, 0, y.shape[1])))

    g = trace(Computed().eval(), torch.randn(1, 3, 4, 4))
    gr = g.group_of("a.0")
    assert not gr.prunable and "is computed" in gr.reason


@pytest.mark.parametrize(
    "pad",
    [
        nn.ZeroPad2d((1, 0, 2, 1)),
        nn.ReflectionPad2d(1),
        nn.ReplicationPad2d((0, 1, 1, 0)),
        nn.ConstantPad2d((1, 1, 0, 2), 0.0),
        nn.CircularPad2d(1),
    ],
)
def test_pad_modules_pass_channels_and_prune_exactly(pad):
    """A pad module on the spatial dims leaves the channels coupled conv → pad → PReLU(C) → conv, and
    pruning zeroed channels through it (PReLU slopes shrink with them) is exact."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 6), pad, nn.PReLU(6), nn.Conv2d(6, 4, 3, padding=0)).double().eval()
    randomize_bn(model, gen)
    with torch.no_grad():
        model[2].weight.uniform_(-1, 1, generator=gen)
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64)
    g = trace(model, x)
    group = g.group_of("0.0")
    assert group.prunable and group.size == 6
    assert "2.weight" in {m.name for m in group.members}
    keep = zero_channels(model, g, np.random.default_rng(0))
    y = model(x)
    small = prune(model, x, keep, graph=g)
    assert small.get_submodule("2").weight.shape[0] == len(keep[group.id]) < 6
    assert small.get_submodule("2").num_parameters == len(keep[group.id])
    assert max_rel_err(small(x), y) <= 1e-10
