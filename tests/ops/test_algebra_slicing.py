"""G1: removing channels from convs, transposed convs, linear layers and norms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from reparam.ops import (
    MergeError,
    conv_nd,
    geometry_from_module,
    matching_group_channels,
    select_in,
    select_norm,
    select_out,
)
from reparam.testing import bn_module, bn_stats, conv_layers, small_inputs, tensors
from reparam.verify import relative_error

pytestmark = pytest.mark.usefixtures("array_library")  # every property on every array library

TOL = 1e-10


@st.composite
def keep_sets(draw, total: int, groups: int) -> tuple[list[int], bool]:
    """A channel subset a grouped layer admits: equal counts per group, or whole groups."""
    block = total // groups
    if groups > 1 and draw(st.booleans()):
        kept = draw(st.lists(st.integers(0, groups - 1), min_size=1, unique=True))
        return sorted(j * block + c for j in kept for c in range(block)), True
    n = draw(st.integers(1, block))
    return sorted(
        j * block + c
        for j in range(groups)
        for c in draw(st.lists(st.integers(0, block - 1), min_size=n, max_size=n, unique=True))
    ), False


@given(st.data())
@torch.no_grad()
def test_select_out_of_a_conv(data):
    g, k, b = data.draw(conv_layers(max_channels=6))
    cin, cout = k.shape[1] * g.groups, k.shape[0]
    keep, _ = data.draw(keep_sets(cout, g.groups))
    x = data.draw(small_inputs(cin, g))
    k2, b2, groups = select_out(k, b, keep, groups=g.groups)
    inputs = matching_group_channels(keep, cout, cin, g.groups) if groups != g.groups else list(range(cin))
    assert relative_error(conv_nd(x, k, b, g)[:, keep], conv_nd(x[:, inputs], k2, b2, g.replace(groups=groups))) <= TOL


@given(st.data())
@torch.no_grad()
def test_select_in_of_a_conv(data):
    g, k, b = data.draw(conv_layers(max_channels=6))
    cin, cout = k.shape[1] * g.groups, k.shape[0]
    keep, _ = data.draw(keep_sets(cin, g.groups))
    x = data.draw(small_inputs(cin, g))
    mask = torch.zeros(cin, dtype=x.dtype)
    mask[keep] = 1
    k2, groups = select_in(k, keep, g.groups)
    rows = matching_group_channels(keep, cin, cout, g.groups) if groups != g.groups else list(range(cout))
    b2 = None if b is None else b[rows]
    ref = conv_nd(x * mask.reshape((1, -1) + (1,) * g.ndim), k, b, g)[:, rows]
    assert relative_error(ref, conv_nd(x[:, keep], k2, b2, g.replace(groups=groups))) <= TOL


@given(st.data())
@torch.no_grad()
def test_select_on_a_transposed_conv(data):
    groups = data.draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 3))
    conv = nn.ConvTranspose2d(
        cin,
        cout,
        data.draw(st.integers(1, 3)),
        data.draw(st.integers(1, 2)),
        groups=groups,
        bias=data.draw(st.booleans()),
        dtype=torch.float64,
    )
    g = geometry_from_module(conv)
    x = data.draw(tensors((1, cin, 2, 3)))
    keep_o, _ = data.draw(keep_sets(cout, groups))
    k2, b2, g2 = select_out(conv.weight, conv.bias, keep_o, transposed=True, groups=groups)
    inputs = matching_group_channels(keep_o, cout, cin, groups) if g2 != groups else list(range(cin))
    assert relative_error(conv(x)[:, keep_o], conv_nd(x[:, inputs], k2, b2, g.replace(groups=g2))) <= TOL
    keep_i, _ = data.draw(keep_sets(cin, groups))
    k3, g3 = select_in(conv.weight, keep_i, groups, transposed=True)
    rows = matching_group_channels(keep_i, cin, cout, groups) if g3 != groups else list(range(cout))
    mask = torch.zeros(cin, dtype=x.dtype)
    mask[keep_i] = 1
    b3 = None if conv.bias is None else conv.bias[rows]
    assert (
        relative_error(conv(x * mask[:, None, None])[:, rows], conv_nd(x[:, keep_i], k3, b3, g.replace(groups=g3)))
        <= TOL
    )


@given(st.data())
@torch.no_grad()
def test_select_norm(data):
    c = data.draw(st.integers(1, 5))
    stats = data.draw(bn_stats(c))
    keep = data.draw(st.lists(st.integers(0, c - 1), min_size=1, unique=True))
    x = data.draw(tensors((2, c, 3)))
    keep = sorted(keep)
    assert relative_error(bn_module(stats, 1)(x)[:, keep], bn_module(select_norm(stats, keep), 1)(x[:, keep])) <= TOL


def test_unbalanced_grouped_selections_are_refused():
    k = torch.zeros(4, 2, 3)  # groups=2: 4 outputs, 4 inputs, two per group
    with pytest.raises(MergeError, match="same number of channels in every group"):
        select_out(k, None, [0, 1, 2], groups=2)
    with pytest.raises(MergeError, match="same number of channels in every group"):
        select_in(k, [0, 2, 3], groups=2)
    with pytest.raises(MergeError, match="at least one"):
        select_out(k, None, [], groups=2)
    with pytest.raises(MergeError, match="out of range"):
        select_in(k, [4], groups=2)


def test_depthwise_selection_shrinks_groups():
    k = torch.randn(4, 1, 3)
    k2, b2, groups = select_out(k, torch.arange(4.0), [1, 3], groups=4)
    assert groups == 2 and torch.equal(k2, k[[1, 3]]) and b2.tolist() == [1.0, 3.0]
    assert select_in(k, [0, 2], groups=4)[1] == 2


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(["numpy", "torch"]),
)
def test_select_axes_keeps_the_named_entries_of_every_axis(shape, seed, backend):
    import numpy as np

    from reparam.ops.slicing import select_axes

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    keep = [
        None if rng.random() < 0.3 else sorted(rng.choice(n, rng.integers(1, n + 1), replace=False).tolist())
        for n in shape
    ]
    expected = x[np.ix_(*[range(n) if k is None else k for n, k in zip(shape, keep)])]
    got = select_axes(x if backend == "numpy" else torch.from_numpy(x), keep)
    assert np.array_equal(np.asarray(got), expected)
