"""`reparam.testing`: the norm randomiser reaches every batch norm it can, and the default proof of a
block factory draws grouped geometries."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from reparam.ops.blocks import RepVGGBlock
from reparam.testing import assert_mergeable, randomise_norms


def test_randomise_norms_reaches_frozen_norms_and_skips_batch_statistics():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), FrozenBatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    randomise_norms(model, 0)
    frozen = model[1]
    assert not torch.equal(frozen.running_var, torch.ones(4)) and not torch.equal(frozen.weight, torch.ones(4))
    assert model[2].running_mean is None  # left alone: it normalises with the batch's statistics


def test_the_default_factory_proof_draws_grouped_geometries():
    seen = []

    def factory(g):
        seen.append(g.groups)
        pad = tuple(b for b, _ in g.padding)
        return RepVGGBlock(4, 4, g.kernel_size, g.stride, pad, g.dilation, g.groups, g.padding_mode).eval()

    assert_mergeable(factory, in_channels=4, max_examples=30)
    assert {1, 2, 4} & set(seen) and max(seen) > 1
