"""Every torchvision classifier: trace, prune about 30% of every prunable group, run; and exactness.

The default suite runs a representative handful; `make test-slow` runs the whole zoo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from reparam.graph import prune, trace

from .helpers import bn_groups, max_rel_err, random_keep, randomize_bn, zero_channels

ALL = torchvision.models.list_models(module=torchvision.models)
FAST = {
    "resnet18",
    "mobilenet_v2",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "efficientnet_b0",
    "regnet_x_400mf",
    "googlenet",
    "swin_t",
    "vit_b_32",
}


def make(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Random-init model and the smallest convenient input it accepts."""
    if name == "densenet_small":  # torchvision's DenseNet class at a small configuration
        torch.manual_seed(0)
        net = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, num_classes=10)
        return net.eval(), torch.randn(1, 3, 32, 32)
    kwargs, size = {}, 32
    if name in ("googlenet", "inception_v3"):
        kwargs = dict(aux_logits=False, init_weights=False)
        size = 75 if name == "inception_v3" else 32
    elif name == "alexnet":
        size = 64
    elif name.startswith("vit_"):
        size = 28 if name.endswith("_14") else 32
        kwargs = dict(image_size=size)
    elif name.startswith("maxvit"):
        size = 224
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs).eval(), torch.randn(1, 3, size, size)


def counted_macs(model, x) -> int:
    with FlopCounterMode(display=False) as counter:  # grad on: fused no-grad fast paths hide their MACs
        model(x)
    return counter.get_total_flops() // 2


def check_model(name: str) -> None:
    model, x = make(name)
    g = trace(model, x)
    assert all(grp.prunable or grp.reason for grp in g.groups)
    prunable = [grp for grp in g.groups if grp.prunable]
    assert prunable, f"{name}: nothing prunable: {[grp.reason for grp in g.groups]}"
    keep = random_keep(g, 0.7, np.random.default_rng(0))
    widths = {k: len(v) for k, v in keep.items()}
    small = prune(model, x, keep, graph=g)
    with torch.no_grad():
        y, y_small = model(x), small(x)
    assert y_small.shape == y.shape and torch.isfinite(y_small).all()
    assert sum(p.numel() for p in small.parameters()) == g.params(widths) < g.params()
    assert counted_macs(small, x) == g.macs(widths) < g.macs()
    # exactness: silence random channels of every BN-produced group, remove exactly those
    if bn_groups(g):
        randomize_bn(model, torch.Generator().manual_seed(0))
        keep = zero_channels(model, g, np.random.default_rng(1))
        with torch.no_grad():
            y = model(x)
            assert max_rel_err(prune(model, x, keep, graph=g)(x), y) <= 1e-5


@pytest.mark.parametrize("name", sorted(FAST | {"densenet_small"}))
def test_zoo_fast(name):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ALL) - FAST))
def test_zoo_all(name):
    check_model(name)
