"""C1–C6: convolutions and linear layers in sequence composed into one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from reparam.ops import (
    ConvGeometry,
    MergeError,
    compose,
    compose_1x1_kxk,
    compose_depthwise_pointwise,
    compose_kxk_1x1,
    compose_linear,
    conv_nd,
    fuse_bn,
    pad_value_for_1x1_bias,
)
from reparam.testing import bn_module, bn_stats, conv_layers, divisors, min_chain_input_size, small_inputs, tensors
from reparam.verify import relative_error

pytestmark = pytest.mark.usefixtures("array_library")  # every property on every array library

TOL = 1e-10


def two(x, k1, b1, g1, k2, b2, g2):
    return conv_nd(conv_nd(x, k1, b1, g1), k2, b2, g2)


@given(st.data())
@torch.no_grad()
def test_compose_when_all_padding_comes_first(data):
    """C3: any strides, dilations, groups, kernel sizes; the second conv reads no padding (it may crop)."""
    n = data.draw(st.integers(1, 3))
    g1, k1, b1 = data.draw(conv_layers(ndim=n, max_kernel=3, max_stride=2, max_dilation=2))
    g2, k2, b2 = data.draw(
        conv_layers(ndim=n, in_channels=k1.shape[0], max_kernel=3, max_stride=2, max_dilation=2, padding="none")
    )
    if data.draw(st.booleans()):
        g2 = g2.replace(padding=tuple((-data.draw(st.integers(0, 1)), -data.draw(st.integers(0, 1))) for _ in range(n)))
    x = data.draw(small_inputs(k1.shape[1] * g1.groups, min_size=min_chain_input_size(g1, g2), extra=2))
    k, b, g = compose(k1, b1, g1, k2, b2, g2)
    assert g.stride == tuple(a * c for a, c in zip(g1.stride, g2.stride))
    assert relative_error(two(x, k1, b1, g1, k2, b2, g2), conv_nd(x, k, b, g)) <= TOL


@given(st.data())
@torch.no_grad()
def test_compose_pointwise_then_padded_conv(data):
    """C1 (b)/(c): a 1x1 before a padded conv merges under reflect/replicate/circular, or zeros with no bias."""
    n = data.draw(st.integers(1, 3))
    g1, k1, b1 = data.draw(conv_layers(ndim=n, kernel_size=(1,) * n, max_stride=1, padding="none"))
    g2, k2, b2 = data.draw(conv_layers(ndim=n, in_channels=k1.shape[0], max_kernel=4))
    if g2.padding_mode == "zeros":
        b1 = None
    x = data.draw(small_inputs(k1.shape[1] * g1.groups, min_size=min_chain_input_size(g1, g2)))
    k, b, g = compose(k1, b1, g1, k2, b2, g2)
    assert relative_error(two(x, k1, b1, g1, k2, b2, g2), conv_nd(x, k, b, g)) <= TOL


@given(st.data())
def test_compose_refuses_a_padded_second_conv(data):
    n = data.draw(st.integers(1, 2))
    g1, k1, b1 = data.draw(conv_layers(ndim=n, bias=True))
    g2, k2, b2 = data.draw(conv_layers(ndim=n, in_channels=k1.shape[0], padding="symmetric", padding_modes=("zeros",)))
    if not g2.pads:
        return
    pointwise = (
        all(k == 1 for k in g1.kernel_size)
        and all(s == 1 for s in g1.stride)
        and not any(p != (0, 0) for p in g1.padding)
    )
    with pytest.raises(MergeError, match="bias" if pointwise else "border"):
        compose(k1, b1, g1, k2, b2, g2)


def test_the_border_problem_is_real():
    """What compose refuses really differs: both convs padded (C3) and a biased 1x1 into a zero-padded 3x3 (C1)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    g3 = ConvGeometry.create(3, padding=1)
    k1, k2 = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    naive, nb, ng = compose(
        k1, None, g3.replace(padding=((2, 2), (2, 2))), k2, None, g3.replace(padding=((0, 0), (0, 0)))
    )
    assert relative_error(two(x, k1, None, g3, k2, None, g3), conv_nd(x, naive, nb, ng)) > 1e-2
    p1, b1 = torch.randn(2, 2, 1, 1, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    km, bm = compose_1x1_kxk(p1, b1, k2, None)
    assert relative_error(two(x, p1, b1, ConvGeometry.create(1), k2, None, g3), conv_nd(x, km, bm, g3)) > 1e-2


@given(st.data())
@torch.no_grad()
def test_bn_and_pad_makes_pointwise_then_kxk_exact(data):
    """C1 (a): 1x1 → BN → pad with the BN's value on zero → kxk(padding 0) equals one conv padding with zeros."""
    n = data.draw(st.integers(1, 3))
    g2, k2, b2 = data.draw(conv_layers(ndim=n, max_kernel=4, padding_modes=("zeros",)))
    m = k2.shape[1] * g2.groups
    g1, k1, b1 = data.draw(
        conv_layers(ndim=n, out_channels=m, kernel_size=(1,) * n, max_stride=1, padding="none", groups=g2.groups)
    )
    stats = data.draw(bn_stats(m))
    x = data.draw(small_inputs(k1.shape[1] * g1.groups, g2))
    value = pad_value_for_1x1_bias(b1, stats).reshape((1, -1) + (1,) * n)
    inner = bn_module(stats, n)(conv_nd(x, k1, b1, g1)) - value
    y = conv_nd(F.pad(inner, g2.f_pad()) + value, k2, b2, g2.replace(padding=((0, 0),) * n))
    kf, bf = fuse_bn(k1, b1, stats)
    k, b = compose_1x1_kxk(kf, bf, k2, b2, g1.groups, g2.groups)
    assert relative_error(y, conv_nd(x, k, b, g2)) <= TOL


@given(st.data())
@torch.no_grad()
def test_compose_kxk_then_pointwise(data):
    """C2 (and the C6 compactor fold): a grouped kxk then a 1x1 with other groups is one conv with gcd groups."""
    g1, k1, b1 = data.draw(conv_layers(max_channels=6))
    m = k1.shape[0]
    o = data.draw(st.integers(1, 6))
    g2groups = data.draw(st.sampled_from([g for g in divisors(m) if o % g == 0]))
    k2 = data.draw(tensors((o, m // g2groups) + (1,) * g1.ndim))
    b2 = data.draw(st.one_of(st.none(), tensors((o,))))
    g2 = ConvGeometry.create((1,) * g1.ndim, groups=g2groups)
    x = data.draw(small_inputs(k1.shape[1] * g1.groups, g1))
    k, b = compose_kxk_1x1(k1, b1, k2, b2, g1.groups, g2groups)
    g = g1.replace(groups=math.gcd(g1.groups, g2groups))
    assert relative_error(two(x, k1, b1, g1, k2, b2, g2), conv_nd(x, k, b, g)) <= TOL


@given(st.data())
@torch.no_grad()
def test_depthwise_separable_is_one_conv(data):
    """C5: depthwise (multiplier E) then pointwise with outer groups."""
    c, e = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    g1, kd, bd = data.draw(conv_layers(in_channels=c, out_channels=c * e, groups=c))
    pwg = data.draw(st.sampled_from(divisors(c)))
    o = pwg * data.draw(st.integers(1, 2))
    kp = data.draw(tensors((o, c * e // pwg) + (1,) * g1.ndim))
    bp = data.draw(st.one_of(st.none(), tensors((o,))))
    x = data.draw(small_inputs(c, g1))
    k, b = compose_depthwise_pointwise(kd, bd, kp, bp, c, pwg)
    y = two(x, kd, bd, g1, kp, bp, ConvGeometry.create((1,) * g1.ndim, groups=pwg))
    assert relative_error(y, conv_nd(x, k, b, g1.replace(groups=pwg))) <= TOL


@given(st.data())
def test_compose_linear(data):
    i, m, o = (data.draw(st.integers(1, 5)) for _ in range(3))
    w1, w2, x = data.draw(tensors((m, i))), data.draw(tensors((o, m))), data.draw(tensors((3, i)))
    b1, b2 = data.draw(st.one_of(st.none(), tensors((m,)))), data.draw(st.one_of(st.none(), tensors((o,))))
    w, b = compose_linear(w1, b1, w2, b2)
    assert relative_error(F.linear(F.linear(x, w1, b1), w2, b2), F.linear(x, w, b)) <= TOL


def test_compose_refuses_transposed_and_mismatched_convs():
    g = ConvGeometry.create(3, padding=0)
    with pytest.raises(MergeError, match="transposed"):
        compose(torch.zeros(2, 2, 3, 3), None, g.replace(transposed=True), torch.zeros(2, 2, 3, 3), None, g)
    with pytest.raises(MergeError, match="reads"):
        compose(torch.zeros(2, 2, 3, 3), None, g, torch.zeros(2, 3, 3, 3), None, g)


def test_shape_mismatches_are_refused():
    with pytest.raises(MergeError, match="reads"):
        compose_linear(torch.zeros(3, 2), None, torch.zeros(2, 4), None)
    with pytest.raises(MergeError, match="not 1x1"):
        compose_1x1_kxk(torch.zeros(2, 2, 3, 3), None, torch.zeros(2, 2, 3, 3), None)
    with pytest.raises(MergeError, match="not depthwise"):
        compose_depthwise_pointwise(torch.zeros(2, 2, 3), None, torch.zeros(2, 2, 1), None, 1)
