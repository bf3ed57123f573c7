"""DDP: two gloo processes on half batches train the clusters exactly as one process on the full batch
(the centripetal rule runs on the all-reduced gradients), and the merge is exact on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from apps.csgd import CSGD, CSGDConfig
from tests.resrep.test_ddp_resrep import ResidualNet, data

STEPS = 8
CONFIG = CSGDConfig(flops_target=0.55, lr=0.05, centripetal_strength=2.0)


def make() -> CSGD:
    torch.manual_seed(0)
    return CSGD(ResidualNet().double(), data()[0][:2], CONFIG, total_iters=STEPS)


def run(model: nn.Module, cs: CSGD, x, y) -> None:
    opt = cs.optimizer()
    for it in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # DDP all-reduces (averages) here
        cs.after_backward()
        opt.step()
        cs.after_step(it)


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cs = make()
        x, y = data()
        half = len(x) // world
        run(
            nn.parallel.DistributedDataParallel(cs.model),
            cs,
            x[rank * half : (rank + 1) * half],
            y[rank * half : (rank + 1) * half],
        )
        torch.save({"model": cs.model.state_dict(), "spread": cs.spread()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    single = make()
    x, y = data()
    before = single.spread()
    run(single.model, single, x, y)
    assert single.spread() < 0.5 * before  # the clusters did move together
    # forkserver: the workers fork from a fresh server process, not from this one (its autograd and jax
    # threads would not survive a fork)
    mp.start_processes(
        worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True, start_method="forkserver"
    )
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        assert got["spread"] == pytest.approx(single.spread(), rel=1e-8)
        for k, v in single.model.state_dict().items():
            assert torch.allclose(got["model"][k], v, rtol=1e-10, atol=1e-12), k
