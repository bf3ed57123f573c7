"""Small hand-built networks with the couplings that break channel pruners."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + self.short(x))


class CifarResNet(nn.Module):
    """Nested residuals, a projection shortcut, global pooling and a linear head."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConcatResidual(nn.Module):
    """Two residual branches concatenated, then a BN over the concat and a residual add on it."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.b1, self.b2 = conv_bn(c, c), conv_bn(c, c)
        self.c1 = conv_bn(c, c)
        self.mix = conv_bn(2 * c, 2 * c)
        self.bn = nn.BatchNorm2d(2 * c)
        self.head = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(s)) + s, F.relu(self.c1(F.relu(self.b2(s)))) + s], dim=1)
        y = F.relu(self.bn(y))
        y = F.relu(self.mix(y)) + y
        return self.head(y).mean((2, 3))


class ShuffleBlock(nn.Module):
    """ShuffleNet-v2 style: chunk, branch, concat, channel shuffle (view / transpose / view)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.branches = nn.ModuleList(
            nn.Sequential(
                conv_bn(c // 2, c // 2, 1),
                nn.ReLU(),
                conv_bn(c // 2, c // 2, 3, groups=c // 2),
                conv_bn(c // 2, c // 2, 1),
                nn.ReLU(),
            )
            for _ in range(2)
        )
        self.head = nn.Conv2d(c, 3, 1)

    @staticmethod
    def shuffle(x, groups: int = 2):
        b, c, h, w = x.size()
        return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for branch in self.branches:
            x1, x2 = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat((x1, branch(x2)), dim=1))
        return self.head(x).mean((2, 3))


class SplitNet(nn.Module):
    """Uneven torch.split, slicing, and a sum of the pieces through separate convs."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 10)
        self.p, self.q = conv_bn(4, 5), conv_bn(6, 5)
        self.tail = conv_bn(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = torch.split(x, [4, 6], dim=1)
        y = self.p(a) + self.q(b) + self.tail(x[:, 7:])
        return self.head(y.mean((2, 3)))


class MultiScaleSplit(nn.Module):
    """Res2Net's hierarchy: equal pieces of a split, each added to the previous piece's output, the
    last piece taken as ``pieces[-1]``, all concatenated back."""

    def __init__(self, width: int = 3, scale: int = 3):
        super().__init__()
        self.width, self.scale = width, scale
        self.stem = conv_bn(3, width * scale)
        self.convs = nn.ModuleList(conv_bn(width, width) for _ in range(scale - 1))
        self.head = conv_bn(width * scale, 4, 1)

    def forward(self, x):
        pieces = torch.split(F.relu(self.stem(x)), self.width, 1)
        out, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = pieces[i] if sp is None else sp + pieces[i]
            sp = F.relu(conv(sp))
            out.append(sp)
        out.append(pieces[-1])
        return self.head(torch.cat(out, 1)).mean((2, 3))


class SENet(nn.Module):
    """Squeeze-and-excitation scaling (broadcast multiply) and a grouped (non-depthwise) conv."""

    def __init__(self, c: int = 8, groups: int = 2):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.grouped = conv_bn(c, c, 3, groups=groups)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.grouped(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SharedConv(nn.Module):
    """One conv module applied twice (weights shared), so both calls' channels are coupled."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.shared = nn.Conv2d(c, c, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.shared(x)))
        z = F.relu(self.bn2(self.shared(y)))
        return self.head(z).mean((2, 3))


class FlattenLinear(nn.Module):
    """VGG-style head without global pooling: flatten (C, H, W) into a linear layer."""

    def __init__(self, c: int = 6, hw: int = 4):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, c), nn.ReLU(), nn.AdaptiveMaxPool2d(hw))
        self.fc1 = nn.Linear(c * hw * hw, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(self.body(x), 1))))


class Attention(nn.Module):
    """Multi-head self-attention written out: fused qkv, head reshape, hard-coded width in the merge."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.scale = (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.dim))


class TransformerNet(nn.Module):
    """Patch embedding, pre-norm blocks (written-out attention and an MLP) and a token-mean head."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 24, depth: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 4, dim) * 0.1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    n1=nn.LayerNorm(dim),
                    attn=Attention(dim, heads),
                    n2=nn.LayerNorm(dim),
                    fc1=nn.Linear(dim, hidden),
                    fc2=nn.Linear(hidden, dim),
                )
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = x + blk["attn"](blk["n1"](x))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["n2"](x))))
        return self.head(x.mean(1))


class PadShortcut(nn.Module):
    """Option-A residual: a strided conv branch plus the subsampled input zero-padded along channels
    (`pads` = zeros before / after; negative amounts crop), then a spatially padded head."""

    def __init__(self, width: int = 4, pads: tuple[int, int] = (2, 2), spatial: tuple[int, ...] = (1, 0, 0, 1)):
        super().__init__()
        out = width + sum(pads)
        self.pads, self.spatial = pads, spatial
        self.stem = conv_bn(3, width)
        self.a, self.b = conv_bn(width, out, 3, 2), conv_bn(out, out)
        self.head = nn.Conv2d(out, 3, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.b(F.relu(self.a(x))) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.pads)))
        return self.head(F.pad(y, self.spatial)).mean((2, 3))


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass that calls the functional op on its own tensors (running statistics by
    position, affine parameters by keyword) and fuses its activation, as timm's norm-act layers do."""

    def forward(self, x):
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            weight=self.weight,
            bias=self.bias,
            training=False,
            momentum=0.1,
            eps=self.eps,
        )
        return F.relu(x)


class FunctionalConv(nn.Module):
    """A custom conv layer: its own weight through `F.conv2d`."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


class FunctionalNorms(nn.Module):
    """Tensors that reach ops through get_attr: functional BN, a custom conv, and a layer-scale vector
    multiplying a residual branch."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, width, 3, padding=1, bias=False), BatchNormAct(width)
        self.conv, self.bn = FunctionalConv(width, width), BatchNormAct(width)
        self.gamma = nn.Parameter(torch.rand(width) + 0.5)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        x = self.stem_bn(self.stem(x))
        x = x + self.bn(self.conv(x)) * self.gamma.view(1, -1, 1, 1)
        return self.head(x).mean((2, 3))


class CachedBias(nn.Module):
    """LeViT / EfficientFormer attention: in eval mode a bias gathered from a table is cached per device in a
    plain dict (``self.cache[key] = self.table[:, idx]``), so a trace stores its own proxy in the model."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 1)
        self.table = nn.Parameter(torch.randn(6, 4))
        self.register_buffer("idx", torch.tensor([[0, 1, 2], [3, 2, 1], [0, 0, 3]]), persistent=False)
        self.cache: dict[str, torch.Tensor] = {}

    def bias(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.table[:, self.idx]
        if str(device) not in self.cache:
            self.cache[str(device)] = self.table[:, self.idx]
        return self.cache[str(device)]

    def forward(self, x):
        y = self.conv(x)
        return self.head(y + self.bias(x.device)[None]).mean((2, 3))


class GroupNormsUnflatten(nn.Module):
    """GroupNorm with one group, with 2 and with one group per channel, and a Linear whose output an
    ``nn.Unflatten`` turns into a feature map."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 32)
        self.unflatten = nn.Unflatten(1, (8, 2, 2))
        self.a, self.gn1 = nn.Conv2d(8, 6, 1), nn.GroupNorm(1, 6)
        self.b, self.gn2 = nn.Conv2d(6, 8, 1), nn.GroupNorm(2, 8)
        self.c, self.gn3 = nn.Conv2d(8, 6, 1), nn.GroupNorm(6, 6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.unflatten(self.fc(x.mean((2, 3))))
        x = torch.relu(self.gn1(self.a(x)))
        x = torch.relu(self.gn2(self.b(x)))
        return self.head(torch.relu(self.gn3(self.c(x)))).mean((2, 3))


TRICKY = {
    "functional_norms": (FunctionalNorms, (2, 3, 6, 6)),
    "cifar_resnet": (CifarResNet, (2, 3, 8, 8)),
    "concat_residual": (ConcatResidual, (2, 3, 6, 6)),
    "shuffle": (ShuffleBlock, (2, 3, 6, 6)),
    "split": (SplitNet, (2, 3, 5, 5)),
    "multiscale_split": (MultiScaleSplit, (2, 3, 5, 5)),
    "se_grouped": (SENet, (2, 3, 6, 6)),
    "shared_conv": (SharedConv, (2, 3, 5, 5)),
    "flatten_linear": (FlattenLinear, (2, 3, 8, 8)),
    "transformer": (TransformerNet, (2, 3, 8, 8)),
    "pad_shortcut": (PadShortcut, (2, 3, 6, 6)),
    "cached_bias": (CachedBias, (2, 3, 3, 3)),
    "group_norms_unflatten": (GroupNormsUnflatten, (2, 3, 4, 4)),
}
