"""A1–A7: folding batch norms and per-channel affines into convolutions and linear layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from reparam.ops import (
    ConvGeometry,
    MergeError,
    NormStats,
    bn_scale_shift,
    compose_affine,
    conv_nd,
    fold_norm_affine,
    fuse_bn,
    fuse_bn_transposed,
    fuse_pre_bn,
    geometry_from_module,
    norm_stats_from_module,
    propagate_bias,
    scale_in,
    scale_out,
)
from reparam.testing import bn_module, bn_stats, conv_layers, divisors, small_inputs, tensors
from reparam.verify import relative_error

pytestmark = pytest.mark.usefixtures("array_library")  # every property on every array library

TOL = 1e-10


@given(st.data())
@torch.no_grad()
def test_fuse_bn_into_conv(data):
    g, k, b = data.draw(conv_layers())
    stats = data.draw(bn_stats(k.shape[0]))
    x = data.draw(small_inputs(k.shape[1] * g.groups, g))
    k2, b2 = fuse_bn(k, b, stats)
    assert relative_error(bn_module(stats, g.ndim)(conv_nd(x, k, b, g)), conv_nd(x, k2, b2, g)) <= TOL


@given(st.data())
@torch.no_grad()
def test_fuse_bn_into_linear(data):
    i, o = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    w, x = data.draw(tensors((o, i))), data.draw(tensors((3, i)))
    b = data.draw(st.one_of(st.none(), tensors((o,))))
    stats = data.draw(bn_stats(o))
    w2, b2 = fuse_bn(w, b, stats)
    assert relative_error(bn_module(stats, 1)(F.linear(x, w, b)), F.linear(x, w2, b2)) <= TOL


@given(st.data())
@torch.no_grad()
def test_fuse_bn_transposed_with_groups(data):
    n = data.draw(st.integers(1, 3))
    groups = data.draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 3))
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    s = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[n](
        cin, cout, k, s, groups=groups, bias=data.draw(st.booleans()), dtype=torch.float64
    )
    g = geometry_from_module(conv)
    stats = data.draw(bn_stats(cout))
    x = data.draw(tensors((2, cin) + tuple(data.draw(st.integers(1, 3)) for _ in range(n))))
    w2, b2 = fuse_bn_transposed(conv.weight, conv.bias, stats, groups)
    assert relative_error(bn_module(stats, n)(conv(x)), conv_nd(x, w2, b2, g)) <= TOL


@given(st.data())
@torch.no_grad()
def test_fuse_pre_bn_into_unpadded_or_mode_padded_conv(data):
    padding = data.draw(st.sampled_from(["none", "any"]))
    modes = ("zeros", "reflect", "replicate", "circular") if padding == "none" else ("reflect", "replicate", "circular")
    g, k, b = data.draw(conv_layers(padding=padding, padding_modes=modes))
    cin = k.shape[1] * g.groups
    stats = data.draw(bn_stats(cin))
    x = data.draw(small_inputs(cin, g))
    k2, b2 = fuse_pre_bn(k, b, stats, g)
    assert relative_error(conv_nd(bn_module(stats, g.ndim)(x), k, b, g), conv_nd(x, k2, b2, g)) <= TOL


@given(st.data())
@torch.no_grad()
def test_fuse_pre_bn_into_linear(data):
    i, o = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    w, x = data.draw(tensors((o, i))), data.draw(tensors((4, i)))
    b = data.draw(st.one_of(st.none(), tensors((o,))))
    stats = data.draw(bn_stats(i))
    w2, b2 = fuse_pre_bn(w, b, stats, None)
    assert relative_error(F.linear(bn_module(stats, 1)(x), w, b), F.linear(x, w2, b2)) <= TOL


@given(st.data())
@torch.no_grad()
def test_pre_bn_and_bias_propagation_refuse_zero_padding(data):
    g, k, b = data.draw(conv_layers(padding="any", padding_modes=("zeros",)))
    cin = k.shape[1] * g.groups
    stats = data.draw(bn_stats(cin))
    if g.pads:
        with pytest.raises(MergeError, match="zero-pads"):
            fuse_pre_bn(k, b, stats, g)
        with pytest.raises(MergeError, match="zero-pads"):
            propagate_bias(k, b, stats.mean, g)
    else:
        fuse_pre_bn(k, b, stats, g)


def test_pre_bn_into_zero_padded_conv_really_differs_at_the_border():
    """The refusal is warranted: folding anyway is wrong exactly on the border."""
    torch.manual_seed(0)
    g = ConvGeometry.create(3, padding=1)
    k, x = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randn(1, 2, 5, 5, dtype=torch.float64)
    stats = NormStats(torch.randn(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), None, None, 1e-5)
    k2, b2 = fuse_pre_bn(k, None, stats, g.replace(padding=((0, 0), (0, 0))))
    delta = (conv_nd(bn_module(stats, 2)(x), k, None, g) - conv_nd(x, k2, b2, g)).abs()
    assert delta[..., 1:-1, 1:-1].max() < 1e-12 and delta.max() > 1e-3


@given(st.data())
@torch.no_grad()
def test_compose_affine_is_two_norms(data):
    c = data.draw(st.integers(1, 5))
    st1, st2 = data.draw(bn_stats(c)), data.draw(bn_stats(c))
    x = data.draw(tensors((3, c, 2)))
    s, t = compose_affine(*bn_scale_shift(st1), *bn_scale_shift(st2))
    y = bn_module(st2, 1)(bn_module(st1, 1)(x))
    assert relative_error(y, s[:, None] * x + t[:, None]) <= TOL


@given(st.data())
@torch.no_grad()
def test_scale_out_and_scale_in(data):
    """A pure per-channel scale folds on either side of any conv, zero padding included."""
    g, k, b = data.draw(conv_layers())
    cin, cout = k.shape[1] * g.groups, k.shape[0]
    a_in, a_out = data.draw(tensors((cin,))), data.draw(tensors((cout,)))
    x = data.draw(small_inputs(cin, g))
    view = (1, -1) + (1,) * g.ndim
    k2, b2 = scale_out(k, b, a_out)
    assert relative_error(a_out.reshape(view) * conv_nd(x, k, b, g), conv_nd(x, k2, b2, g)) <= TOL
    assert (
        relative_error(conv_nd(a_in.reshape(view) * x, k, b, g), conv_nd(x, scale_in(k, a_in, g.groups), b, g)) <= TOL
    )


@given(st.data())
@torch.no_grad()
def test_propagate_bias_through_unpadded_conv(data):
    g, k, b = data.draw(conv_layers(padding="none"))
    cin = k.shape[1] * g.groups
    shift = data.draw(tensors((cin,)))
    x = data.draw(small_inputs(cin, g))
    b2 = propagate_bias(k, b, shift, g)
    assert relative_error(conv_nd(x + shift.reshape((1, -1) + (1,) * g.ndim), k, b, g), conv_nd(x, k, b2, g)) <= TOL


@given(st.data())
@torch.no_grad()
def test_fold_layer_norm_affine_into_linear(data):
    c, o = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    ln = nn.LayerNorm(c, dtype=torch.float64)
    ln.weight.copy_(data.draw(tensors((c,))))
    ln.bias.copy_(data.draw(tensors((c,))))
    w, b, x = data.draw(tensors((o, c))), data.draw(st.one_of(st.none(), tensors((o,)))), data.draw(tensors((2, 3, c)))
    w2, b2 = fold_norm_affine(w, b, ln.weight, ln.bias)
    plain = F.layer_norm(x, (c,), eps=ln.eps)
    assert relative_error(F.linear(ln(x), w, b), F.linear(plain, w2, b2)) <= TOL


@given(st.data())
@torch.no_grad()
def test_fold_group_norm_affine_into_grouped_conv(data):
    cin = data.draw(st.sampled_from([2, 4, 6]))
    g, k, b = data.draw(conv_layers(in_channels=cin, padding="none"))
    gn = nn.GroupNorm(data.draw(st.sampled_from(divisors(cin))), cin, dtype=torch.float64)
    gn.weight.copy_(data.draw(tensors((cin,))))
    gn.bias.copy_(data.draw(tensors((cin,))))
    x = data.draw(small_inputs(cin, g))
    assume(x[0, 0].numel() * cin // gn.num_groups > 1)  # a group of one value has no variance
    k2, b2 = fold_norm_affine(k, b, gn.weight, gn.bias, g)
    plain = F.group_norm(x, gn.num_groups, eps=gn.eps)
    assert relative_error(conv_nd(gn(x), k, b, g), conv_nd(plain, k2, b2, g)) <= TOL


def _filled(bn: nn.Module, c: int) -> nn.Module:
    gen = torch.Generator().manual_seed(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))
    return bn.eval()


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.BatchNorm1d(3),
        lambda: nn.BatchNorm2d(3),
        lambda: nn.BatchNorm3d(3),
        lambda: nn.SyncBatchNorm(3),
        lambda: nn.BatchNorm2d(3, affine=False),
        lambda: FrozenBatchNorm2d(3, eps=1e-3),
    ],
)
@torch.no_grad()
def test_norm_stats_from_every_batch_norm(make):
    bn = _filled(make(), 3)
    s, t = bn_scale_shift(norm_stats_from_module(bn))
    x = torch.randn(2, 3, 2, 2)
    ref = F.batch_norm(
        x, bn.running_mean, bn.running_var, getattr(bn, "weight", None), getattr(bn, "bias", None), False, 0.0, bn.eps
    )
    assert relative_error(ref, s[:, None, None] * x + t[:, None, None]) <= 1e-6
    if isinstance(bn, (nn.BatchNorm2d, FrozenBatchNorm2d)):
        assert relative_error(bn(x), ref) <= 1e-6


def test_norm_stats_refuses_batch_statistics():
    with pytest.raises(MergeError, match="training mode.*eval"):
        norm_stats_from_module(nn.BatchNorm2d(3).train(), name="layer1.0.bn1")
    with pytest.raises(MergeError, match="layer1.0.bn1"):
        norm_stats_from_module(nn.BatchNorm2d(3).train(), name="layer1.0.bn1")
    with pytest.raises(MergeError, match="track_running_stats"):
        norm_stats_from_module(nn.BatchNorm2d(3, track_running_stats=False).eval())
    with pytest.raises(MergeError, match="not a batch norm"):
        norm_stats_from_module(nn.GroupNorm(1, 3))
    with pytest.raises(MergeError, match="channels"):
        fuse_bn(torch.zeros(4, 3, 1), None, norm_stats_from_module(nn.BatchNorm1d(3).eval()))
