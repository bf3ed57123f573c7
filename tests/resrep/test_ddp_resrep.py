"""DDP: two gloo processes on half batches give the masks and weights of one process on the full batch,
for both recipes (the budget recipe's Taylor scores come from the all-reduced gradients); and where a
score reads rank-local state (BatchNorm running statistics), the ranks still adopt one set of masks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from apps.resrep import ResRep, ResRepConfig

STEPS = 8
CONFIGS = {
    "paper": ResRepConfig(
        recipe="paper",
        flops_target=0.55,
        before_mask_iters=1,
        mask_interval=2,
        begin_granularity=3,
        lasso_strength=2e-2,
        lr=0.05,
    ),
    "budget": ResRepConfig(
        recipe="budget", flops_target=0.55, lr=0.05, mask_rounds=3, mask_end_fraction=0.5, freeze_fraction=0.75
    ),
    # the fused score reads BN running statistics, which every rank updates from its own batches
    "budget-fused-bn": ResRepConfig(
        recipe="budget",
        score="fused",
        flops_target=0.55,
        lr=0.05,
        mask_rounds=3,
        mask_end_fraction=0.5,
        freeze_fraction=0.75,
    ),
}


class ResidualNet(nn.Module):
    """No BatchNorm (its batch statistics would differ per rank): conv biases, one residual block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class NormNet(nn.Module):
    """conv → BN → ReLU twice, then a linear head; BN momentum 1: running statistics are the last batch's."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=1.0)
        self.conv, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=1.0)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        return self.head(torch.relu(self.bn2(self.conv(x))).mean((2, 3)))


def data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 6, 6, generator=gen, dtype=torch.float64), torch.arange(8) % 5


def run(model: nn.Module, rr: ResRep, x, y) -> list[dict[int, torch.Tensor]]:
    opt = rr.optimizer()
    history = []
    for it in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # DDP all-reduces (averages) here
        rr.after_backward()
        opt.step()
        rr.after_step(it)
        history.append({g: m.clone() for g, m in rr.masks.items()})
    return history


def make(recipe: str) -> ResRep:
    torch.manual_seed(0)
    net = NormNet() if recipe.endswith("-bn") else ResidualNet()
    return ResRep(net.double(), data()[0][:2], CONFIGS[recipe], total_iters=STEPS)


def worker(rank: int, world: int, init_file: str, out: str, recipe: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        rr = make(recipe)
        ddp = nn.parallel.DistributedDataParallel(rr.model)
        if recipe.endswith("-bn"):  # rank 0 smooth images, rank 1 noise: BN statistics that rank channels apart
            x, y = data(seed=1 + rank)
            if rank == 0:
                x = x[..., ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3)
        else:
            x, y = data()
            half = len(x) // world
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        history = run(ddp, rr, x, y)
        torch.save({"masks": history, "model": rr.model.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, recipe: str) -> list[dict]:
    # forkserver: the workers fork from a fresh server process, not from this one (its autograd and jax
    # threads would not survive a fork)
    mp.start_processes(
        worker,
        args=(2, str(tmp_path / "init"), str(tmp_path / "out"), recipe),
        nprocs=2,
        join=True,
        start_method="forkserver",
    )
    return [torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("recipe", ["budget", "paper"])
def test_two_gloo_processes_match_one(tmp_path, recipe):
    single = make(recipe)
    x, y = data()
    expected = run(single.model, single, x, y)
    assert any(not m.all() for m in expected[-1].values())  # masking did happen
    for got in spawn(tmp_path, recipe):
        for step_got, step_expected in zip(got["masks"], expected):
            assert all(torch.equal(step_got[g], step_expected[g]) for g in step_expected)
        for k, v in single.model.state_dict().items():
            assert torch.allclose(got["model"][k], v, rtol=1e-10, atol=1e-12), k


def test_ranks_adopt_one_set_of_masks_when_scores_read_rank_local_statistics(tmp_path):
    ranks = spawn(tmp_path, "budget-fused-bn")
    assert any(not m.all() for m in ranks[0]["masks"][-1].values())  # masking did happen
    for step0, step1 in zip(ranks[0]["masks"], ranks[1]["masks"]):
        assert all(torch.equal(step0[g], step1[g]) for g in step0)
    for k, v in ranks[0]["model"].items():  # DDP keeps the weights in step only if the masks agree
        if "running" not in k and "num_batches" not in k:
            assert torch.allclose(ranks[1]["model"][k], v, rtol=1e-10, atol=1e-12), k
