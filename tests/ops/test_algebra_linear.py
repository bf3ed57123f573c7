"""F1–F4: linear layers as 1x1 convs, convs on a fixed input as linear layers, BN after such an FC."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from reparam.ops import (
    ConvGeometry,
    MergeError,
    conv1x1_to_linear,
    conv_nd,
    conv_to_fc,
    conv_to_linear,
    fuse_bn,
    linear_to_conv,
    repeat_norm_for_fc,
)
from reparam.testing import bn_module, bn_stats, conv_layers, small_inputs, tensors
from reparam.verify import relative_error

pytestmark = pytest.mark.usefixtures("array_library")  # every property on every array library

TOL = 1e-10


@given(st.data())
def test_linear_is_a_pointwise_conv(data):
    n, i, o = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    w, b = data.draw(tensors((o, i))), data.draw(st.one_of(st.none(), tensors((o,))))
    x = data.draw(small_inputs(i, ndim=n))
    g = ConvGeometry.create((1,) * n)
    k = linear_to_conv(w, n)
    y = F.linear(x.movedim(1, -1), w, b).movedim(-1, 1)
    assert relative_error(y, conv_nd(x, k, b, g)) <= TOL
    assert torch.equal(conv1x1_to_linear(k, g), w)


def test_conv1x1_to_linear_refusals():
    with pytest.raises(MergeError, match="not 1x1"):
        conv1x1_to_linear(torch.zeros(2, 2, 3))
    with pytest.raises(MergeError, match="stride 1"):
        conv1x1_to_linear(torch.zeros(2, 2, 1), ConvGeometry.create(1, stride=2, ndim=1))


@given(st.data())
@torch.no_grad()
def test_conv_covering_the_input_is_linear(data):
    n, c, o = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    size = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    k, b = data.draw(tensors((o, c) + size)), data.draw(st.one_of(st.none(), tensors((o,))))
    g = ConvGeometry.create(size, padding=0)
    x = data.draw(tensors((2, c) + size))
    w, bb = conv_to_linear(k, b, (c,) + size, g)
    assert relative_error(conv_nd(x, k, b, g).flatten(1), F.linear(x.flatten(1), w, bb)) <= TOL
    with pytest.raises(MergeError, match="whole input"):
        conv_to_linear(k, b, (c,) + tuple(s + 1 for s in size))


@given(st.data())
@torch.no_grad()
def test_conv_to_fc_on_a_fixed_input(data):
    """F3 (+F4): any conv geometry on a fixed input is an FC layer; a BN after it folds via repeated stats."""
    g, k, b = data.draw(conv_layers(max_kernel=3))
    cin = k.shape[1] * g.groups
    size = data.draw(small_inputs(cin, g, extra=1, max_batch=1)).shape[2:]
    x = data.draw(tensors((2, cin) + tuple(size)))
    w, bb = conv_to_fc(k, b, g, (cin,) + tuple(size))
    y = conv_nd(x, k, b, g)
    assert relative_error(y.flatten(1), F.linear(x.flatten(1), w, bb)) <= TOL
    stats = data.draw(bn_stats(k.shape[0]))
    hw = y[0, 0].numel()
    wf, bf = fuse_bn(w, bb, repeat_norm_for_fc(stats, hw))
    assert relative_error(bn_module(stats, g.ndim)(y).flatten(1), F.linear(x.flatten(1), wf, bf)) <= TOL


def test_conv_to_fc_is_torch_only():
    import numpy as np

    with pytest.raises(TypeError, match="torch"):
        conv_to_fc(np.zeros((1, 1, 1)), None, ConvGeometry.create(1, ndim=1), (1, 2))
