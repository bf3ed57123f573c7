"""`ResRep` on real (small) networks: compactor placement, optimizer groups, rule, schedule, state."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apps.engine.models import DigitsResNet
from apps.resrep import ResRep, ResRepConfig, prune
from apps.resrep.method import Compacted
from reparam.graph import GraphTraceError
from reparam.ops.blocks import Compactor


def digits_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsResNet(width=8).double()


X = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_compactors_on_every_producer_and_identity_at_init():
    model = digits_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rr = ResRep(model, X, ResRepConfig(before_mask_iters=0))
    # residual mode: stem, both stage streams (with the projection) and the block internals
    producers = {p.module for g in rr.groups for p in g.producers}
    assert {
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv2",
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
    } <= producers
    assert {s.module for s in rr.sites} == producers
    for site in rr.sites:
        wrapper = rr.model.get_submodule(site.host)
        assert isinstance(wrapper, Compacted) and isinstance(wrapper.compactor, Compactor)
        assert site.norm is not None  # every producer here has its BN; the compactor follows it
    model.eval(), rr.model.eval()
    assert torch.equal(model(X), rr.model(X))  # identity compactors: the very same function
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert rr.macs(masked=True) == rr.macs(masked=False) == rr.base_macs > 0


def test_paper_mode_keeps_residual_groups_whole():
    rr = ResRep(digits_net(), X, ResRepConfig(mode="paper", flops_target=0.8, before_mask_iters=0))
    assert all(len(g.producers) == 1 for g in rr.groups)
    assert {s.module for s in rr.sites} == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"}
    assert any("paper" in r for r in rr.skipped.values())


def test_param_groups_follow_the_recipe():
    cfg = ResRepConfig(
        recipe="paper", lr=0.05, weight_decay=3e-4, momentum=0.8, compactor_momentum=0.99, bias_lr_factor=2.0
    )
    rr = ResRep(digits_net(), X, cfg)
    groups = {g["name"]: g for g in rr.param_groups()}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in rr.model.parameters())  # every tensor exactly once
    assert groups["compactor"]["momentum"] == 0.99 and groups["compactor"]["weight_decay"] == 0
    assert len(groups["compactor"]["params"]) == len(rr.sites)
    assert groups["bias"]["lr"] == pytest.approx(0.1) and groups["bias"]["weight_decay"] == 0
    assert groups["norm"]["weight_decay"] == 0 and groups["norm"]["momentum"] == 0.8
    assert groups["weight"]["weight_decay"] == 3e-4 and groups["weight"]["lr"] == 0.05
    bn_weights = {id(m.weight) for m in rr.model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in groups["norm"]["params"]} == bn_weights
    torch.optim.SGD(rr.param_groups(), lr=cfg.lr)  # accepted as is


def test_after_backward_masks_task_gradient_and_adds_penalty():
    rr = ResRep(digits_net(), X, ResRepConfig(recipe="paper", lasso_strength=0.5))
    gid = rr.groups[0].id
    keep = torch.ones_like(rr.masks[gid])
    keep[0] = False
    rr.set_masks({**rr.masks, gid: keep})
    loss = rr.model(X).square().mean()
    loss.backward()
    raw = {s: c.weight.grad.clone() for s, c in rr.compactors()}
    others = {n: p.grad.clone() for n, p in rr.model.named_parameters() if "compactor" not in n}
    rr.after_backward()
    for site, c in rr.compactors():
        k = rr.row_keep(site).double().reshape(-1, 1, 1, 1)
        expected = k * raw[site] + 0.5 * c.weight.detach()  # identity rows have unit norm
        assert torch.allclose(c.weight.grad, expected)
        assert c.mask.tolist() == k.flatten().tolist()
    for n, p in rr.model.named_parameters():
        if "compactor" not in n:
            assert torch.equal(p.grad, others[n])


def train(rr: ResRep, steps: int, x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, int]]:
    """Plain SGD with the hooks; returns (masked channels, masked MACs) after every step."""
    opt = torch.optim.SGD(rr.param_groups(), lr=rr.config.lr)
    trace = []
    for it in range(steps):
        opt.zero_grad()
        F.cross_entropy(rr.model(x), y).backward()
        rr.after_backward()
        opt.step()
        rr.after_step(it)
        trace.append((sum(int((~m).sum()) for m in rr.masks.values()), rr.macs()))
    return trace


def test_schedule_grows_by_granularity_until_the_target_then_holds():
    cfg = ResRepConfig(
        recipe="paper",
        flops_target=0.6,
        before_mask_iters=1,
        mask_interval=2,
        begin_granularity=4,
        lasso_strength=1e-2,
        lr=0.05,
    )
    rr = ResRep(digits_net(), X, cfg)
    target = cfg.flops_target * rr.base_macs
    steps = 24
    history = [(0, rr.base_macs)] + train(rr, steps, X, torch.arange(4) % 10)
    for it in range(steps):  # history[it + 1] is after after_step(it)
        (before, macs_before), (after, macs_after) = history[it], history[it + 1]
        if it < 3 or (it - 1) % 2:
            assert (after, macs_after) == (before, macs_before)  # masks change only on schedule
        elif macs_before > target:
            assert after <= before + 4  # at most begin_granularity more per round
        else:
            assert macs_after <= target  # once met, the target holds (channels may swap)
    assert history[4][0] > 0 and history[-1][1] <= target


def test_round_to_keeps_every_width_a_multiple_and_converts():
    torch.manual_seed(0)
    rr = ResRep(
        DigitsResNet(width=16).double(),
        X,
        ResRepConfig(recipe="paper", flops_target=0.5, begin_granularity=10**6, round_to=8),
    )
    assert {g.multiple for g in rr.groups} == {8}
    with torch.no_grad():
        for _, compactor in rr.compactors():
            compactor.weight.mul_(torch.rand(compactor.weight.shape[0], 1, 1, 1) + 0.5)
    rr.update_masks()
    widths = rr.group_widths()
    assert rr.macs() <= 0.5 * rr.base_macs and all(w % 8 == 0 and w > 0 for w in widths.values())
    with pytest.warns(RuntimeWarning, match="had not decayed"):
        deploy, report = rr.convert()
    assert report.max_rel_error <= 1e-10
    assert all(report.widths_after[site.module] % 8 == 0 for site in rr.sites)


def test_masks_are_recomputed_from_all_ones():
    """A channel masked earlier comes back when its rows are now among the strongest (no stale masks)."""
    rr = ResRep(
        digits_net(), X, ResRepConfig(recipe="paper", flops_target=0.9, before_mask_iters=0, begin_granularity=4)
    )
    group = rr.groups[0]
    stale = torch.ones(group.size, dtype=torch.bool)
    stale[0] = False
    rr.set_masks({**rr.masks, group.id: stale})
    with torch.no_grad():
        for site, c in rr.compactors():
            c.weight.mul_(torch.linspace(0.5, 1.0, c.channels, dtype=c.weight.dtype).reshape(-1, 1, 1, 1))
            for gid, rows, channels in site.slices:
                if gid == group.id:
                    c.weight[rows[channels == 0]] *= 10  # channel 0 of the group is now the strongest
    rr.update_masks()
    assert bool(rr.masks[group.id][0])
    assert 0 < sum(int((~m).sum()) for m in rr.masks.values()) <= 1 + 4  # the budget: masked + granularity


def test_state_dict_round_trip_weights_only():
    cfg = ResRepConfig(recipe="paper", flops_target=0.6, before_mask_iters=0, mask_interval=1, lasso_strength=1e-2)
    rr = ResRep(digits_net(), X, cfg)
    train(rr, 3, X, torch.arange(4))
    buf = io.BytesIO()
    torch.save({"rr": rr.state_dict(), "model": rr.model.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = ResRep(digits_net(), X, cfg)
    other.model.load_state_dict(state["model"])
    other.load_state_dict(state["rr"])
    assert other.iteration == rr.iteration == 2
    assert all(torch.equal(other.masks[g], rr.masks[g]) for g in rr.masks)
    assert other.widths() == rr.widths() and other.macs() == rr.macs() < rr.base_macs
    wider = ResRep(DigitsResNet(width=16).double(), X, cfg)
    with pytest.raises(ValueError, match="do not fit"):
        wider.load_state_dict(state["rr"])


def test_restoring_a_paper_run_keeps_the_momentum_of_its_masked_rows():
    """The order a resumed run restores in (model, optimizer, then the hooks) must leave the optimizer's
    momentum as saved: the paper recipe's masked rows carry lasso momentum, and the resumed run must
    continue exactly as the uninterrupted one."""
    cfg = ResRepConfig(recipe="paper", flops_target=0.6, before_mask_iters=0, mask_interval=1, lasso_strength=1e-2)
    y = torch.arange(4)

    def steps(rr, opt, start, n):
        for it in range(start, start + n):
            opt.zero_grad()
            F.cross_entropy(rr.model(X), y).backward()
            rr.after_backward()
            opt.step()
            rr.after_step(it)

    rr = ResRep(digits_net(), X, cfg)
    opt = rr.optimizer()
    steps(rr, opt, 0, 4)
    buf = io.BytesIO()
    torch.save({"model": rr.model.state_dict(), "opt": opt.state_dict(), "rr": rr.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    masked = [(s, c) for s, c in rr.compactors() if not rr.row_keep(s).all()]
    assert masked and all(bool(opt.state[c.weight]["momentum_buffer"][~rr.row_keep(s)].ne(0).any()) for s, c in masked)

    other = ResRep(digits_net(), X, cfg)
    other_opt = other.optimizer()
    other.model.load_state_dict(saved["model"])
    other_opt.load_state_dict(saved["opt"])
    other.load_state_dict(saved["rr"])
    for (_, a), (_, b) in zip(rr.compactors(), other.compactors()):
        assert torch.equal(other_opt.state[b.weight]["momentum_buffer"], opt.state[a.weight]["momentum_buffer"])
    steps(rr, opt, 4, 3)
    steps(other, other_opt, 4, 3)
    for k, v in rr.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[k], v), k


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="out of reach"):
        ResRep(digits_net(), X, ResRepConfig(mode="paper", flops_target=0.05))

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return self.conv(-x)

    with pytest.raises(GraphTraceError):
        ResRep(Untraceable(), torch.randn(1, 1, 8, 8), ResRepConfig())
    rr = ResRep(digits_net(), X, ResRepConfig(recipe="paper"))  # before_mask_iters=None needs iters_per_epoch
    with pytest.raises(ValueError, match="iters_per_epoch"):
        rr.after_step(0)
    for recipe in ("auto", "budget"):  # both need the run's length
        with pytest.raises(ValueError, match="total_iters"):
            ResRep(digits_net(), X, ResRepConfig(recipe=recipe)).param_groups()


def test_one_call_prune_trains_and_converts():
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen))
    model = DigitsResNet(width=4)
    cfg = ResRepConfig(
        recipe="paper", flops_target=0.7, before_mask_iters=1, mask_interval=1, begin_granularity=8, lasso_strength=1e-2
    )
    with pytest.warns(RuntimeWarning):  # four steps are too few for masked rows to decay
        deploy, report = prune(
            model, DataLoader(data, batch_size=8), epochs=1, config=cfg, device="cpu", progress=False
        )
    assert report.macs_after <= 0.7 * report.macs_before and report.max_rel_error <= report.tolerance
    assert deploy(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with warnings.catch_warnings():  # the default recipe: the same run converts with no warning at all
        warnings.simplefilter("error")
        deploy, report = prune(
            model,
            DataLoader(data, batch_size=8),
            epochs=3,
            config=ResRepConfig(flops_target=0.7),
            device="cpu",
            progress=False,
        )
    assert report.largest_removed_norm == 0.0 and report.macs_after <= 0.7 * report.macs_before


def test_paper_mode_on_resnet56_matches_the_paper_targets():
    from apps.engine.models import CifarResNet

    rr = ResRep(CifarResNet(56, shortcut="B"), torch.randn(1, 3, 8, 8), ResRepConfig(mode="paper"))
    assert len(rr.sites) == 27 and sum(g.size for g in rr.groups) == 1008  # 9x16 + 9x32 + 9x64
    assert {s.module for s in rr.sites} == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)}
    residual = ResRep(CifarResNet(56, shortcut="B"), torch.randn(1, 3, 8, 8), ResRepConfig())
    assert len(residual.sites) == 57  # every conv: stem, both projections and all 54 block convs
