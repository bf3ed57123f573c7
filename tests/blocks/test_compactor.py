"""Compactor: identity at initialisation, folds into the conv before it, merges to a plain 1x1."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from reparam.ops import conv_nd
from reparam.ops.blocks import Compactor
from reparam.testing import conv_geometries, random_tensor, small_inputs
from reparam.verify import relative_error


def test_identity_at_initialisation_with_a_mask_of_ones():
    compactor = Compactor(5, dtype=torch.float64)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    assert torch.equal(compactor(x), x)
    assert torch.equal(compactor.mask, torch.ones(5, dtype=torch.float64))
    assert "mask" in compactor.state_dict()


@given(data=st.data(), seed=st.integers(0, 2**16), bias=st.booleans())
def test_fold_into_equals_conv_then_compactor(data, seed, bias):
    in_ch, out_ch = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    geometry = data.draw(conv_geometries(ndim=2, in_channels=in_ch, out_channels=out_ch))
    x = data.draw(small_inputs(in_ch, geometry))
    kernel = random_tensor((out_ch, in_ch // geometry.groups) + geometry.kernel_size, seed)
    conv_bias = random_tensor((out_ch,), seed + 1) if bias else None
    compactor = Compactor(out_ch, dtype=torch.float64)
    with torch.no_grad():
        compactor.weight.copy_(random_tensor((out_ch, out_ch, 1, 1), seed + 2))
        y = compactor(conv_nd(x, kernel, conv_bias, geometry))
        folded_kernel, folded_bias = compactor.fold_into(kernel, conv_bias, geometry.groups)
        z = conv_nd(x, folded_kernel, folded_bias, geometry.replace(groups=1))
        assert relative_error(y, z) <= 1e-10
        merged = compactor.merged()
        assert relative_error(y, merged(conv_nd(x, kernel, conv_bias, geometry))) <= 1e-10
    deployed = Compactor.deploy_module(out_ch, dtype=torch.float64)
    deployed.load_state_dict(merged.state_dict())
    assert torch.equal(deployed.weight, compactor.weight)
