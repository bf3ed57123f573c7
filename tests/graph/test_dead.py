"""Dead (BatchNorm-silenced) channels fold into consumer biases exactly, or are refused with a reason."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reparam.graph import fold_dead_channels, trace

from .helpers import max_rel_err, randomize_bn


class Unpadded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 5, 3, padding=0, bias=False)  # unpadded: sees the constant everywhere
        self.c = nn.Conv2d(6, 4, 1)
        self.bn2 = nn.BatchNorm2d(5)
        self.pad = nn.Conv2d(5, 4, 3, padding=1)  # padded: sees zeros at the borders
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.sigmoid(self.bn(self.a(x)))  # f(beta) != 0: the constant is not zero
        y = F.relu(self.bn2(self.b(h)))
        z = self.pad(y).mean((2, 3))
        return self.fc(torch.cat([z, self.c(h).mean((2, 3))], 1))


def test_folds_unpadded_consumers_and_refuses_padded_ones():
    torch.manual_seed(0)
    model = Unpadded().double().eval()
    randomize_bn(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.bn.weight[[1, 4]] = 0
        model.bn2.weight[[0, 2]] = 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    g = trace(model, x)
    report = fold_dead_channels(model, x, graph=g)
    assert report.removed == {g.group_of("a").id: [1, 4]}
    assert "padding" in report.refused[g.group_of("b").id] or "unpadded" in report.refused[g.group_of("b").id]
    assert report.model.get_submodule("a").weight.shape[0] == 4
    assert report.model.get_submodule("b").weight.shape[1] == 4
    assert max_rel_err(report.model(x), model(x)) <= 1e-10
    assert model.a.weight.shape[0] == 6  # original untouched


def test_residual_groups_are_refused():
    from .nets import CifarResNet

    model = CifarResNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[0] = 0
    x = torch.randn(1, 3, 8, 8)
    g = trace(model, x)
    report = fold_dead_channels(model, x, graph=g)
    assert "several producers" in report.refused[g.group_of("stem.0").id]
    # a block's inner channel goes into a padded 3x3 conv: refused, nothing silently changed
    assert g.group_of("layer1.0.a.0").id in report.refused
    assert max_rel_err(report.model(x), model(x)) <= 1e-5


class SharedConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.s = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = F.relu(self.bn(self.a(x)))
        return self.s(h) + self.s(torch.tanh(h))


def test_shared_consumer_is_refused():
    model = SharedConsumer().eval()
    with torch.no_grad():
        model.bn.weight[2] = 0
        model.bn.bias[2] = 0.5
    report = fold_dead_channels(model, torch.randn(1, 3, 5, 5))
    assert not report.removed and "more than once" in list(report.refused.values())[0]


class MixingAfterBN(nn.Module):
    """A softmax over channels between the BatchNorm and its consumer: the constant meets the live
    channels there, so it is no bias."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.b(torch.softmax(self.bn(self.a(x)), dim=1)).mean((2, 3))


class LinearOverLength(nn.Module):
    """BatchNorm1d over channels, then a Linear over the length dim (L == C): it carries the channels
    through to a 1x1 conv and reads none of them, so its bias cannot hold their constant."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv1d(3, 6, 1, bias=False), nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 2)
        self.b = nn.Conv1d(6, 4, 1)

    def forward(self, x):
        return self.b(self.fc(torch.relu(self.bn(self.a(x))))).mean(2)


def test_channel_mixing_ops_and_consumers_of_other_dims_are_refused():
    for model, x, where in (
        (MixingAfterBN(), torch.randn(2, 3, 6, 6, dtype=torch.float64), "softmax"),
        (LinearOverLength(), torch.randn(2, 3, 6, dtype=torch.float64), "fc"),
    ):
        torch.manual_seed(0)
        model = model.double().eval()
        randomize_bn(model, torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.bn.weight[[1, 4]] = 0
        report = fold_dead_channels(model, x)
        assert not report.removed and len(report.refused) == 1, report
        assert where in next(iter(report.refused.values()))
        assert max_rel_err(model(x), report.model(x)) <= 1e-12  # nothing folded: the same function
