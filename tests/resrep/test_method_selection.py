"""ResRep's side of mask selection: channel scores, the per-round budget and the config's schedule."""

from __future__ import annotations

import pytest
import torch

from apps.resrep.config import ResRepConfig
from apps.resrep.selection import channel_scores, mask_budget


def test_mask_budget():
    assert mask_budget(10, current_macs=100, target_macs=50.0, granularity=4) == 14
    assert mask_budget(10, current_macs=50, target_macs=50.0, granularity=4) is None


def test_channel_scores_rms_over_compactors_and_row_maps():
    a = torch.tensor([3.0, 0.0, 1.0])
    b = torch.tensor([4.0, 0.0, 1.0])
    every = torch.arange(3)
    s = channel_scores(3, [(every, a), (every, b)])
    assert torch.allclose(s, torch.tensor([12.5**0.5, 0.0, 1.0], dtype=torch.float64))
    split = channel_scores(
        4, [(torch.tensor([0, 3]), torch.tensor([1.0, 2.0])), (torch.tensor([2, 1]), torch.tensor([3.0, 4.0]))]
    )
    assert split.tolist() == [1.0, 4.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="no compactor row"):
        channel_scores(3, [(torch.tensor([0]), torch.tensor([1.0]))])


def test_config_schedule_and_validation():
    cfg = ResRepConfig(before_mask_iters=None, mask_interval=200)
    assert cfg.mask_start(iters_per_epoch=781) == 3905
    assert [i for i in range(3900, 4400) if cfg.is_mask_update(i, 781)] == [4105, 4305]
    assert not ResRepConfig(before_mask_iters=0, mask_interval=5).is_mask_update(0, None)
    stopped = ResRepConfig(before_mask_iters=10, mask_interval=5, mask_stop_iters=25)
    assert [i for i in range(60) if stopped.is_mask_update(i, None)] == [15, 20, 25]
    with pytest.raises(ValueError, match="mask_stop_iters"):
        ResRepConfig(mask_stop_iters=-1)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        cfg.mask_start(None)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="flops_target"):
            ResRepConfig(flops_target=bad)
    with pytest.raises(ValueError, match="mode"):
        ResRepConfig(mode="all")
