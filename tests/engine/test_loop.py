"""The training loop: learning, hooks, per-iteration cosine LR, NaN stop, exact resume, AMP, DDP (gloo)."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from apps.engine.checkpoint import CheckpointError, load_file
from apps.engine.data import DataConfig, EpochSampler, build_loaders
from apps.engine.loop import NonFiniteLossError, OptimConfig, evaluate, fit, sgd
from apps.engine.models import DigitsResNet


def _loaders(limit=256, batch=32, **kw):
    return build_loaders(DataConfig(dataset="digits", batch_size=batch, train_limit=limit), **kw)[:2]


def _model(seed=0):
    torch.manual_seed(seed)
    return DigitsResNet(width=4)


class Recorder:
    """A hook that checks it runs between backward and step, and carries state through checkpoints."""

    def __init__(self, model, fail_at=None):
        self.model, self.fail_at = model, fail_at
        self.iterations, self.backward_calls = [], 0

    def after_backward(self):
        assert all(p.grad is not None for p in self.model.parameters())
        self.backward_calls += 1

    def after_step(self, iteration):
        if iteration == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.iterations.append(iteration)

    def state_dict(self):
        return {"iterations": torch.tensor(self.iterations, dtype=torch.int64)}

    def load_state_dict(self, state):
        self.iterations = state["iterations"].tolist()


def test_fit_learns_logs_and_anneals(tmp_path):
    train, test = _loaders(limit=0, batch=64)
    model = _model()
    opt = sgd(model, OptimConfig(lr=0.1))
    hooks = Recorder(model)
    history = fit(
        model,
        train,
        test,
        epochs=3,
        optimizer=opt,
        hooks=hooks,
        log_dir=tmp_path,
        progress=False,
        metrics=lambda: {"extra": 1.0},
    )
    n = 3 * len(train)
    assert hooks.iterations == list(range(n)) and hooks.backward_calls == n
    assert [r["epoch"] for r in history] == [1, 2, 3] and history[-1]["step"] == n
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0 per iteration
    assert history[-1]["val_acc"] > 40 and history[-1]["train_loss"] < history[0]["train_loss"]
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == 3 and float(rows[-1]["val_acc"]) == pytest.approx(history[-1]["val_acc"])
    assert rows[0]["extra"] == "1.0"
    assert evaluate(model, test)["acc"] == pytest.approx(history[-1]["val_acc"])


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    train, test = _loaders()
    model = _model()
    calls = {"n": 0}

    def loss_fn(out, y, **kw):
        calls["n"] += not kw  # training calls only (evaluation sums with reduction="sum")
        loss = nn.functional.cross_entropy(out, y, **kw)
        return loss * float("nan") if calls["n"] == len(train) + 3 and not kw else loss

    class Snap(Recorder):
        def after_step(self, iteration):
            super().after_step(iteration)
            self.weights = {k: v.detach().clone() for k, v in model.named_parameters()}

    hooks = Snap(model)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 3.*last good checkpoint"):
        fit(
            model,
            train,
            test,
            epochs=3,
            optimizer=sgd(model, OptimConfig()),
            hooks=hooks,
            checkpoint_dir=tmp_path,
            progress=False,
            loss_fn=loss_fn,
        )
    assert load_file(tmp_path / "last.pt")["epoch"] == 1
    for k, v in model.named_parameters():  # no update from the NaN step
        assert torch.equal(v, hooks.weights[k]), k


def _run(tmp_path, fail_at=None, resume=False, checkpoint_every=0, epochs=3):
    train, test = _loaders(seed=5)
    model = _model()
    opt = sgd(model, OptimConfig(lr=0.05))
    hooks = Recorder(model, fail_at)
    hooks.after_backward = lambda: hooks.lrs.append(opt.param_groups[0]["lr"])  # the lr of each step
    hooks.lrs = []
    fit(
        model,
        train,
        test,
        epochs=epochs,
        optimizer=opt,
        hooks=hooks,
        checkpoint_dir=tmp_path,
        resume=resume,
        checkpoint_every=checkpoint_every,
        progress=False,
        meta={"run": "a"},
    )
    return model, hooks


@pytest.mark.parametrize("checkpoint_every", [0, 5])
def test_resume_after_interruption_is_exact(tmp_path, checkpoint_every):
    reference, ref_hooks = _run(tmp_path / "ref")
    iters = len(ref_hooks.iterations) // 3
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", fail_at=iters + 7, checkpoint_every=checkpoint_every)  # mid epoch 2
    saved = load_file(tmp_path / "cut" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == ((1, 7) if checkpoint_every else (1, 0))  # step 15 = 8 + 7
    resumed, hooks = _run(tmp_path / "cut", resume=True, checkpoint_every=checkpoint_every)
    assert hooks.iterations == ref_hooks.iterations
    for k, v in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    a = load_file(tmp_path / "ref" / "last.pt")["history"]
    b = load_file(tmp_path / "cut" / "last.pt")["history"]
    assert [r["val_acc"] for r in a] == [r["val_acc"] for r in b]


def test_a_finished_run_resumed_with_more_epochs_follows_the_longer_cosine(tmp_path):
    _, short = _run(tmp_path, epochs=2)
    iters = len(short.iterations) // 2
    _, longer = _run(tmp_path, resume=True, epochs=3)
    saved = load_file(tmp_path / "last.pt")
    assert saved["step"] == 3 * iters and [r["epoch"] for r in saved["history"]] == [1, 2, 3]
    assert longer.iterations == list(range(3 * iters))
    cosine = [0.05 * 0.5 * (1 + math.cos(math.pi * i / (3 * iters))) for i in range(2 * iters, 3 * iters)]
    assert longer.lrs == pytest.approx(cosine, rel=1e-9, abs=1e-12)  # from its first step on
    with pytest.raises(CheckpointError, match="can be extended .*not shortened to 16"):
        _run(tmp_path, resume=True, epochs=2)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    _run(tmp_path)
    train, test = _loaders()
    model = _model()
    with pytest.raises(CheckpointError, match=r"other settings \(run: .* → .b.\)"):
        fit(
            model,
            train,
            test,
            epochs=3,
            optimizer=sgd(model, OptimConfig()),
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
            meta={"run": "b"},
        )


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last(amp):
    train, test = _loaders(limit=64)
    model = _model()
    before = copy.deepcopy(model.state_dict())
    history = fit(
        model, train, test, epochs=1, optimizer=sgd(model, OptimConfig()), amp=amp, channels_last=True, progress=False
    )
    assert math.isfinite(history[-1]["train_loss"]) and math.isfinite(history[-1]["val_loss"])
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert next(model.parameters()).dtype == torch.float32
    # the same steps in float32 from the same weights: mixed precision moves the weights the same way
    reference = _model()
    fit(reference, train, test, epochs=1, optimizer=sgd(reference, OptimConfig()), progress=False)
    moved = torch.cat([(v - before[k]).flatten() for k, v in model.state_dict().items() if v.is_floating_point()])
    expected = torch.cat(
        [(v - before[k]).flatten() for k, v in reference.state_dict().items() if v.is_floating_point()]
    )
    assert expected.norm() > 0 and float(F.cosine_similarity(moved, expected, dim=0)) > 0.95


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _tensor_loader(batch, rank=0, world_size=1):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g))
    sampler = EpochSampler(96, batch_size=batch, rank=rank, world_size=world_size)
    return DataLoader(data, batch_size=batch, sampler=sampler)


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _mlp()
    fit(
        model,
        _tensor_loader(8, rank, world),
        None,
        epochs=2,
        optimizer=sgd(model, OptimConfig(lr=0.05, weight_decay=0)),
        progress=False,
        device="cpu",
    )
    torch.save(model.state_dict(), f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """Rank r trains on samples r::2 of each 16-sample slice with batch 8: the all-reduced mean gradient is
    the single process's batch-16 gradient, so the weights agree."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "w")), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"w.{r}", weights_only=True) for r in range(2))
    model = _mlp()
    fit(
        model,
        _tensor_loader(16),
        None,
        epochs=2,
        optimizer=sgd(model, OptimConfig(lr=0.05, weight_decay=0)),
        progress=False,
        device="cpu",
    )
    for k, v in model.state_dict().items():
        assert torch.equal(w0[k], w1[k]), k
        torch.testing.assert_close(w0[k], v, rtol=1e-5, atol=1e-6)
