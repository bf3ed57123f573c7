"""ConvGeometry: reading nn.Conv modules, building them back, output sizes, `conv_nd`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from reparam.ops import AsymmetricPadConv, ConvGeometry, MergeError, conv_nd, geometry_from_module, geometry_to_module
from reparam.testing import PADDING_MODES, conv_geometries, divisors, small_inputs, tensors
from reparam.verify import relative_error

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@given(st.data())
@torch.no_grad()
def test_from_module_reads_every_padding_form(data):
    n = data.draw(st.integers(1, 3))
    cin, cout = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    groups = data.draw(st.sampled_from([g for g in divisors(cin) if cout % g == 0]))
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    d = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    form = data.draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = 1 if form == "same" else tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    padding = {
        "int": data.draw(st.integers(0, 3)),
        "tuple": tuple(data.draw(st.integers(0, 3)) for _ in range(n)),
        "same": "same",
        "valid": "valid",
    }[form]
    mode = data.draw(st.sampled_from(PADDING_MODES))
    conv = CONV[n](cin, cout, k, stride, padding, d, groups, data.draw(st.booleans()), mode, dtype=torch.float64)
    g = geometry_from_module(conv)
    x = data.draw(small_inputs(cin, g))
    y = conv(x)
    assert g.output_size(x.shape[2:]) == tuple(y.shape[2:])
    assert relative_error(y, conv_nd(x, conv.weight, conv.bias, g)) <= 1e-12
    if form == "same":
        assert g == ConvGeometry.create(k, 1, "same", d, groups, mode)


@given(st.data())
@torch.no_grad()
def test_to_module_builds_the_geometry(data):
    g = data.draw(conv_geometries(padding=data.draw(st.sampled_from(["any", "symmetric"]))))
    cin, cout = 2 * g.groups, g.groups
    g = g.replace(groups=data.draw(st.sampled_from([1, g.groups])))
    m = geometry_to_module(g, cin, cout, True, dtype=torch.float64)
    assert geometry_from_module(m) == g
    assert isinstance(m, nn.modules.conv._ConvNd if g.is_symmetric else AsymmetricPadConv)
    x = data.draw(small_inputs(cin, g))
    y = m(x)
    assert tuple(y.shape[2:]) == g.output_size(x.shape[2:])
    assert relative_error(y, conv_nd(x, m.weight, m.bias, g)) <= 1e-12


def test_asymmetric_crop_pad_is_a_plain_pad_then_conv():
    g = ConvGeometry.create((3, 2), padding=((2, -1), (0, 1)), padding_mode="zeros")
    m = geometry_to_module(g, 1, 1, False, dtype=torch.float64)
    x = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    ref = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 2, -1)), m.weight)
    assert torch.equal(m(x), ref) and g.output_size((5, 4)) == tuple(ref.shape[2:])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_asymmetric_pad_conv_scripts(mode):
    m = geometry_to_module(ConvGeometry.create((3, 2), padding=((2, -1), (0, 1)), padding_mode=mode), 2, 3, True)
    x = torch.randn(1, 2, 6, 5)
    assert torch.equal(torch.jit.script(m)(x), m(x))


@given(st.data())
@torch.no_grad()
def test_transposed_geometry(data):
    n = data.draw(st.integers(1, 3))
    groups = data.draw(st.sampled_from([1, 2]))
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    s = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    d = tuple(data.draw(st.integers(1, 2)) for _ in range(n))
    p = tuple(data.draw(st.integers(0, (ki - 1) * di)) for ki, di in zip(k, d))
    op = tuple(data.draw(st.integers(0, max(si, di) - 1)) for si, di in zip(s, d))
    conv = CONV_T[n](2 * groups, 3 * groups, k, s, p, op, groups, True, d, dtype=torch.float64)
    g = geometry_from_module(conv)
    assert g.transposed and g.output_padding == op
    x = data.draw(tensors((1, 2 * groups) + tuple(data.draw(st.integers(1, 3)) for _ in range(n))))
    assume(min(g.output_size(x.shape[2:])) >= 1)
    y = conv(x)
    assert g.output_size(x.shape[2:]) == tuple(y.shape[2:])
    assert torch.equal(conv_nd(x, conv.weight, conv.bias, g), y)
    assert geometry_from_module(geometry_to_module(g, 2 * groups, 3 * groups, True)) == g


def test_invalid_geometries_are_rejected():
    with pytest.raises(ValueError):
        ConvGeometry((3,), (1,), (1,), ((1, 1),), padding_mode="mirror")
    with pytest.raises(ValueError):
        ConvGeometry((3, 3), (1,), (1, 1), ((1, 1), (1, 1)))
    with pytest.raises(MergeError):
        geometry_to_module(ConvGeometry((3,), (1,), (1,), ((1, 2),), transposed=True), 1, 1, False)
    with pytest.raises(MergeError, match="not a convolution"):
        geometry_from_module(nn.Linear(2, 2))
