"""Blocks refuse what they cannot merge exactly, with errors that name the layer and the fix."""

from __future__ import annotations

import functools
import inspect

import pytest
from torch import nn

from reparam.ops import MergeError
from reparam.ops.blocks import (
    ACBlock,
    ConvBlock,
    DilatedReparamBlock,
    DiverseBranchBlock,
    MobileOneBlock,
    PostBNBlock,
    RepLKBlock,
    RepVGGBlock,
)

BN_BLOCKS = (RepVGGBlock, ACBlock, DiverseBranchBlock, MobileOneBlock, RepLKBlock, DilatedReparamBlock)


@pytest.mark.parametrize("cls", BN_BLOCKS, ids=lambda c: c.__name__)
def test_train_mode_bn_is_refused(cls):
    block = cls(4, 4, 13).train()
    with pytest.raises(MergeError, match=rf"{cls.__name__}\..*training mode.*eval\(\)"):
        block.merged()


@pytest.mark.parametrize("cls", BN_BLOCKS + (PostBNBlock,), ids=lambda c: c.__name__)
def test_bn_without_running_stats_is_refused(cls):
    block = cls(4, 4, 13, norm=functools.partial(nn.BatchNorm2d, track_running_stats=False)).eval()
    with pytest.raises(MergeError, match="track_running_stats=False"):
        block.merged()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RepVGGBlock(4, 6, 3, identity=True), "in_channels == out_channels"),
        (lambda: RepVGGBlock(4, 4, 4, identity=True), "padding"),
        (lambda: MobileOneBlock(4, 4, 3, padding=2, identity=True), "padding"),
        (lambda: RepVGGBlock(4, 6, 3, groups=4), "groups=4 must divide"),
        (lambda: RepLKBlock(4, 4, 5, small_kernel=7), "spans 7 taps"),
        (lambda: DilatedReparamBlock(4, 4, 7, branches=[(3, 4)]), "spans 9 taps"),
        (lambda: PostBNBlock(4, 6, 3, avg_pool=True), "in_channels == out_channels"),
        (lambda: DiverseBranchBlock(4, 4, 3, groups=2, internal_channels=3), "internal_channels=3"),
        (lambda: MobileOneBlock(4, 4, 3, num_branches=0), "num_branches"),
    ],
)
def test_impossible_configurations_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_identity_is_added_exactly_when_representable():
    assert RepVGGBlock(4, 4, 3).bn_identity is not None
    assert RepVGGBlock(4, 4, 3, stride=2).bn_identity is not None  # strided identity: x[..., ::2, ::2]
    assert RepVGGBlock(4, 4, 5, dilation=2).bn_identity is not None
    assert RepVGGBlock(4, 4, 3, padding=0).bn_identity is None
    assert RepVGGBlock(4, 4, 4).bn_identity is None  # even kernel: no tap reads the pixel itself
    assert RepVGGBlock(4, 8, 3).bn_identity is None
    assert RepVGGBlock(4, 4, 3, identity=False).bn_identity is None


@pytest.mark.parametrize("cls", BN_BLOCKS + (PostBNBlock,), ids=lambda c: c.__name__)
def test_a_misspelt_option_names_the_block_and_its_options(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__} got unexpected keyword arguments \['kernal'\]"):
        cls(4, 4, 3, kernal=5)


def test_a_block_signature_is_the_shared_one_plus_its_own_options():
    shared = list(inspect.signature(ConvBlock).parameters)[:-1]  # without **options
    for cls, own in ((RepVGGBlock, ["identity"]), (DiverseBranchBlock, ["internal_channels"]), (ACBlock, [])):
        params = list(inspect.signature(cls).parameters)
        assert params == shared[:8] + own + shared[8:], cls.__name__
    block = RepVGGBlock(4, 4, 3, identity=False, conv_bias=True, norm=functools.partial(nn.BatchNorm2d, eps=0.1))
    assert block.bn_identity is None and block.conv_kxk.conv.bias is not None and block.conv_1x1.bn.eps == 0.1


@pytest.mark.parametrize(
    "cls", (RepVGGBlock, DiverseBranchBlock, MobileOneBlock, PostBNBlock), ids=lambda c: c.__name__
)
def test_a_block_that_needs_a_norm_refuses_none_naming_itself(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__} needs a norm layer .*norm=None.*norm=nn.BatchNorm2d"):
        cls(4, 4, 3, norm=None)


@pytest.mark.parametrize("kw", [{"padding": "same"}, {"kernel_size": (3, 3, 3)}, {"stride": (1, 1, 1)}])
def test_geometry_that_is_not_2d_ints_is_refused_naming_the_argument(kw):
    args = {"kernel_size": 3, **kw}
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"{name}=.*2-D and take an int or a pair of ints"):
        RepVGGBlock(4, 4, **args)
