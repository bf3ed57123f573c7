"""`reparam.merge`: blocks merged, conv/linear → BN pairs folded by dataflow, everything else left exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import reparam
from reparam.ops import MergeError
from reparam.testing import randomise_norms
from reparam.verify import relative_error, verify_equivalence


def _norms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    randomise_norms(model, seed)
    return model.eval()


class Mixed(nn.Module):
    """Blocks, plain conv-BN pairs, a grouped ConvTranspose-BN and a Linear-BN1d head; the norms are
    registered before their layers (registration order is not dataflow)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.rep = reparam.RepVGGBlock(6, 6, 3, act=nn.ReLU())
        self.dbb = reparam.DiverseBranchBlock(6, 8, 3, stride=2, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)
        self.bn_head = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.rep(torch.relu(self.bn1(self.conv1(x))))
        x = self.bn_up(self.up(self.dbb(x)))
        return self.bn_head(self.head(x.mean((2, 3))))


def test_mixed_network_merges_exactly():
    model = _prepared(Mixed().double())
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    merged = reparam.merge(model, x, verify=True, rtol=1e-10)
    report = merged.merge_report
    assert sorted(report.blocks) == ["dbb", "rep"]
    assert sorted(report.folded) == [("conv1", "bn1"), ("head", "bn_head"), ("up", "bn_up")]
    assert _norms(merged) == [] and report.max_rel_error <= 1e-10
    assert not any(isinstance(m, reparam.ops.MergeableBlock) for m in merged.modules())
    assert isinstance(merged.bn1, nn.Identity) and isinstance(merged.conv1, nn.Conv2d)  # names stay stable
    assert all(p.dtype == torch.float64 for p in merged.parameters())
    assert not merged.training and model.training is False


def test_merging_twice_is_a_no_op():
    model = _prepared(Mixed())
    once = reparam.merge(model, (2, 3, 6, 6))
    twice = reparam.merge(once, (2, 3, 6, 6))
    assert twice.merge_report.blocks == [] and twice.merge_report.folded == []
    assert once.state_dict().keys() == twice.state_dict().keys()
    assert all(torch.equal(v, twice.state_dict()[k]) for k, v in once.state_dict().items())


def test_original_model_is_untouched_and_train_mode_is_fine():
    model = _prepared(Mixed()).train()
    before = copy.deepcopy(model.state_dict())
    merged = reparam.merge(model)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative_error(model.eval()(x), merged(x)) <= 1e-5


def test_linear_bn_needs_example_inputs():
    """Without shapes, Linear → BatchNorm1d is not folded (a (N, L, C) output would normalise L)."""
    merged = reparam.merge(_prepared(Mixed()))
    assert ("head", "bn_head") not in merged.merge_report.folded
    assert any("bn_head" in s and "example_inputs" in s for s in merged.merge_report.skipped)


class PreNorm(nn.Module):
    """BN before a padded conv: folding it as a post-norm (or into the conv) would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn(x)) + self.conv(x)


def test_pre_norm_is_not_folded():
    model = _prepared(PreNorm())
    x = torch.randn(1, 4, 5, 5)
    merged = reparam.merge(model, x, verify=True)
    assert _norms(merged) == ["bn"] and merged.merge_report.folded == []
    assert any(s.startswith("bn left alone") for s in merged.merge_report.skipped)


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class WeightNormed(nn.Module):
    """A conv whose weight a parametrization computes: an in-place write into it would be lost."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 3, padding=1))
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


class SharedWeight(nn.Module):
    """Two convs with one weight tensor: folding one BN into it would change the other conv too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.other = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.other.weight = self.conv.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


@pytest.mark.parametrize(
    "cls, reason",
    [
        (TwoUsers, "2 users"),
        (SharedConv, "called more than once"),
        (WeightNormed, "computed by a parametrization"),
        (SharedWeight, "weight is shared (conv.weight, other.weight)"),
    ],
)
def test_layers_with_other_users_are_left_alone(cls, reason):
    model = _prepared(cls())
    merged = reparam.merge(model, torch.randn(1, 3, 4, 4), verify=True)
    assert _norms(merged) == ["bn"]
    assert any(reason in s for s in merged.merge_report.skipped)


def test_norm_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    merged = reparam.merge(model, torch.randn(2, 3, 4, 4), verify=True)
    assert _norms(merged) == ["1"] and "track_running_stats=False" in merged.merge_report.skipped[0]


def test_torchvision_resnet18_float32():
    torch.manual_seed(0)
    model = _prepared(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    merged = reparam.merge(model, x, verify=True, rtol=1e-5)
    assert _norms(merged) == [] and len(merged.merge_report.folded) == 20
    assert merged.merge_report.max_rel_error <= 1e-5


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx; its children are still folded one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.block = reparam.ACBlock(4, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.block(self.body(x))


def test_untraceable_model_warns_and_still_merges():
    model = _prepared(Untraceable())
    with pytest.warns(UserWarning, match="torch.fx cannot trace"):
        merged = reparam.merge(model, torch.randn(1, 3, 6, 6), verify=True)
    assert merged.merge_report.blocks == ["block"]
    assert merged.merge_report.folded == [("body.0", "body.1")]


def test_a_block_at_the_root_merges_to_its_conv():
    block = _prepared(reparam.MobileOneBlock(3, 3, 3, num_branches=2))
    merged = reparam.merge(block, (1, 3, 5, 5), verify=True)
    assert isinstance(merged, nn.Conv2d)


def test_block_without_running_stats_is_refused_with_its_path():
    model = nn.Sequential(
        nn.Identity(), reparam.RepVGGBlock(2, 2, 3, norm=lambda c: nn.BatchNorm2d(c, track_running_stats=False))
    )
    with pytest.raises(MergeError, match=r"^1: .*RepVGGBlock\.conv_kxk\.bn"):
        reparam.merge(model)


def test_verify_refuses_a_mismatch():
    a, b = nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(MergeError, match="max relative error"):
        verify_equivalence(a, b, x)
    b.load_state_dict(a.state_dict())
    assert verify_equivalence(a, b, x) == 0.0
    with torch.no_grad():
        b.bias.fill_(float("nan"))
    with pytest.raises(MergeError):
        verify_equivalence(a, b, x)


def test_verify_needs_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        reparam.merge(nn.Conv2d(1, 1, 1), verify=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_is_kept():
    model = _prepared(Mixed()).cuda()
    merged = reparam.merge(model, (2, 3, 6, 6), verify=True)
    assert all(p.is_cuda for p in merged.parameters())


def test_frozen_batch_norm_is_folded():
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(4)
    for name in ("weight", "bias", "running_mean"):
        getattr(frozen, name).normal_()
    frozen.running_var.uniform_(0.1, 2)
    model = nn.Sequential(nn.ConvTranspose2d(2, 4, 3, stride=2), frozen).double()
    merged = reparam.merge(model, torch.randn(2, 2, 3, 3, dtype=torch.float64), verify=True, rtol=1e-10)
    assert merged.merge_report.folded == [("0", "1")] and isinstance(merged[1], nn.Identity)


def test_ops_demo_prints_exact_merges(capsys):
    from reparam.demo import main

    main()
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.lstrip().startswith(("RepVGG", "DBB"))]
    assert len(rows) == 2
    errors = [float(row[-1]) for row in rows]
    assert all(err <= 1e-5 for err in errors)
    assert all(int(row[-2]) < int(row[-3]) for row in rows)  # fewer convolutions once merged


def test_an_unregistered_block_is_left_unmerged_and_merge_says_so():
    class Forgotten(reparam.ops.MergeableBlock):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x))

        def merged(self):
            raise AssertionError("merge must not call an unregistered block's merged()")

    model = nn.Sequential(nn.Conv2d(3, 2, 1), Forgotten()).eval()
    with pytest.warns(UserWarning, match=r"1 \(Forgotten\).*not registered.*register_block"):
        merged = reparam.merge(model)
    assert merged.merge_report.blocks == [] and "register_block" in merged.merge_report.skipped[0]
