"""Every block equals its merged conv (float64 proof, float32 bound, through `reparam.testing`'s harness) and
its deploy-from-config module."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reparam.testing import check_mergeable

from .cases import CONV_BLOCKS, block_cases


@pytest.mark.parametrize("cls", CONV_BLOCKS, ids=lambda c: c.__name__)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_merged_equals_block(cls, data, seed):
    """`block.merged()` and `reparam.merge(block)` equal the block with random norms (float64: ≤1e-10 of
    max|y|; float32: ≤1e-5, or twice the block's own float32 error where rounding dominates). The block is
    untouched; merged keeps dtype/device; deploy-from-config + load equals merged."""
    case = data.draw(block_cases(cls))
    block = case.build(torch.float64, seed)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    assert check_mergeable(block, case.x, seed=seed).failures() == []
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())
    with torch.no_grad():
        merged = block.merged()
        z = merged(case.x)
    assert isinstance(merged, torch.nn.Conv2d) and merged.padding_mode == case.kwargs["padding_mode"]
    assert all(p.dtype == torch.float64 and p.device == case.x.device for p in merged.parameters())

    deployed = cls.deploy_module(**case.kwargs, dtype=torch.float64)
    deployed.load_state_dict(merged.state_dict())
    with torch.no_grad():
        assert torch.equal(deployed.eval()(case.x), z)
