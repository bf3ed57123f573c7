"""Every block equals its merged conv (float64 proof, float32 bound, through `reparam.testing`'s harness) and
its deploy-from-config module."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reparam
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


def _within_one_rounding(half: torch.Tensor, exact: torch.Tensor) -> bool:
    """``half`` is ``exact`` (float64) rounded to its dtype, up to one more rounding (float64 → float32 → half)."""
    eps = torch.finfo(half.dtype).eps
    tiny = torch.finfo(half.dtype).tiny
    return bool(((half.double() - exact).abs() <= eps * exact.abs() + tiny).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", CONV_BLOCKS, ids=lambda c: c.__name__)
@settings(max_examples=10, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_a_half_precision_block_merges_to_the_rounded_exact_kernel(cls, dtype, data, seed):
    """The fold runs in float32 and only its result is rounded: the merged half-precision kernel and bias
    are the float64 merge's, rounded (a fold computed in half precision is many roundings off)."""
    case = data.draw(block_cases(cls))
    block = case.build(torch.float64, seed)
    half = copy.deepcopy(block).to(dtype).merged()
    conv = half if isinstance(half, torch.nn.Conv2d) else half[0]
    assert conv.weight.dtype == dtype
    # the reference: the float64 merge of the block whose parameters are rounded to `dtype` first
    rounded = copy.deepcopy(block).to(dtype).double().merged()
    ref = rounded if isinstance(rounded, torch.nn.Conv2d) else rounded[0]
    assert _within_one_rounding(conv.weight, ref.weight) and _within_one_rounding(conv.bias, ref.bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_merge_folds_a_half_precision_conv_bn_pair_in_float32(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).double().eval()
    with torch.no_grad():
        model[1].running_var.uniform_(1e-3, 10.0)
        model[1].weight.uniform_(0.1, 3.0)
    rounded = copy.deepcopy(model).to(dtype).double()
    exact = reparam.merge(rounded, torch.randn(1, 3, 5, 5, dtype=torch.float64))
    merged = reparam.merge(copy.deepcopy(model).to(dtype), torch.randn(1, 3, 5, 5).to(dtype))
    assert merged[0].weight.dtype == dtype
    assert _within_one_rounding(merged[0].weight, exact[0].weight) and _within_one_rounding(
        merged[0].bias, exact[0].bias
    )
