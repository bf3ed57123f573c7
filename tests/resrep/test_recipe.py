"""The two ResRep recipes: the paper's constants, the budget recipe's forgetting, masks, penalties and lr shape,
the auto switch, and a missed target."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from apps.engine.models import DigitsResNet
from apps.resrep import ResRep, ResRepConfig, TargetMissedError
from apps.resrep.recipe import paper_min_iters, resolve

X = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
Y = torch.arange(16) % 10


def budget(total: int = 60, **kw) -> ResRep:
    torch.manual_seed(0)
    cfg = ResRepConfig(recipe="budget", flops_target=0.5, lr=0.05, **kw)
    return ResRep(DigitsResNet(width=8).double(), X[:2], cfg, total_iters=total)


def step(rr: ResRep, opt, sched, it: int) -> None:
    opt.zero_grad()
    F.cross_entropy(rr.model(X), Y).backward()
    rr.after_backward()
    opt.step()
    sched.step()
    rr.after_step(it)


def masked_rows(rr: ResRep) -> dict[str, torch.Tensor]:
    return {s.module: c.weight.detach()[~rr.row_keep(s)].flatten(1) for s, c in rr.compactors()}


def test_paper_recipe_constants_match_the_spec():
    cfg = ResRepConfig(recipe="paper")
    assert (
        cfg.flops_target,
        cfg.lasso_strength,
        cfg.mask_interval,
        cfg.before_mask_epochs,
        cfg.begin_granularity,
        cfg.num_at_least,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
        cfg.threshold,
    ) == (0.471, 1e-4, 200, 5, 4, 1, 0.01, 0.9, 1e-4, 1e-5)
    plan = resolve(cfg, None, 781)
    assert (
        plan.recipe,
        plan.bias_lr_factor,
        plan.compactor_momentum,
        plan.residual_lasso,
        plan.train_residual_compactors,
        plan.score,
    ) == ("paper", 2.0, 0.99, True, True, "norm")
    assert not plan.cumulative
    assert cfg.mask_start(781) == 3905 and not plan.is_mask_update(3905) and plan.is_mask_update(4105)
    assert not plan.is_mask_update(4106) and plan.is_mask_update(4305)
    groups = {g["name"]: g for g in ResRep(DigitsResNet(width=8).double(), X[:2], cfg).param_groups()}
    assert groups["compactor"]["momentum"] == 0.99 and groups["compactor"]["weight_decay"] == 0
    assert groups["bias"]["lr"] == pytest.approx(0.02) and groups["weight"]["weight_decay"] == 1e-4
    full = resolve(cfg, 374_880, 781)
    assert full.lr_factor(0) == 1.0 and full.lr_factor(374_880 // 2) == pytest.approx(0.5)
    assert full.lr_factor(374_880) == pytest.approx(0.0, abs=1e-12)
    assert full.lasso(10**6) == 1e-4  # the paper never turns its penalty off


def test_budget_plan_is_front_loaded_and_ends_at_the_target():
    plan = resolve(ResRepConfig(recipe="budget", flops_target=0.4), 1000, 100)
    assert (plan.mask_start, plan.mask_end, plan.freeze, plan.forget_iters) == (20, 250, 300, 50)
    goals = [plan.rounds[i] for i in sorted(plan.rounds)]
    assert len(goals) == 20 and max(plan.rounds) == 250 and goals[-1] == pytest.approx(0.4)
    assert all(a > b for a, b in zip(goals, goals[1:]))
    removed = [1.0 - g for g in goals]  # cubic: half of the channels' MACs go within the first 4 rounds
    assert removed[3] >= 0.45 * removed[-1]
    assert [plan.lr_factor(t) for t in (0, 299, 300)] == [1.0, 1.0, 1.0]
    assert plan.lr_factor(650) == pytest.approx(0.5) and plan.lr_factor(1000) == pytest.approx(0.0, abs=1e-12)
    assert plan.lasso(299) == 1e-4 and plan.lasso(300) == 0.0
    fade = plan.fade(torch.tensor([0, 25, 49, 50, 80]))
    assert fade[:3].tolist() == pytest.approx([1.0, 0.5, 0.02]) and fade[3:].tolist() == [0.0, 0.0]  # exact zeros


def test_forgetting_reaches_exact_zero_on_the_stated_iteration_and_conversion_is_exact():
    rr = budget(total=60)
    plan = rr.plan
    opt, seen = rr.optimizer(), {}
    sched = rr.lr_scheduler(opt)
    masks_before = {g: m.clone() for g, m in rr.masks.items()}
    for it in range(60):
        step(rr, opt, sched, it)
        for gid, m in rr.masks.items():
            assert not bool((m & ~masks_before[gid]).any())  # cumulative: a masked channel never returns
        masks_before = {g: m.clone() for g, m in rr.masks.items()}
        if it > plan.mask_end:
            assert rr.iteration == it and not plan.is_mask_update(it)
        for gid, at in rr.masked_at.items():
            for c in (at >= 0).nonzero().flatten().tolist():
                seen.setdefault((gid, c), int(at[c]))
        for site, c in rr.compactors():  # every masked row: zero exactly from masked_at + forget_iters on
            for gid, rows, channels in site.slices:
                at = rr.masked_at[gid][channels]
                rows_w = c.weight.detach()[rows].flatten(1)
                done = (at >= 0) & (it - at >= plan.forget_iters)
                fading = (at >= 0) & (it - at < plan.forget_iters) & (it - at >= 0)
                assert bool((rows_w[done] == 0).all())
                assert bool((rows_w[fading].abs().sum(1) > 0).all())
        if it == plan.freeze - 1:
            assert max(float(r.abs().max()) if r.numel() else 0.0 for r in masked_rows(rr).values()) == 0.0
    assert seen and max(seen.values()) <= plan.mask_end  # every channel was masked by the last round
    assert rr.macs() <= rr.target_macs
    rr.check_target()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "had not decayed", no inexact warning
        deploy, report = rr.convert()
    assert report.largest_removed_norm == 0.0 and report.max_rel_error <= 1e-10
    assert report.max_rel_error_vs_trained <= 1e-10  # the deploy model is the trained one


@pytest.mark.parametrize("train_residual", [None, True])
def test_budget_gradients_masked_rows_none_kept_rows_light_and_penalty_off_after_freeze(train_residual):
    rr = budget(total=40, train_residual_compactors=train_residual)
    assert rr.plan.train_residual_compactors is bool(train_residual)
    opt = rr.optimizer()
    sched = rr.lr_scheduler(opt)
    for it in range(rr.plan.mask_end + 1):
        step(rr, opt, sched, it)
    assert any(not m.all() for m in rr.masks.values())
    for phase in ("before", "after"):
        if phase == "after":
            for it in range(rr.plan.mask_end + 1, rr.plan.freeze + 1):
                step(rr, opt, sched, it)
        opt.zero_grad()
        F.cross_entropy(rr.model(X), Y).backward()
        raw = {s.module: c.weight.grad.clone() for s, c in rr.compactors()}
        rr.after_backward()
        for site, c in rr.compactors():
            keep = rr.row_keep(site)
            g, w = c.weight.grad.flatten(1), c.weight.detach().flatten(1)
            assert bool((g[~keep] == 0).all())  # masked rows: neither task gradient nor penalty
            single = rr._lasso_rows[site.module] & keep
            lasso = 1e-4 if phase == "before" else 0.0
            trained = (single | bool(train_residual))[keep].double().reshape(-1, 1)
            expected = raw[site.module].flatten(1)[keep] * trained + lasso * (w / w.norm(dim=1, keepdim=True))[
                keep
            ] * single[keep].double().reshape(-1, 1)
            assert torch.allclose(g[keep], expected, rtol=1e-12, atol=1e-15)


def test_budget_residual_compactors_keep_their_kept_rows_identity():
    """Budget recipe: a residual-coupled compactor's kept rows never move (no gradient, no decay), so the
    stream is only ever cut; single-producer rows train; the paper recipe trains both."""
    rr = budget(total=40)
    start = {s.module: c.weight.detach().clone() for s, c in rr.compactors()}
    opt = rr.optimizer()
    sched = rr.lr_scheduler(opt)
    for it in range(40):
        step(rr, opt, sched, it)
    residual = single = 0
    for site, c in rr.compactors():
        keep, lone = rr.row_keep(site), rr._lasso_rows[site.module]
        w, w0 = c.weight.detach().flatten(1), start[site.module].flatten(1)
        if bool((keep & ~lone).any()):
            assert torch.equal(w[keep & ~lone], w0[keep & ~lone])
            residual += 1
        if bool((keep & lone).any()):
            assert not torch.equal(w[keep & lone], w0[keep & lone])
            single += 1
    assert residual and single
    rr = budget(total=40, train_residual_compactors=True)
    opt = rr.optimizer()
    sched = rr.lr_scheduler(opt)
    for it in range(3):
        step(rr, opt, sched, it)
    moved = [
        not torch.equal(
            c.weight.detach().flatten(1)[~rr._lasso_rows[s.module]],
            torch.eye(c.weight.shape[0], dtype=c.weight.dtype)[~rr._lasso_rows[s.module]],
        )
        for s, c in rr.compactors()
        if bool((~rr._lasso_rows[s.module]).any())
    ]
    assert moved and all(moved)


def test_masking_clears_the_momentum_of_the_masked_rows():
    rr = budget(total=60)
    opt = rr.optimizer()
    sched = rr.lr_scheduler(opt)
    for it in range(rr.plan.mask_start):
        step(rr, opt, sched, it)
    first = min(rr.plan.rounds)
    for it in range(rr.plan.mask_start, first):
        step(rr, opt, sched, it)
    momentum = {s.module: opt.state[c.weight]["momentum_buffer"].clone() for s, c in rr.compactors()}
    step(rr, opt, sched, first)  # the first round masks channels
    newly = [(s, c) for s, c in rr.compactors() if bool((~rr.row_keep(s)).any())]
    assert newly
    for site, c in newly:
        buf = opt.state[c.weight]["momentum_buffer"]
        assert bool((buf[~rr.row_keep(site)] == 0).all())
        assert not torch.equal(buf, momentum[site.module])


def test_paper_masking_keeps_the_momentum_of_the_masked_rows():
    """The spec: under the paper recipe momentum buffers are not cleared when a mask turns on."""
    torch.manual_seed(0)
    cfg = ResRepConfig(recipe="paper", flops_target=0.5, before_mask_iters=2, mask_interval=1, lasso_strength=1e-2)
    rr = ResRep(DigitsResNet(width=8).double(), X[:2], cfg)
    opt = rr.optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    for it in range(4):  # the first mask round runs after iteration 3
        step(rr, opt, sched, it)
    masked = [(s, c) for s, c in rr.compactors() if bool((~rr.row_keep(s)).any())]
    assert masked
    for site, c in masked:
        rows = opt.state[c.weight]["momentum_buffer"][~rr.row_keep(site)].flatten(1)
        assert bool(rows.norm(dim=1).gt(0).all())


def test_taylor_score_is_the_first_order_loss_change_of_removing_a_channel():
    """t_c = Σ Q_ci ∂L/∂Q_ci = dL/dα at α = 1 when channel c's compactor rows are scaled by α."""
    rr = budget(total=100, score_momentum=0.0)
    rr.iteration = rr.plan.mask_start  # a step whose gradient feeds the scores
    rr.model.zero_grad()
    F.cross_entropy(rr.model(X), Y).backward()
    rr.after_backward()
    group = max(rr.groups, key=lambda g: len(g.producers))  # a residual-coupled group: several compactors
    assert len(group.producers) > 1
    for c in (0, group.size - 1):

        def loss_at(alpha: float, c: int = c) -> float:
            with torch.no_grad():
                saved = [(comp, comp.weight.clone()) for _, comp in rr.compactors()]
                for site, comp in rr.compactors():
                    for gid, rows, channels in site.slices:
                        if gid == group.id:
                            comp.weight[rows[channels == c]] *= alpha
                out = float(F.cross_entropy(rr.model(X), Y))
                for comp, w in saved:
                    comp.weight.copy_(w)
            return out

        h = 1e-6
        derivative = (loss_at(1 + h) - loss_at(1 - h)) / (2 * h)
        assert float(rr.taylor[group.id][c]) == pytest.approx(derivative**2, rel=1e-5, abs=1e-16)


def test_a_step_with_non_finite_gradients_leaves_the_taylor_scores_alone():
    """Under fp16 a GradScaler skips an overflow step after the hooks saw its inf/NaN gradients."""
    rr = budget(total=100)
    rr.iteration = rr.plan.mask_start
    rr.model.zero_grad()
    F.cross_entropy(rr.model(X), Y).backward()
    rr.after_backward()
    before = {g: t.clone() for g, t in rr.taylor.items()}
    assert any(bool(t.ne(0).any()) for t in before.values())
    rr.model.zero_grad()
    F.cross_entropy(rr.model(X), Y).backward()
    next(iter(rr.compactors()))[1].weight.grad[0, 0] = math.inf
    rr.after_backward()
    assert all(torch.equal(rr.taylor[g], t) for g, t in before.items())


def test_the_paper_recipe_collects_taylor_scores_when_asked():
    rr = ResRep(DigitsResNet(width=8).double(), X[:2], ResRepConfig(recipe="paper", score="taylor"))
    rr.model.zero_grad()
    F.cross_entropy(rr.model(X), Y).backward()
    rr.after_backward()
    scores = rr.channel_scores()
    assert all(bool(s.gt(0).all()) for s in scores.values())


@pytest.mark.parametrize("score", ["taylor", "fused", "norm"])
def test_every_score_meets_the_target_exactly(score):
    rr = budget(total=30, score=score)
    opt = rr.optimizer()
    sched = rr.lr_scheduler(opt)
    for it in range(30):
        step(rr, opt, sched, it)
    rr.check_target()
    scores = rr.channel_scores()
    assert set(scores) == set(rr.masks)
    assert all(
        s.dtype == torch.float64 and bool(torch.isfinite(s).all()) and bool((s >= 0).all()) for s in scores.values()
    )


def test_auto_switches_by_the_run_length():
    torch.manual_seed(0)
    net = DigitsResNet(width=8).double()
    short = ResRep(net, X[:2], ResRepConfig(), iters_per_epoch=100, total_iters=5_000)
    assert short.plan.recipe == "budget"
    needed = paper_min_iters(short.config, short._channels_to_mask(), 100)
    assert needed == pytest.approx(500 + math.ceil(short._channels_to_mask() / 4) * 200 + 0.01 / 1e-6)
    long = ResRep(net, X[:2], ResRepConfig(), iters_per_epoch=100, total_iters=math.ceil(needed / 0.3))
    edge = ResRep(net, X[:2], ResRepConfig(), iters_per_epoch=100, total_iters=math.floor(needed / 0.3) - 1)
    assert (long.plan.recipe, edge.plan.recipe) == ("paper", "budget")
    forced = ResRep(net, X[:2], ResRepConfig(auto_switch_iters=4_000), iters_per_epoch=100, total_iters=5_000)
    assert forced.plan.recipe == "paper"
    assert short.param_groups()[0]["lr"] == 0.01  # the recipe's values fill what the config leaves at None
    assert {g["name"]: g["momentum"] for g in short.param_groups()}["compactor"] == 0.9


def test_missed_target_says_by_how_much_and_what_to_change():
    rr = ResRep(
        DigitsResNet(width=8).double(),
        X[:2],
        ResRepConfig(recipe="paper", flops_target=0.5),
        iters_per_epoch=10,
        total_iters=10,
    )
    with pytest.raises(TargetMissedError, match=r"above flops_target=0\.5 by 0\.5000.*recipe='budget'"):
        rr.check_target()
    early = budget(total=60)
    opt = early.optimizer()
    sched = early.lr_scheduler(opt)
    for it in range(min(early.plan.rounds) + 1):
        step(early, opt, sched, it)
    with pytest.raises(TargetMissedError, match="train all of it"):
        early.check_target()


def test_bad_recipe_settings_are_refused():
    with pytest.raises(ValueError, match="recipe must be one of"):
        ResRepConfig(recipe="fast")
    with pytest.raises(ValueError, match="mask_start_fraction < mask_end_fraction < freeze_fraction"):
        ResRepConfig(mask_end_fraction=0.4, freeze_fraction=0.3)
    with pytest.raises(ValueError, match="score must be one of"):
        ResRepConfig(score="l1")
    with pytest.raises(ValueError, match="at least 3 iterations"):
        resolve(ResRepConfig(recipe="budget"), 2, 1)


def test_budget_scores_trade_importance_against_the_macs_a_channel_costs():
    rr = budget(total=60, score="norm")
    cost = rr.channel_costs()
    widths = rr.group_widths()
    for gid, w in widths.items():
        assert cost[gid] == rr.graph.macs(widths) - rr.graph.macs({**widths, gid: w - 1}) > 0
    mean = sum(cost.values()) / len(cost)
    scores = rr.channel_scores()  # identity compactors: every raw row norm is 1, so only the cost differs
    for gid, s in scores.items():
        assert torch.allclose(s, torch.full_like(s, mean / cost[gid]))
    plain = ResRep(
        DigitsResNet(width=8).double(),
        X[:2],
        ResRepConfig(recipe="budget", score="norm", score_per_mac=False),
        total_iters=60,
    )
    assert all(torch.allclose(s, torch.ones_like(s)) for s in plain.channel_scores().values())
    paper = ResRep(DigitsResNet(width=8).double(), X[:2], ResRepConfig(recipe="paper"))
    assert all(torch.allclose(s, torch.ones_like(s)) for s in paper.channel_scores().values())  # raw norms


def test_round_average_spans_the_iterations_between_two_mask_rounds():
    """With score_round_average the Taylor average's horizon 1/(1-β) is the round interval where that is
    longer than 1/(1-score_momentum); the Taylor update then uses exactly that β."""
    long = budget(total=4000, score_round_average=True)
    rounds = sorted(long.plan.rounds)
    interval = (long.plan.mask_end - long.plan.mask_start) / long.config.mask_rounds
    assert 1.0 / (1.0 - long.plan.score_momentum) == pytest.approx(interval)
    assert all(abs((b - a) - interval) <= 1 for a, b in zip(rounds, rounds[1:]))
    assert budget(total=4000).plan.score_momentum == 0.95  # off by default
    short = budget(total=200, score_round_average=True)  # rounds ~2 iterations apart: 0.95 averages longer
    assert short.plan.score_momentum == 0.95
    rr = long
    rr.iteration = rr.plan.mask_start
    rr.model.zero_grad()
    F.cross_entropy(rr.model(X), Y).backward()

    beta, plan = long.plan.score_momentum, long.plan

    def accumulate(beta: float) -> dict[int, torch.Tensor]:
        for t in rr.taylor.values():
            t.fill_(1.0)
        fixed = dataclasses.replace(plan.config, score_momentum=beta, score_round_average=False)
        rr._plan = dataclasses.replace(plan, config=fixed)
        rr._accumulate_taylor()
        return {gid: t.clone() for gid, t in rr.taylor.items()}

    fresh, averaged = accumulate(0.0), accumulate(beta)
    for gid, t in averaged.items():
        assert torch.allclose(t, beta + (1 - beta) * fresh[gid])
        assert bool(fresh[gid].ne(1.0).any())
