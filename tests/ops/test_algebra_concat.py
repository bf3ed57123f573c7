"""E1, E2: concatenated outputs stack kernel rows; a conv over a concatenation splits its columns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reparam.ops import MergeError, concat_out, conv_nd, split_in, ungroup_kernel
from reparam.testing import conv_layers, divisors, small_inputs, tensors
from reparam.verify import relative_error

pytestmark = pytest.mark.usefixtures("array_library")  # every property on every array library

TOL = 1e-10


@given(st.data())
@torch.no_grad()
def test_concat_out_stacks_rows(data):
    g, k, b = data.draw(conv_layers(max_channels=6))
    pairs = [(k, b)]
    for _ in range(data.draw(st.integers(1, 2))):
        o = g.groups * data.draw(st.integers(1, 2))
        pairs.append((data.draw(tensors((o,) + tuple(k.shape[1:]))), data.draw(st.one_of(st.none(), tensors((o,))))))
    x = data.draw(small_inputs(k.shape[1] * g.groups, g))
    km, bm = concat_out(*pairs, groups=g.groups)  # grouped kernels come back dense
    ref = torch.cat([conv_nd(x, kj, bj, g) for kj, bj in pairs], dim=1)
    assert relative_error(ref, conv_nd(x, km, bm, g.replace(groups=1))) <= TOL


@given(st.data())
@torch.no_grad()
def test_ungroup_kernel_keeps_the_conv(data):
    g, k, b = data.draw(conv_layers(max_channels=6))
    new = data.draw(st.sampled_from(divisors(g.groups)))
    x = data.draw(small_inputs(k.shape[1] * g.groups, g))
    assert (
        relative_error(conv_nd(x, k, b, g), conv_nd(x, ungroup_kernel(k, g.groups, new), b, g.replace(groups=new)))
        <= TOL
    )


@given(st.data())
@torch.no_grad()
def test_split_in_sums_to_the_conv_over_the_concat(data):
    g, k, b = data.draw(conv_layers(max_channels=6))
    cin = k.shape[1] * g.groups
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, cin - 1)), max_size=2))) - {cin})
    sizes = [e - s for s, e in zip([0] + cuts, cuts + [cin])]
    x = data.draw(small_inputs(cin, g))
    pieces = split_in(k, sizes, g.groups)
    xs = torch.split(x, sizes, dim=1)
    total = sum(conv_nd(xj, kj, None, g.replace(groups=1)) for xj, kj in zip(xs, pieces))
    assert relative_error(conv_nd(x, k, None, g), total) <= TOL


def test_concat_and_split_refuse_mismatches():
    with pytest.raises(MergeError, match="beyond the output axis"):
        concat_out((torch.zeros(2, 3, 3), None), (torch.zeros(2, 2, 3), None))
    with pytest.raises(MergeError, match="sum to"):
        split_in(torch.zeros(2, 3, 1), [1, 1])
    assert concat_out((torch.zeros(1, 1, 1), None), (torch.zeros(2, 1, 1), torch.ones(2)))[1].tolist() == [0, 1, 1]
