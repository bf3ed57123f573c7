"""PostBNBlock: one BN after linear branches, so merging is exact in training mode too."""

from __future__ import annotations

import copy

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from reparam.ops import conv_nd
from reparam.ops.blocks import PostBNBlock
from reparam.verify import relative_error

from .cases import block_cases


@given(data=st.data(), seed=st.integers(0, 2**16))
def test_train_mode_merge_matches_outputs_gradients_and_statistics(data, seed):
    case = data.draw(block_cases(PostBNBlock))
    block = case.build(torch.float64, seed).train()
    with torch.no_grad():
        pre = block.linear(case.x)
    # batch statistics are only well conditioned when the batch varies: near-zero variance turns
    # rounding noise into O(1) outputs in any implementation
    assume(pre[0, 0].numel() * pre.shape[0] > 1 and float(pre.var(dim=(0, 2, 3)).min()) > 1e-6)
    merged = block.merged()
    assert isinstance(merged, torch.nn.Sequential) and merged.training
    assert isinstance(merged[0], torch.nn.Conv2d) and isinstance(merged[1], torch.nn.BatchNorm2d)
    reference = copy.deepcopy(block)

    x1 = case.x.clone().requires_grad_(True)
    x2 = case.x.clone().requires_grad_(True)
    y, z = reference(x1), merged(x2)
    assert relative_error(y, z) <= 1e-10
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (z * weights).sum().backward()
    assert relative_error(x1.grad, x2.grad) <= 1e-10
    if reference.bn.affine:
        assert relative_error(reference.bn.weight.grad, merged[1].weight.grad) <= 1e-10
        assert relative_error(reference.bn.bias.grad, merged[1].bias.grad) <= 1e-10
    # batch statistics were updated identically
    assert relative_error(reference.bn.running_mean, merged[1].running_mean) <= 1e-10
    assert relative_error(reference.bn.running_var, merged[1].running_var) <= 1e-10


@given(data=st.data(), seed=st.integers(0, 2**16))
def test_online_kernel_carries_the_branch_gradients(data, seed):
    """`linear_kernel_bias()` is differentiable: a loss on `conv(x; W_Σ) + b_Σ` gives every branch
    parameter the same gradient as that loss on the block's own branch sum (OREPA-style training)."""
    case = data.draw(block_cases(PostBNBlock))
    block = case.build(torch.float64, seed)
    params = [p for name, p in block.named_parameters() if not name.startswith("bn.")]
    y = block.linear(case.x)
    weights = torch.randn_like(y)
    g_block = torch.autograd.grad((y * weights).sum(), params)
    kernel, bias = block.linear_kernel_bias()
    z = conv_nd(case.x, kernel, bias, block.geometry)
    assert relative_error(y, z) <= 1e-10
    g_online = torch.autograd.grad((z * weights).sum(), params)
    for a, b in zip(g_block, g_online):
        assert relative_error(a, b) <= 1e-10
