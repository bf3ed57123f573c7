"""B1–B4, D1, D2, D5: parallel branches summed into one kernel; identity and pooling as kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from reparam.ops import (
    ConvGeometry,
    MergeError,
    add_branches,
    avg_pool_kernel,
    check_avg_pool_mergeable,
    conv_nd,
    dilate_kernel,
    dirac_plus,
    embed_kernel,
    identity_kernel,
)
from reparam.testing import conv_geometries, conv_layers, divisors, small_inputs, tensors
from reparam.verify import relative_error

pytestmark = pytest.mark.usefixtures("array_library")  # every property on every array library

TOL = 1e-10


@st.composite
def aligned_branch(draw, dst: ConvGeometry) -> ConvGeometry:
    """A branch geometry whose taps land on `dst`'s grid: kernel ≤ target (after densifying a
    dilation that is a multiple of the target's), any offset, paddings derived from the offset."""
    ks, ds, pads = [], [], []
    for kk, d, (pb, pa) in zip(dst.kernel_size, dst.dilation, dst.padding):
        m = draw(st.integers(1, 3))
        k = draw(st.integers(1, max(1, (kk - 1) // m + 1)))
        dense = m * (k - 1) + 1
        o = draw(st.integers(0, kk - dense))
        ks.append(k)
        ds.append(d * m if k > 1 else draw(st.integers(1, 3)))
        pads.append((pb - d * o, pa - d * (kk - dense - o)))
    return dst.replace(kernel_size=tuple(ks), dilation=tuple(ds), padding=tuple(pads))


@given(st.data())
@torch.no_grad()
def test_embedded_branches_add_up(data):
    """B1 + B2 + B4: a sum of branches (smaller, rectangular, dilated, offset, cropping) is one conv."""
    g, k, b = data.draw(conv_layers())
    cin = k.shape[1] * g.groups
    x = data.draw(small_inputs(cin, g))
    y = conv_nd(x, k, b, g)
    pairs = [(k, b)]
    for _ in range(data.draw(st.integers(1, 2))):
        src = data.draw(aligned_branch(g))
        kb = data.draw(tensors((k.shape[0], k.shape[1]) + src.kernel_size))
        bb = data.draw(st.one_of(st.none(), tensors((k.shape[0],))))
        y = y + conv_nd(x, kb, bb, src)
        pairs.append((embed_kernel(kb, src, g), bb))
    km, bm = add_branches(*pairs)
    assert relative_error(y, conv_nd(x, km, bm, g)) <= TOL


@given(st.data())
def test_embed_refuses_misaligned_branches(data):
    g = data.draw(conv_geometries(max_dilation=3))
    src = data.draw(aligned_branch(g))
    dim = data.draw(st.integers(0, g.ndim - 1))
    shift = data.draw(st.sampled_from([-1, 1]))
    pads = list(src.padding)
    side = data.draw(st.integers(0, 1))
    pads[dim] = (pads[dim][0] + shift, pads[dim][1]) if side == 0 else (pads[dim][0], pads[dim][1] + shift)
    bad = src.replace(padding=tuple(pads))
    k = torch.zeros((1, 1) + src.kernel_size)
    with pytest.raises(MergeError, match="embed_kernel"):
        embed_kernel(k, bad, g)
    with pytest.raises(MergeError, match="stride"):
        embed_kernel(k, src.replace(stride=tuple(s + 1 for s in src.stride)), g)
    other_mode = src.replace(padding_mode="reflect" if g.padding_mode != "reflect" else "zeros")
    if src.pads:
        with pytest.raises(MergeError, match="padding_mode"):
            embed_kernel(k, other_mode, g)
    else:  # a branch that reads no padding never sees the mode
        assert torch.equal(embed_kernel(k, other_mode, g), embed_kernel(k, src, g))


def test_embed_refuses_a_dilation_off_the_target_grid():
    dst = ConvGeometry.create(5, dilation=2, padding=4)
    src = ConvGeometry.create(3, dilation=3, padding=3)
    with pytest.raises(MergeError, match="multiple"):
        embed_kernel(torch.zeros(1, 1, 3, 3), src, dst)


@given(st.data())
@torch.no_grad()
def test_dilated_kernel_is_dense(data):
    g, k, b = data.draw(conv_layers(padding="any"))
    dense = dilate_kernel(k, g.dilation)
    dg = g.replace(kernel_size=tuple(dense.shape[2:]), dilation=(1,) * g.ndim)
    x = data.draw(small_inputs(k.shape[1] * g.groups, g))
    assert relative_error(conv_nd(x, k, b, g), conv_nd(x, dense, b, dg)) <= TOL


@st.composite
def identity_geometries(draw, channels: int) -> ConvGeometry:
    g = draw(conv_geometries(in_channels=channels, out_channels=channels, padding="none"))
    taps = [draw(st.integers(0, k - 1)) for k in g.kernel_size]
    return g.replace(padding=tuple((d * u, d * (k - 1 - u)) for k, d, u in zip(g.kernel_size, g.dilation, taps)))


@given(st.data())
@torch.no_grad()
def test_identity_kernel_for_any_groups_tap_and_stride(data):
    c = data.draw(st.integers(1, 6))
    g = data.draw(identity_geometries(c))
    x = data.draw(small_inputs(c, g))
    kernel = identity_kernel(c, g.groups, g, like=x)
    sub = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in g.stride)]
    assert torch.equal(conv_nd(x, kernel, None, g), sub)
    assert kernel.dtype == x.dtype and kernel.device == x.device


@given(st.data())
def test_identity_kernel_refuses_unaligned_geometry(data):
    c = data.draw(st.integers(1, 4))
    g = data.draw(identity_geometries(c))
    dim = data.draw(st.integers(0, g.ndim - 1))
    pads = list(g.padding)
    pads[dim] = (pads[dim][0], pads[dim][1] + data.draw(st.sampled_from([-1, 1])))
    with pytest.raises(MergeError, match="identity_kernel"):
        identity_kernel(c, g.groups, g.replace(padding=tuple(pads)), like=torch.zeros(1))


@given(st.data())
@torch.no_grad()
def test_avg_pool_as_conv(data):
    n = data.draw(st.integers(1, 3))
    c = data.draw(st.integers(1, 4))
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    stride = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    padding = tuple(data.draw(st.integers(0, ki // 2)) for ki in k)
    pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[n](
        k if n > 1 else k[0],
        stride if n > 1 else stride[0],
        padding if n > 1 else padding[0],
        count_include_pad=any(padding) or data.draw(st.booleans()),
    )
    groups = data.draw(st.sampled_from(divisors(c)))
    g = check_avg_pool_mergeable(pool, groups=groups)
    x = data.draw(small_inputs(c, min_size=g.kernel_size))  # torch pools need the window inside the input
    kernel = avg_pool_kernel(c, groups, g.kernel_size, like=x)
    assert relative_error(pool(x), conv_nd(x, kernel, None, g)) <= TOL


@pytest.mark.parametrize(
    "pool, match",
    [
        (nn.AvgPool2d(3, 1, 1, count_include_pad=False), "count_include_pad"),
        (nn.AvgPool2d(3, 2, ceil_mode=True), "ceil_mode"),
        (nn.AvgPool2d(2, divisor_override=3), "divisor_override"),
        (nn.MaxPool2d(2), "not an AvgPool"),
    ],
)
def test_avg_pool_refusals(pool, match):
    with pytest.raises(MergeError, match=match):
        check_avg_pool_mergeable(pool, name="stem.pool")


def test_avg_pool_exclude_pad_really_differs():
    pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    g = ConvGeometry.create(3, padding=1, groups=2)
    assert relative_error(pool(x), conv_nd(x, avg_pool_kernel(2, 2, (3, 3), like=x), None, g)) > 1e-2


@given(st.data())
@torch.no_grad()
def test_dirac_plus_adds_the_input(data):
    c = data.draw(st.integers(1, 6))
    g = data.draw(
        conv_geometries(
            in_channels=c,
            out_channels=c,
            padding="centred",
            max_stride=1,
            kernel_size=data.draw(st.sampled_from([(1, 1), (3, 1), (1,), (3, 3, 1)])),
        )
    )
    k = data.draw(tensors((c, c // g.groups) + g.kernel_size))
    x = data.draw(small_inputs(c, g))
    assert relative_error(conv_nd(x, k, None, g) + x, conv_nd(x, dirac_plus(k, g.groups), None, g)) <= TOL
    with pytest.raises(MergeError, match="outputs"):
        dirac_plus(torch.zeros(c + 1, c // g.groups, 1), g.groups)


def test_add_branches_bias_and_shape_rules():
    k = torch.ones(2, 1, 3)
    assert add_branches((k, None), (k, None))[1] is None
    assert torch.equal(add_branches((k, None), (k, torch.ones(2)))[1], torch.ones(2))
    with pytest.raises(MergeError, match="embed"):
        add_branches((k, None), (torch.ones(2, 1, 1), None))
