"""Exact conversion: fold BN, merge compactors, remove masked channels, verify (float64, rel <= 1e-10)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from apps.engine.models import CifarResNet, DigitsResNet
from apps.resrep import ConversionError, ResRep, ResRepConfig
from apps.resrep import convert as convert_module
from apps.resrep.method import Compacted
from reparam.ops.blocks import Compactor


def randomise(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random BN statistics and affine (γ of both signs, σ² over decades)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
            m.running_var.copy_(10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2))
            m.weight.data.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
            m.bias.data.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
    return model.eval()


def force_masks(rr: ResRep, gen: torch.Generator, keep_fraction: float) -> None:
    """Random keep-sets (at least one channel per group) and random, non-identity compactors."""
    masks = {}
    for g in rr.groups:
        keep = torch.rand(g.size, generator=gen) < keep_fraction
        keep[torch.randint(g.size, (1,), generator=gen)] = True
        masks[g.id] = keep
    rr.set_masks(masks)
    with torch.no_grad():
        for _, c in rr.compactors():
            c.weight.add_(0.3 * torch.randn(c.weight.shape, generator=gen, dtype=c.weight.dtype))


def masked_reference(rr: ResRep) -> nn.Module:
    ref = copy.deepcopy(rr.model).eval()
    with torch.no_grad():
        for site in rr.sites:
            c = ref.get_submodule(site.host).compactor
            c.weight[~rr.row_keep(site)] = 0
    return ref


def check_exact(model: nn.Module, x: torch.Tensor, keep_fraction: float = 0.5, seed: int = 0):
    """Convert with forced masks; the deploy model must equal the masked compactor model to 1e-10 of
    max|y| (the conversion's own check runs in float64 whatever the dtype); a float32 model only differs
    by its rounding, here under 1e-4 (deep nets with randomised statistics reach ~1.4e-5)."""
    gen = torch.Generator().manual_seed(seed)
    model = randomise(model.double(), gen).to(x.dtype)
    tolerance = 1e-10 if x.dtype == torch.float64 else 1e-4
    rr = ResRep(model, x, ResRepConfig(flops_target=0.99))
    force_masks(rr, gen, keep_fraction)
    with pytest.warns(RuntimeWarning, match="had not decayed"):
        deploy, report = rr.convert()
    with torch.no_grad():
        y, y_hat = masked_reference(rr)(x), deploy(x)
    assert float((y - y_hat).abs().max() / y.abs().max()) <= tolerance
    assert report.max_rel_error <= 1e-10 == report.tolerance and report.largest_removed_norm > 0
    assert report.max_rel_error_native <= tolerance
    assert not any(isinstance(m, (nn.BatchNorm2d, Compacted, Compactor)) for m in deploy.modules())
    names = {n for n, _ in deploy.named_modules()}
    assert set(report.widths_after) <= names  # the original module names, narrower
    assert report.widths_after == rr.widths() and report.widths_before == rr.widths(masked=False)
    assert report.macs_after == rr.macs() < report.macs_before == rr.base_macs
    assert report.params_after < report.params_before
    return rr, deploy, report


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet56_converts_exactly(shortcut):
    _, _, report = check_exact(CifarResNet(56, shortcut=shortcut), torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert report.widths_after["layer1.0.conv1"] < 16  # internal layers
    if shortcut == "B":  # residual-coupled groups too: stem and stage streams narrower than 16/64
        assert report.widths_after["conv1"] < 16 and report.widths_after["layer3.8.conv2"] < 64


def test_torchvision_resnet18_converts_exactly():
    check_exact(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_torchvision_mobilenet_v2_converts_exactly():
    # float32: float64 depthwise convolutions are very slow on the CPU
    rr, _, _ = check_exact(torchvision.models.mobilenet_v2(num_classes=10), torch.randn(1, 3, 16, 16))
    assert rr.sites  # the stream groups of the inverted residuals carry compactors


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    keep=st.floats(0.05, 1.0),
    width=st.integers(2, 6),
    batch=st.integers(1, 3),
    size=st.integers(4, 9),
)
def test_conversion_is_exact_for_random_masks_and_statistics(seed, keep, width, batch, size):
    torch.manual_seed(seed)
    x = torch.randn(batch, 1, size, size, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    model = randomise(DigitsResNet(width=width).double(), gen)
    rr = ResRep(model, x, ResRepConfig(flops_target=0.99))
    force_masks(rr, gen, keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        deploy, report = rr.convert()
    assert report.max_rel_error <= 1e-10
    with torch.no_grad():
        y, y_hat = masked_reference(rr)(x), deploy(x)
    assert float((y - y_hat).abs().max()) <= 1e-10 * float(y.abs().max())


def test_decayed_rows_convert_without_warning_and_match_the_trained_model():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    rr = ResRep(randomise(DigitsResNet(width=8).double(), gen), x, ResRepConfig(flops_target=0.99))
    force_masks(rr, gen, 0.5)
    with torch.no_grad():  # what training achieves: masked rows at ~0
        for site, c in rr.compactors():
            c.weight[~rr.row_keep(site)] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy, report = rr.convert()
    assert report.largest_removed_norm == 0.0 and report.max_rel_error_vs_trained <= 1e-10
    assert report.as_dict()["macs_reduction"] == pytest.approx(1 - report.macs_after / report.macs_before)


def test_float32_conversion_within_tolerance():
    gen = torch.Generator().manual_seed(2)
    model = randomise(DigitsResNet(width=8).double(), gen).float()
    x = torch.randn(4, 1, 8, 8)
    rr = ResRep(model, x, ResRepConfig(flops_target=0.99))
    force_masks(rr, gen, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        deploy, report = rr.convert()
    assert report.tolerance == 1e-10 and report.max_rel_error <= 1e-10  # proven in float64
    assert report.max_rel_error_native <= 1e-5  # the float32 deploy model's rounding
    assert next(deploy.parameters()).dtype == torch.float32


def test_a_float32_error_above_its_bound_is_refused_or_warned(monkeypatch):
    """The float32 check beside the float64 proof: an error over the bound (here lowered below the
    rounding every float32 model has) is refused, naming float32, or warned with on_inexact='warn'."""
    monkeypatch.setattr(convert_module, "FLOAT32_TOLERANCE", 1e-12)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 8, 8)
    for on_inexact in ("raise", "warn"):
        rr = ResRep(
            randomise(DigitsResNet(width=8).double(), gen).float(),
            x,
            ResRepConfig(flops_target=0.99, on_inexact=on_inexact),
        )
        force_masks(rr, gen, 0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            if on_inexact == "raise":
                with pytest.raises(ConversionError, match="exact in float64 .* but not in float32"):
                    rr.convert()
            else:
                _, report = rr.convert()
                assert report.max_rel_error <= 1e-10 and report.max_rel_error_native > 1e-12
                assert any("not in float32" in str(w.message) for w in caught)


class PostActivationBN(nn.Module):
    """conv → ReLU → BN → conv: a zero channel leaves the BN as its shift, so removing it is not exact."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn(torch.relu(self.conv1(x))))


def test_inexact_conversion_is_refused_or_warned():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    model = randomise(PostActivationBN().double(), gen)
    rr = ResRep(model, x, ResRepConfig(flops_target=0.9))
    force_masks(rr, gen, 0.5)
    assert any(not m.all() for m in rr.masks.values())
    with pytest.raises(ConversionError, match="is not exact: max relative error .* the norm layers \\['bn'\\]"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rr.convert()
    loud = ResRep(model, x, ResRepConfig(flops_target=0.9, on_inexact="warn"))
    loud.set_masks(rr.masks)
    with (
        pytest.warns(RuntimeWarning, match="had not decayed"),
        pytest.warns(RuntimeWarning, match="not exact: max relative error"),
    ):
        _, report = loud.convert()
    assert report.max_rel_error > report.tolerance
