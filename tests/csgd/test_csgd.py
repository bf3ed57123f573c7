"""C-SGD: clusters, the centripetal rule as the spec's matrix form, an exact merge on every kind of
coupling the graph knows, convergence under the shared engine, and clear refusals."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from apps.csgd import CSGD, CSGDConfig, UnconvergedError, even_clusters, kmeans_clusters
from apps.csgd.clusters import merge_costs
from apps.engine.groups import widths_for_target
from apps.engine.loop import fit
from apps.engine.models import CifarResNet as PublishedResNet
from tests.graph.nets import TRICKY


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_even_clusters_cover_every_channel_with_sizes_one_apart(case):
    n, k = case
    clusters = even_clusters(n, k)
    assert sorted(i for c in clusters for i in c) == list(range(n)) and len(clusters) == k
    assert max(map(len, clusters)) - min(map(len, clusters)) <= 1


def test_kmeans_is_seeded_non_empty_and_finds_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 10
    labels = rng.integers(0, 3, 30)
    labels[:3] = [0, 1, 2]
    rows = centres[labels] + rng.normal(size=(30, 5)) * 0.01
    clusters = kmeans_clusters(rows, 3, seed=0)
    assert clusters == kmeans_clusters(rows, 3, seed=0)
    assert sorted(sorted(c) for c in clusters) == sorted(sorted(np.flatnonzero(labels == i).tolist()) for i in range(3))
    assert len(kmeans_clusters(np.zeros((6, 2)), 4)) == 4  # identical rows: still 4 non-empty clusters
    with pytest.raises(ValueError, match="cannot make 7 clusters of 6 channels"):
        kmeans_clusters(np.zeros((6, 2)), 7)


def test_widths_meet_the_target_with_one_fraction_of_every_group():
    sizes = {0: 16, 1: 32}
    macs = lambda w: 10 * w[0] + 3 * w[1]  # noqa: E731
    widths = widths_for_target(sizes, {0: 1, 1: 1}, {0: 1, 1: 2}, macs, 0.5 * macs(sizes))
    assert macs(widths) <= 0.5 * macs(sizes) and widths[1] % 2 == 0
    with pytest.raises(ValueError, match="out of reach"):
        widths_for_target(sizes, {0: 16, 1: 32}, {}, macs, 1.0)


@given(st.integers(2, 24), st.integers(1, 12), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_merge_costs_ascend_price_duplicates_at_zero_and_ignore_scale(n, d, scale, seed):
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, d))
    rows[: n // 2] = rows[0]  # n // 2 identical rows: n // 2 - 1 merges for free
    costs = merge_costs(rows)
    assert costs.shape == (n,) and np.isinf(costs[-1]) and np.all(np.diff(costs[:-1]) >= 0)
    assert np.allclose(costs[: max(n // 2 - 1, 0)], 0.0, atol=1e-9)
    assert np.allclose(merge_costs(rows * scale)[:-1], costs[:-1], rtol=1e-6, atol=1e-9)


class _Chain(nn.Module):
    """Three 3x3 convs with batch norms; the middle one's 16 filters are 4 distinct ones, each 4 times."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)])
        self.convs.append(nn.Conv2d(16, 16, 3, padding=1))
        self.bns = nn.ModuleList([nn.BatchNorm2d(16) for _ in range(3)])
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.convs[1].weight.copy_(self.convs[1].weight[:4].repeat(4, 1, 1, 1))

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = bn(conv(x)).relu()
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("widths", ["redundancy", "uniform"])
def test_widths_meet_the_target_and_redundancy_removes_duplicates_first(widths):
    x = torch.randn(2, 3, 8, 8)
    cs = CSGD(_Chain().eval(), x, CSGDConfig(flops_target=0.35, widths=widths))
    by_producer = {g.producers[0].module: cs.widths[g.id] for g in cs.groups}
    assert cs.graph.macs(cs.widths) <= 0.35 * cs.base_macs
    if widths == "uniform":
        assert len(set(by_producer.values())) == 1
    if widths == "redundancy":  # the duplicated filters go first, down to the 4 distinct ones
        assert by_producer["convs.1"] == 4 and by_producer["convs.0"] == by_producer["convs.2"] == 16
    with pytest.raises(ValueError, match="out of reach"):
        CSGD(_Chain().eval(), x, CSGDConfig(flops_target=0.001, widths=widths))


def test_an_unknown_width_rule_is_refused():
    with pytest.raises(ValueError, match="widths"):
        CSGDConfig(widths="largest")


def _loss_step(cs: CSGD, x: torch.Tensor) -> None:
    cs.model.zero_grad(set_to_none=True)
    cs.model(x).square().mean().backward()


def test_the_rule_is_the_specs_matrix_form():
    """G̃ = M·G + (η·I + ε·(I − M))·W on every clustered kernel, M the block-averaging matrix."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    cs = CSGD(
        PublishedResNet(depth=20).train(), x, CSGDConfig(flops_target=0.5, centripetal_strength=0.3, center="mean")
    )
    _loss_step(cs, x)
    raw = {n: p.grad.clone() for n, p in cs.centripetal.items()}
    cs.after_backward()
    eta, eps = cs.config.weight_decay, cs.strength
    checked = 0
    for name, p in cs.centripetal.items():
        if p.ndim < 2 or len(cs._slices[name]) != 1:
            continue
        s = cs._slices[name][0]
        n = p.shape[0]
        assert sorted(s.rows.tolist()) == list(range(n))
        m = torch.zeros(n, n, dtype=torch.float64)
        for i, ci in zip(s.rows.tolist(), s.cluster.tolist()):
            for j, cj in zip(s.rows.tolist(), s.cluster.tolist()):
                m[i, j] = float(ci == cj) / int(s.count[ci])
        g, w = raw[name].double().reshape(n, -1), p.detach().double().reshape(n, -1)
        expected = m @ g + (eta * torch.eye(n, dtype=torch.float64) + eps * (torch.eye(n, dtype=torch.float64) - m)) @ w
        torch.testing.assert_close(p.grad.double().reshape(n, -1), expected, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked >= 10


def _identical_clusters(cs: CSGD) -> None:
    """Make every cluster's members identical (what training converges to)."""
    tensors = {**dict(cs.model.named_parameters()), **dict(cs.model.named_buffers())}
    with torch.no_grad():
        for name, slices in cs._slices.items():
            for s in slices:
                tensors[name].index_copy_(0, s.rows, tensors[name].index_select(0, s.source))


@pytest.mark.parametrize(
    "name", ["cifar_resnet", "concat_residual", "split", "flatten_linear", "shuffle", "pad_shortcut"]
)
def test_converged_clusters_merge_exactly_across_every_coupling(name):
    cls, shape = TRICKY[name]
    torch.manual_seed(0)
    model = cls().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(generator=gen)
                m.bias.normal_(generator=gen)
    x = torch.randn(shape)
    try:
        cs = CSGD(model, x, CSGDConfig(flops_target=0.6, clustering="even"))
    except ValueError as err:
        if "found no channel group" not in str(err):
            raise  # only a net with nothing to cluster may skip
        pytest.skip(f"nothing to cluster in {name}: {err}")
    _identical_clusters(cs)
    merged, report = cs.convert(x)
    assert report.max_rel_error <= 1e-10 and report.max_rel_error_vs_trained <= 1e-5 and report.spread <= 1e-6
    assert report.macs_after < report.macs_before and report.params_after < report.params_before
    with torch.no_grad():
        y = cs.model.eval()(x)
        assert float((merged(x) - y).abs().max() / y.abs().max()) <= 1e-5


def test_training_under_the_engine_converges_and_merges_within_float32():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    epochs = 60
    cfg = CSGDConfig(flops_target=0.5, spread_every=40)
    cs = CSGD(PublishedResNet(depth=20), x[:4], cfg, total_iters=epochs * len(loader))
    fit(cs.model, loader, None, epochs=epochs, optimizer=cs.optimizer(), hooks=cs, progress=False, device="cpu")
    merged, report = cs.convert(x[:8])
    assert (
        report.spread <= 1e-5
        and report.max_rel_error_vs_trained <= 1e-5
        and report.macs_after <= 0.5 * report.macs_before
    )
    steps, spreads = zip(*cs.summary()["spread_log"])  # the per-step diagnostic: every 40 steps, shrinking
    assert steps == (1, 40, 80, 120, 160, 200, 240) and spreads[0] > 1e-2 > 1e-5 >= spreads[-1]
    assert list(spreads) == sorted(spreads, reverse=True)


@pytest.mark.parametrize("momentum, ramp", [(0.5, 0.0), (0.9, 0.0), (0.9, 2.0)])
def test_the_budget_strength_collapses_the_clusters_on_its_timeline(momentum, ramp):
    """With no task gradient, the budget rule's ε shrinks the within-cluster differences by
    ``collapse_factor`` at ``collapse_fraction`` of the run under the optimizer C-SGD builds (momentum
    included), not much earlier and not later; ramped, the first half of the collapse shrinks them by
    only (1/2)³ of the total (in log), a gradual merge."""
    torch.manual_seed(0)
    cls, shape = TRICKY["cifar_resnet"]
    x = torch.randn(shape, dtype=torch.float64)  # float64: float32 cannot resolve a 1e-9 collapse
    total = 6000  # long enough that the ramp's last steps need no more than the cap
    cfg = CSGDConfig(flops_target=0.5, momentum=momentum, weight_decay=0.0, lr=0.02, collapse_ramp=ramp, spread_every=0)
    model = cls().double()
    with torch.no_grad():  # trained-looking norms: γ/β differ within every cluster and must collapse too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0.0, 0.5)
    cs = CSGD(model, x, cfg, total_iters=total)
    opt, start = cs.optimizer(), cs.spread()
    planned = int(cfg.collapse_fraction * total)
    log = {}
    for i in range(planned):
        for p in cs.model.parameters():
            p.grad = torch.zeros_like(p)
        cs.after_backward()
        opt.step()
        cs.after_step(i)
        if i + 1 in (planned // 2, planned):
            log[i + 1] = cs.spread() / start
    assert log[planned] <= 10 * cfg.collapse_factor, log[planned]
    half = math.log(log[planned // 2]) / math.log(cfg.collapse_factor)  # share of the collapse done by then
    assert (0.4 <= half <= 0.65) if ramp == 0 else (0.05 <= half <= 0.25), half


def test_an_unconverged_merge_is_refused_with_the_spread():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    cs = CSGD(PublishedResNet(depth=20).eval(), x, CSGDConfig(flops_target=0.5))
    with pytest.raises(UnconvergedError, match=r"have not converged.*deviation from its cluster mean .* train longer"):
        cs.convert(x)
    loud = CSGD(PublishedResNet(depth=20).eval(), x, CSGDConfig(flops_target=0.5, on_unconverged="warn"))
    with pytest.warns(RuntimeWarning, match="have not converged"):
        loud.convert(x)


def test_clusters_survive_a_checkpoint_round_trip():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    base = PublishedResNet(depth=20)  # a resumed run rebuilds C-SGD on the same base weights
    cs = CSGD(copy.deepcopy(base), x, CSGDConfig(flops_target=0.5))
    state = cs.state_dict()
    other = CSGD(copy.deepcopy(base), x, CSGDConfig(flops_target=0.5, cluster_seed=3))
    assert other.clusters != cs.clusters  # another seed, other clusters: the load has something to restore
    other.load_state_dict(state)
    assert other.clusters == cs.clusters
    # the rebuilt index tensors apply the same rule: identical weights and loss give identical gradients
    other.model.load_state_dict(cs.model.state_dict())
    for method in (cs, other):
        method.model.zero_grad()
        F.cross_entropy(method.model(x), torch.arange(2)).backward()
        method.after_backward()
    for (name, a), b in zip(cs.model.named_parameters(), other.model.parameters()):
        assert torch.equal(a.grad, b.grad), name
    with pytest.raises(ValueError, match="other channel groups"):
        other.load_state_dict({"clusters": {999: [[0]]}})


def test_a_group_that_cannot_be_clustered_says_why():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1)
            self.c, self.bn, self.d = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.d(self.bn(self.c(self.b(self.norm(self.a(x))))).relu())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cs = CSGD(Scaled().eval(), torch.randn(1, 3, 4, 4), CSGDConfig(flops_target=0.9))
    assert any("GroupNorm, which C-SGD cannot make channel-wise identical" in r for r in cs.skipped.values())
    with pytest.raises(ValueError, match="flops_target must lie in"):
        CSGDConfig(flops_target=1.5)


def _narrow_optimizer(model: nn.Module, cfg: CSGDConfig) -> torch.optim.SGD:
    """The optimizer C-SGD's groups give a plain model: kernels with decay η, vectors at the bias factor."""
    kernels = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": kernels, "weight_decay": cfg.weight_decay},
        {"params": vectors, "weight_decay": 0.0, "lr": cfg.lr * cfg.bias_lr_factor},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


@pytest.mark.parametrize("net", ["chain", "resnet20"])
@pytest.mark.parametrize("rule", ["sum", "mean"])
def test_collapsed_clusters_with_the_summed_gradient_train_as_the_merged_model(net, rule):
    """Collapsed clusters under ``cluster_gradient="sum"`` take the steps the narrow model takes (training-
    mode norms, momentum, decay inside and outside the rule); the spec's mean gradient does not."""
    torch.manual_seed(0)
    model = (_Chain() if net == "chain" else PublishedResNet(depth=20)).double().train()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    cfg = CSGDConfig(flops_target=0.5, clustering="even", cluster_gradient=rule, centripetal_strength=0.1, lr=0.05)
    cs = CSGD(model, x, cfg)
    _identical_clusters(cs)
    narrow, _ = cs.convert(x)
    narrow.train()
    wide_opt, narrow_opt = cs.optimizer(), _narrow_optimizer(narrow, cfg)
    for step in range(3):
        batch = torch.randn(8, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        _loss_step(cs, batch)
        cs.after_backward()
        wide_opt.step()
        narrow.zero_grad(set_to_none=True)
        narrow(batch).square().mean().backward()
        narrow_opt.step()
    merged, report = cs.convert(x)
    assert report.spread <= 1e-12  # the rule keeps collapsed clusters collapsed either way
    with torch.no_grad():
        y, z = merged.eval()(x), narrow.eval()(x)
    error = float((y - z).abs().max() / z.abs().max())
    if rule == "sum":
        assert error <= 1e-10
    else:
        assert error > 1e-4


def test_importance_centers_are_the_weighted_means_the_clusters_collapse_to():
    """``center="importance"``: with no task gradient the pull keeps each cluster's importance-weighted
    mean fixed and brings every member onto it; a channel nothing reads (γ = 0) weighs (almost) nothing."""
    torch.manual_seed(0)
    model = _Chain().double().eval()
    with torch.no_grad():
        model.bns[1].weight[5] = 0.0
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    cfg = CSGDConfig(flops_target=0.5, center="importance", centripetal_strength=0.5, weight_decay=0.0)
    cs = CSGD(model, x, cfg)
    group = next(g for g in cs.groups if g.producers[0].module == "convs.1")
    importance = cs.importance[group.id]
    assert importance[5] <= 1e-6 and importance.mean() == pytest.approx(1.0)
    weight = cs.model.convs[1].weight
    start = weight.detach().clone()
    expected = torch.zeros_like(start)
    for members in cs.clusters[group.id]:
        a = torch.as_tensor(importance[members])
        expected[members] = (a[:, None, None, None] * start[members]).sum(0) / a.sum()
    for _ in range(200):
        for p in cs.model.parameters():
            p.grad = torch.zeros_like(p)
        cs.after_backward()
        with torch.no_grad():
            for p in cs.model.parameters():
                p.sub_(0.1 * p.grad)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-9, atol=1e-9)
    assert any(len(c) > 1 and not np.allclose(importance[c], importance[c][0]) for c in cs.clusters[group.id])
