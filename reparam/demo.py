"""The ops demo (`python -m reparam`): train-form networks of blocks, merged by `reparam.merge`.

Also the network builders the ops benchmark uses: each takes `deploy=True` to build the plain
network of the merged shape directly (blocks replaced by their `deploy_module`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from reparam.merge import merge
from reparam.ops.blocks import DiverseBranchBlock, RepVGGBlock


def repvgg_net(
    widths: Sequence[int], depths: Sequence[int], num_classes: int = 10, *, deploy: bool = False
) -> nn.Sequential:
    """A RepVGG-style plain stack: stage i has `depths[i]` 3x3 RepVGG blocks of width `widths[i]`,
    the first one strided by 2, each followed by ReLU; global average pool and a linear head.
    (`widths=(48, 48, 96, 192, 1280)`, `depths=(1, 2, 4, 14, 1)` is RepVGG-A0.)"""
    layers: list[nn.Module] = []
    in_ch = 3
    for width, depth in zip(widths, depths):
        for i in range(depth):
            args = (in_ch, width, 3, 2 if i == 0 else 1)
            layers.append(
                RepVGGBlock.deploy_module(*args, act=nn.ReLU()) if deploy else RepVGGBlock(*args, act=nn.ReLU())
            )
            in_ch = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))


def _dbb(in_ch: int, out_ch: int, kernel: int, stride: int, act: nn.Module | None, deploy: bool) -> nn.Module:
    args = (in_ch, out_ch, kernel, stride)
    return DiverseBranchBlock.deploy_module(*args, act=act) if deploy else DiverseBranchBlock(*args, act=act)


class DBBBasicBlock(nn.Module):
    """A ResNet basic block with both 3x3 conv-BN replaced by DBBs; a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, deploy: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _dbb(in_ch, out_ch, 3, stride, nn.ReLU(), deploy), _dbb(out_ch, out_ch, 3, 1, None, deploy)
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            conv = nn.Conv2d(in_ch, out_ch, 1, stride, bias=deploy)
            self.shortcut = conv if deploy else nn.Sequential(conv, nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def dbb_resnet(
    widths: Sequence[int] = (64, 128, 256, 512),
    depths: Sequence[int] = (2, 2, 2, 2),
    num_classes: int = 10,
    *,
    deploy: bool = False,
) -> nn.Sequential:
    """A ResNet-18-like network of DBBs (7x7 stride-2 DBB stem, max pool, basic blocks, linear head)."""
    layers: list[nn.Module] = [_dbb(3, widths[0], 7, 2, nn.ReLU(), deploy), nn.MaxPool2d(3, 2, 1)]
    in_ch = widths[0]
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        for i in range(depth):
            layers.append(DBBBasicBlock(in_ch, width, 2 if i == 0 and stage > 0 else 1, deploy=deploy))
            in_ch = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))


@torch.no_grad()
def calibrate(model: nn.Module, input_shape: Sequence[int], steps: int = 3) -> nn.Module:
    """Give the norms non-trivial running statistics: a few training-mode passes on random data
    (`momentum=None` averages them), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    for _ in range(steps):
        model(torch.randn(*input_shape))
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rows(name: str, build: Callable[[], nn.Module], input_shape: tuple[int, ...]) -> list[str]:
    torch.manual_seed(0)
    model = calibrate(build(), input_shape)
    x = torch.randn(*input_shape)
    merged = merge(model, x, verify=True)
    return [
        name,
        f"{parameter_count(model):,}",
        f"{parameter_count(merged):,}",
        str(sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))),
        str(sum(1 for m in merged.modules() if isinstance(m, nn.Conv2d))),
        f"{merged.merge_report.max_rel_error:.1e}",
    ]


def main() -> None:
    """Build a small RepVGG-style and a small DBB network, merge them, print a table."""
    shape = (4, 3, 32, 32)
    rows = [
        _rows("RepVGG-style (16-32-64)", lambda: repvgg_net((16, 32, 64), (1, 2, 2)), shape),
        _rows("DBB ResNet (16-32-64)", lambda: dbb_resnet((16, 32, 64), (1, 1, 1)), shape),
    ]
    header = ["network", "params train", "params merged", "convs train", "convs merged", "max rel err"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"reparam ops demo: batch {shape[0]}, {shape[2]}x{shape[3]} input, float32")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print("max rel err = max|merged − original| / max|original| on the batch (eval mode)")
    print("latency of train form vs merged: python benchmarks/ops.py")
