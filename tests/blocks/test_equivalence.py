"""Every block equals its merged conv (float64 proof, float32 bound) and its deploy-from-config module."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from reparam.verify import relative_error

from .cases import CONV_BLOCKS, block_cases


@torch.no_grad()
def _term_scale(conv: torch.nn.Conv2d, x: torch.Tensor) -> float:
    """max(|W|∗|x| + |b|): the size of the terms the conv sums (padding mode respected)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x.abs(), conv._reversed_padding_repeated_twice, mode=mode)
    return float(F.conv2d(padded, conv.weight.abs(), conv.bias.abs(), conv.stride, 0, conv.dilation, conv.groups).max())


@pytest.mark.parametrize("cls", CONV_BLOCKS, ids=lambda c: c.__name__)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_merged_equals_block(cls, data, seed):
    """float64: max|Δ| ≤ 1e-10·max|y|. float32 merged vs the float64 block: max|Δ| ≤ 1e-5 of the
    summed terms' scale max(|W|∗|x| + |b|), which is max|y| unless the BN shift cancels the conv
    output (then float32 rounding of the terms themselves dominates, in the unmerged block too).
    The block is untouched; merged keeps dtype/device; deploy-from-config + load equals merged."""
    case = data.draw(block_cases(cls))
    block = case.build(torch.float64, seed)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        y = block(case.x)
        merged = block.merged()
        z = merged(case.x)
    assert relative_error(y, z) <= 1e-10
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())
    assert isinstance(merged, torch.nn.Conv2d) and merged.padding_mode == case.kwargs["padding_mode"]
    assert all(p.dtype == torch.float64 and p.device == case.x.device for p in merged.parameters())

    deployed = cls.deploy_module(**case.kwargs, dtype=torch.float64)
    deployed.load_state_dict(merged.state_dict())
    with torch.no_grad():
        assert torch.equal(deployed.eval()(case.x), z)

    with torch.no_grad():
        z32 = block.float().merged()(case.x.float())
    assert z32.dtype == torch.float32
    assert float((z32.double() - y).abs().max()) <= 1e-5 * max(_term_scale(merged, case.x), float(y.abs().max()))
