"""Compactor: an identity-initialised 1x1 conv D → D after a conv-BN, to be pruned row by row (ResRep)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reparam.ops.blocks.base import MergeableBlock
from reparam.ops.blocks.registry import register_block
from reparam.ops.sequential import compose_kxk_1x1


@register_block
class Compactor(MergeableBlock):
    """`y = Q·x` per pixel, `Q ∈ R^{D×D}` initialised to the identity, no bias.

    `mask` (a buffer of ones) marks the rows still kept; the pruning schedule sets entries to 0 and
    owns what that means for training (the forward does not read it). `fold_into` merges the
    compactor into the conv before it: `W' = Q·W`, `b' = Q·b`.
    """

    def __init__(
        self, channels: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.eye(channels, device=device, dtype=dtype).reshape(channels, channels, 1, 1))
        self.register_buffer("mask", torch.ones(channels, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.conv2d(x, self.weight)

    def fold_into(self, conv_kernel: Tensor, conv_bias: Tensor | None, groups: int = 1) -> tuple[Tensor, Tensor | None]:
        """`(Q·W, Q·b)`: the conv `(conv_kernel, conv_bias)` (with `groups`) followed by this compactor, as one conv.

        Same geometry as the conv, except that a grouped conv becomes dense (groups 1).
        """
        return compose_kxk_1x1(conv_kernel, conv_bias, self.weight, None, groups, 1)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        conv = nn.Conv2d(
            self.channels, self.channels, 1, bias=False, device=self.weight.device, dtype=self.weight.dtype
        )
        conv.weight.copy_(self.weight)
        return conv

    @classmethod
    def deploy_module(
        cls, channels: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """The deploy module built from the constructor arguments (load `merged().state_dict()` into it)."""
        return nn.Conv2d(channels, channels, 1, bias=False, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}"
