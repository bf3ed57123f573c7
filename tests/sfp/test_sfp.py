"""SFP / CR-SFP: the criteria, the zeroing schedule, the two networks of CR-SFP and their loss, the exact
physical export on every kind of coupling the graph knows, and clear refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from apps.engine.loop import fit
from apps.engine.models import CifarResNet as PublishedResNet
from apps.sfp import SFP, CRSFPNet, SFPConfig, fpgm_scores, l2_scores, taylor_scores
from tests.graph.nets import TRICKY


@settings(deadline=None)
@given(st.integers(2, 9), st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**16))
def test_criteria_match_their_definitions(channels, producers, width, seed):
    gen = torch.Generator().manual_seed(seed)
    blocks, grads = [], []
    for _ in range(producers):
        order = torch.randperm(channels, generator=gen)  # rows hold the channels in any order
        blocks.append((torch.randn(channels, width, 3, generator=gen), order))
        grads.append(torch.randn(channels, width, 3, generator=gen))
    vec = torch.zeros(channels, 0, dtype=torch.float64)
    for rows, order in blocks:
        by_channel = torch.zeros(channels, rows[0].numel(), dtype=torch.float64)
        by_channel[order] = rows.double().reshape(channels, -1)
        vec = torch.cat([vec, by_channel], dim=1)
    torch.testing.assert_close(l2_scores(blocks, channels), vec.norm(dim=1))
    brute = torch.stack([sum((vec[i] - vec[j]).norm() for j in range(channels)) for i in range(channels)])
    torch.testing.assert_close(fpgm_scores(blocks, channels), brute)
    taylor = torch.zeros(channels, dtype=torch.float64)
    for (rows, order), g in zip(blocks, grads):
        taylor[order] += (rows.double() * g.double()).abs().reshape(channels, -1).sum(1)
    torch.testing.assert_close(taylor_scores(blocks, grads, channels), taylor)


def _randomised(model: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(generator=gen)
                m.bias.normal_(generator=gen)  # large shifts: zeroed channels emit large constants
    return model.eval()


@pytest.mark.parametrize("name", ["cifar_resnet", "concat_residual", "split", "flatten_linear", "pad_shortcut"])
@pytest.mark.parametrize("mode", ["paper", "residual"])
def test_the_export_is_exact_on_every_coupling(name, mode):
    """Removed channels emit BN shifts through ReLU into padded 3x3 readers, 1x1 readers and linear layers
    after a flatten: folded or carried, the narrow model equals the masked one (float64 ≤ 1e-10)."""
    cls, shape = TRICKY[name]
    torch.manual_seed(0)
    model = _randomised(cls())
    x = torch.randn(shape)
    try:
        sfp = SFP(model, x, SFPConfig(prune_ratio=0.5, mode=mode), iters_per_epoch=1, total_iters=1)
    except ValueError as err:
        if "found no channel group" not in str(err):
            raise  # only a net with nothing to prune may skip
        pytest.skip(f"nothing to prune in {name} with mode={mode}: {err}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no inexact-export warning
        narrow, report = sfp.convert(x)
    assert report.exact and report.max_rel_error <= 1e-10 and report.max_rel_error_native <= 1e-5
    assert not report.border_layers and not report.unfoldable and report.largest_constant > 0
    assert report.macs_after <= report.macs_before  # a tiny group's carrier can eat its saving
    with torch.no_grad():
        y = sfp.masked_network().eval()(x)
        assert float((narrow(x) - y).abs().max() / y.abs().max()) <= 1e-5


def test_a_folded_constant_at_padded_borders_is_reported_with_its_error():
    """Without a carrier (here: none allowed), a padded 3x3 reader sees the removed channels' constant only
    partly at the borders: the export says so with the measured error instead of passing silently."""
    from apps.sfp import export

    torch.manual_seed(0)
    model, x = _randomised(PublishedResNet(depth=20)), torch.randn(2, 3, 16, 16)
    sfp = SFP(model, x, SFPConfig(prune_ratio=0.5), iters_per_epoch=1, total_iters=1)
    original = export._carriers
    export._carriers = lambda *a: []
    try:
        with pytest.warns(RuntimeWarning, match=r"not exact: .*max relative error .* padded layer\(s\) with k>1"):
            _, report = sfp.convert(x)
        assert not report.exact and report.border_layers and report.max_rel_error > 1e-5
        with pytest.raises(ValueError, match="not exact"):
            SFP(model, x, SFPConfig(prune_ratio=0.5, on_inexact="raise"), iters_per_epoch=1, total_iters=1).convert(x)
    finally:
        export._carriers = original


def _alive(model: nn.Module) -> nn.Module:
    """Positive BN shifts: a zeroed filter's channel then passes ReLU, so its gradient is nonzero (with a
    shift <= 0 ReLU cuts it and the filter can never regrow, in SFP as published)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(0.2, 1.0)
    return model


def _train(sfp: SFP, loader, epochs: int) -> None:
    """`epochs` of the method's model under the engine, on the CPU, with its optimizer, hooks and loss."""
    fit(
        sfp.model,
        loader,
        None,
        epochs=epochs,
        optimizer=sfp.optimizer(),
        hooks=sfp,
        loss_fn=sfp.loss,
        progress=False,
        device="cpu",
    )


def _loader(views=1, n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *((views,) if views > 1 else ()), 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_sfp_zeroes_before_training_and_after_every_epoch_and_lets_filters_regrow():
    loader, epochs = _loader(), 3
    torch.manual_seed(0)
    sfp = SFP(
        _alive(PublishedResNet(depth=20)),
        torch.randn(1, 3, 8, 8),
        SFPConfig(prune_ratio=0.4),
        iters_per_epoch=len(loader),
        total_iters=epochs * len(loader),
    )
    params = dict(sfp.net.named_parameters())

    def zeroed_rows() -> dict[str, torch.Tensor]:
        out = {}
        for gid, rows in sfp._rows.items():
            for name, pos, ch in rows:
                out[name] = params[name].detach()[pos[~sfp.masks[gid][ch]]]
        return out

    assert all(float(r.abs().max()) == 0.0 for r in zeroed_rows().values())  # zeroed before training
    regrown = []

    class Probe:
        def after_step(self, i):
            if (i + 1) % len(loader):  # mid-epoch: the zeroed filters train
                regrown.append(max(float(r.abs().max()) for r in zeroed_rows().values()))

    opt = sfp.optimizer()
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader):
            opt.zero_grad()
            F.cross_entropy(sfp.model(x), y).backward()
            sfp.after_backward()
            opt.step()
            Probe().after_step(epoch * len(loader) + i)
            sfp.after_step(epoch * len(loader) + i)
        assert all(float(r.abs().max()) == 0.0 for r in zeroed_rows().values())  # re-zeroed at the epoch end
    assert min(regrown) > 0.0
    kept = sum(int(m.sum()) for m in sfp.masks.values())
    assert kept == sum(sfp.widths.values()) and sfp.epoch_metrics()["zeroed"] > 0


def test_cr_sfp_masks_the_pnn_gradient_trains_the_rnn_and_shares_norm_statistics():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, 8, 8)
    y = torch.randint(0, 10, (4,))
    sfp = SFP(
        _alive(PublishedResNet(depth=20)),
        x[:1, 0],
        SFPConfig(method="cr-sfp", prune_ratio=0.5),
        iters_per_epoch=1,
        total_iters=1,
    )
    net: CRSFPNet = sfp.model
    assert isinstance(net, CRSFPNet) and net.head == "linear"
    net.train()
    bn = net.net.bn1
    before = int(bn.num_batches_tracked)
    z_p, z_r = net(x)
    assert int(bn.num_batches_tracked) == before + 2  # both passes update the shared statistics
    params = dict(net.net.named_parameters())
    gid = sfp.groups[0].id
    name, pos, ch = sfp._rows[gid][0]
    gone = pos[~sfp.masks[gid][ch]]
    F.cross_entropy(z_p, y).backward(retain_graph=True)
    assert float(params[name].grad[gone].abs().max()) == 0.0  # the P-NN's mask gates the gradient
    assert net.head_r.weight.grad is None  # the R-NN's head is not the P-NN's
    sfp.model.zero_grad()
    F.cross_entropy(z_r, y).backward(retain_graph=True)
    assert float(params[name].grad[gone].abs().max()) > 0.0 and net.net.linear.weight.grad is None
    loss = sfp.loss((z_p, z_r), y)
    p, r = z_p.softmax(1), z_r.softmax(1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(1).mean()  # noqa: E731  KL(a ‖ b)
    expected = F.cross_entropy(z_p, y) + F.cross_entropy(z_r, y) + 0.5 * (kl(r, p) + kl(p, r))
    torch.testing.assert_close(loss, expected)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x[:, 0]), sfp.masked_network().eval()(x[:, 0]))  # eval: the P-NN


def test_cr_sfp_trains_under_the_engine_and_exports_exactly():
    loader, epochs = _loader(views=2), 2
    sfp = SFP(
        PublishedResNet(depth=20),
        torch.randn(1, 3, 8, 8),
        SFPConfig(method="cr-sfp", flops_target=0.6, criterion="fpgm"),
        iters_per_epoch=len(loader),
        total_iters=epochs * len(loader),
    )
    _train(sfp, loader, epochs)
    narrow, report = sfp.convert(torch.randn(8, 3, 8, 8))
    assert report.exact and report.max_rel_error <= 1e-10 and report.macs_after <= 0.6 * report.macs_before


def test_bad_input_is_refused_clearly():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"prune_ratio must lie in \[0, 1\)"):
        SFPConfig(prune_ratio=1.0)
    with pytest.raises(ValueError, match="flops_target must lie in"):
        SFPConfig(flops_target=1.5)
    with pytest.raises(ValueError, match="criterion='taylor' needs a gradient .* zero_before_training"):
        SFP(PublishedResNet(depth=20), x, SFPConfig(criterion="taylor"), iters_per_epoch=4, total_iters=8)
    sfp = SFP(
        PublishedResNet(depth=20),
        x,
        SFPConfig(criterion="taylor", zero_before_training=False),
        iters_per_epoch=4,
        total_iters=8,
    )
    with pytest.raises(ValueError, match="needs a gradient"):
        sfp.zero()

    class NoGroups(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)

        def forward(self, x):
            return self.norm(self.conv(x)).mean((2, 3))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="SFP found no channel group it can prune and export"):
            SFP(NoGroups(), x, SFPConfig(), iters_per_epoch=1)

    class MeanHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 10, 1)

        def forward(self, x):
            return self.b(self.bn(self.a(x)).relu()).mean((2, 3))

    with pytest.raises(ValueError, match="CR-SFP needs a model whose output is the output of one linear"):
        SFP(
            MeanHead(), x, SFPConfig(method="cr-sfp", prune_stem=True), iters_per_epoch=1
        )  # its one group is the stem's


def test_cr_sfp_under_bf16_autocast_and_channels_last():
    loader = _loader(views=2, n=32)
    sfp = SFP(
        PublishedResNet(depth=20),
        torch.randn(1, 3, 8, 8),
        SFPConfig(method="cr-sfp", prune_ratio=0.3),
        iters_per_epoch=len(loader),
        total_iters=len(loader),
    )
    history = fit(
        sfp.model,
        loader,
        None,
        epochs=1,
        optimizer=sfp.optimizer(),
        hooks=sfp,
        loss_fn=sfp.loss,
        amp="bf16",
        channels_last=True,
        progress=False,
        device="cpu",
    )
    assert torch.isfinite(torch.tensor(history[-1]["train_loss"]))
    _, report = sfp.convert(torch.randn(4, 3, 8, 8))
    assert report.exact


def test_building_the_method_leaves_the_norm_statistics_alone():
    model = PublishedResNet(depth=20).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sfp = SFP(model, torch.randn(1, 3, 8, 8), SFPConfig(method="cr-sfp", prune_ratio=0.0), iters_per_epoch=1)
    for k, v in sfp.net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stem_and_skipped_layers_stay_at_full_width():
    x = torch.randn(1, 3, 8, 8)
    model = PublishedResNet(depth=20)
    every = SFP(model, x, SFPConfig(mode="residual"), iters_per_epoch=1)
    assert every.stem == {"conv1"} and any("conv1" in [p.module for p in g.producers] for g in every.groups)
    no_stem = SFP(model, x, SFPConfig(mode="residual", prune_stem=False), iters_per_epoch=1)
    assert not any("conv1" in [p.module for p in g.producers] for g in no_stem.groups)
    assert any("the stem conv1 (prune_stem=False)" in why for why in no_stem.skipped.values())
    # the variants' defaults: SFP zeroes the stem's channels, CR-SFP keeps them (the spec)
    cr = SFP(model, x, SFPConfig(mode="residual", method="cr-sfp"), iters_per_epoch=1)
    assert not any("conv1" in [p.module for p in g.producers] for g in cr.groups)
    assert any("cr-sfp keeps the stem" in why for why in cr.skipped.values())
    skipped = SFP(model, x, SFPConfig(skip="layer2.*"), iters_per_epoch=1)
    assert all(not p.module.startswith("layer2.") for g in skipped.groups for p in g.producers)
    assert any("which skip='layer2.*' excludes" in why for why in skipped.skipped.values())


def test_without_the_final_rerank_the_deployed_pnn_is_the_one_trained():
    def run(rerank_at_end):
        loader, epochs = _loader(views=2), 2
        torch.manual_seed(0)
        cfg = SFPConfig(method="cr-sfp", prune_ratio=0.4, rerank_at_end=rerank_at_end)
        sfp = SFP(
            _alive(PublishedResNet(depth=20)),
            torch.randn(1, 3, 8, 8),
            cfg,
            iters_per_epoch=len(loader),
            total_iters=epochs * len(loader),
        )
        seen = {}
        step = sfp.after_step

        def spy(i):
            if i + 1 == epochs * len(loader):
                seen.update({k: v.clone() for k, v in sfp.masks.items()})
            step(i)

        sfp.after_step = spy
        _train(sfp, loader, epochs)
        return seen, sfp.masks

    seen, final = run(None)  # CR-SFP: no final re-rank by default
    assert all(torch.equal(seen[g], m) for g, m in final.items())  # the last zeroing kept the masks
    seen, final = run(True)  # the control: a final re-rank of the same run changes them
    assert not all(torch.equal(seen[g], m) for g, m in final.items())


def test_the_final_rerank_defaults_by_variant():
    assert SFPConfig().rerank_last and not SFPConfig(method="cr-sfp").rerank_last
    assert SFPConfig(method="cr-sfp", rerank_at_end=True).rerank_last and not SFPConfig(rerank_at_end=False).rerank_last


def _cr_sfp_run(tmp_path, fail_at=None, resume=False):
    loader = _loader(views=2, n=48)
    torch.manual_seed(0)
    sfp = SFP(
        _alive(PublishedResNet(depth=20)),
        torch.randn(1, 3, 8, 8),
        SFPConfig(method="cr-sfp", criterion="taylor", zero_before_training=False, prune_ratio=0.4),
        iters_per_epoch=len(loader),
        total_iters=3 * len(loader),
    )
    if fail_at is not None:
        step = sfp.after_step

        def dying(i):
            step(i)
            if i == fail_at:
                raise KeyboardInterrupt("simulated kill")

        sfp.after_step = dying
    fit(
        sfp.model,
        loader,
        None,
        epochs=3,
        optimizer=sfp.optimizer(),
        hooks=sfp,
        loss_fn=sfp.loss,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        resume=resume,
        progress=False,
        device="cpu",
    )
    return sfp


def test_a_killed_cr_sfp_run_resumes_exactly(tmp_path):
    """Masks, the last gradients (Taylor) and the iteration live in the checkpoint: killed mid-epoch 2 and
    resumed, the run ends with the weights and masks of an uninterrupted one."""
    whole = _cr_sfp_run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _cr_sfp_run(tmp_path / "cut", fail_at=4)  # epoch 2 of 3 batches each, after its checkpoint at step 4
    resumed = _cr_sfp_run(tmp_path / "cut", resume=True)
    assert all(torch.equal(whole.masks[g], m) for g, m in resumed.masks.items())
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_cr_sfp_refuses_one_view_batches_in_training():
    x = torch.randn(2, 3, 8, 8)
    sfp = SFP(PublishedResNet(depth=20), x[:1], SFPConfig(method="cr-sfp"), iters_per_epoch=1)
    sfp.model.train()
    with pytest.raises(ValueError, match=r"two views .* \(B, 2, \.\.\.\), got \(2, 3, 8, 8\).*views=2"):
        sfp.model(x)
    z_p, z_r = sfp.model(torch.stack([x, x.flip(-1)], dim=1))
    assert z_p.shape == z_r.shape == (2, 10)
    assert sfp.model.eval()(x).shape == (2, 10)  # evaluation: the P-NN on one view


def test_a_step_with_non_finite_gradients_keeps_the_last_taylor_gradients():
    """Under fp16 a GradScaler skips an overflow step after the hooks saw its inf/NaN gradients."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    sfp = SFP(
        PublishedResNet(depth=20), x[:1], SFPConfig(criterion="taylor", zero_before_training=False), iters_per_epoch=4
    )
    F.cross_entropy(sfp.model(x), y).backward()
    sfp.after_backward()
    saved = {n: g.clone() for n, g in sfp._grads.items()}
    assert saved and all(bool(g.ne(0).any()) for g in saved.values())
    sfp.model.zero_grad()
    F.cross_entropy(sfp.model(x), y).backward()
    sfp.net.get_parameter(next(iter(saved))).grad.view(-1)[0] = float("inf")  # a scored producer's
    sfp.after_backward()
    assert sfp._grads.keys() == saved.keys() and all(torch.equal(sfp._grads[n], g) for n, g in saved.items())
    assert all(bool(torch.isfinite(s).all()) for s in sfp.scores().values())
