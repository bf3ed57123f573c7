"""DDP: two gloo processes on half batches train CR-SFP (two views, two heads, the KL loss) and SFP with
Taylor scores (from the all-reduced gradients) exactly as one process on the full batch: the same
weights and the same masks on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from apps.sfp import SFP, SFPConfig
from tests.resrep.test_ddp_resrep import ResidualNet

STEPS, PER_EPOCH = 6, 2
CONFIGS = {
    "cr-sfp": SFPConfig(method="cr-sfp", prune_ratio=0.4, lr=0.05, mode="residual"),
    "taylor": SFPConfig(prune_ratio=0.4, lr=0.05, criterion="taylor", zero_before_training=False),
}


def data(views: int):
    gen = torch.Generator().manual_seed(0)
    shape = (8, views, 1, 6, 6) if views > 1 else (8, 1, 6, 6)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.arange(8) % 5


def make(name: str) -> SFP:
    torch.manual_seed(0)
    example = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    return SFP(ResidualNet().double(), example, CONFIGS[name], iters_per_epoch=PER_EPOCH, total_iters=STEPS)


def run(model: nn.Module, sfp: SFP, x, y) -> list[dict[int, torch.Tensor]]:
    opt = sfp.optimizer()
    history = []
    for it in range(STEPS):
        opt.zero_grad()
        sfp.loss(model(x), y).backward()  # DDP all-reduces (averages) here
        sfp.after_backward()
        opt.step()
        sfp.after_step(it)
        history.append({k: v.clone() for k, v in sfp.masks.items()})
    return history


def worker(rank: int, world: int, name: str, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        sfp = make(name)
        x, y = data(2 if name == "cr-sfp" else 1)
        half = len(x) // world
        history = run(
            nn.parallel.DistributedDataParallel(sfp.model),
            sfp,
            x[rank * half : (rank + 1) * half],
            y[rank * half : (rank + 1) * half],
        )
        torch.save({"model": sfp.model.state_dict(), "masks": history}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_gloo_processes_match_one(tmp_path, name):
    single = make(name)
    x, y = data(2 if name == "cr-sfp" else 1)
    expected = run(single.model, single, x, y)
    assert any(not m.all() for m in expected[-1].values())
    mp.start_processes(
        worker,
        args=(2, name, str(tmp_path / "init"), str(tmp_path / "out")),
        nprocs=2,
        join=True,
        start_method="forkserver",
    )
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        for step, (a, b) in enumerate(zip(expected, got["masks"])):
            assert all(torch.equal(a[g], b[g]) for g in a), (rank, step)
        for k, v in single.model.state_dict().items():
            assert torch.allclose(got["model"][k], v, rtol=1e-9, atol=1e-11), k
