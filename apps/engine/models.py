"""Models for the ResRep app: CIFAR ResNets, a small residual CNN for digits, torchvision and user models.

`build_model(ModelConfig)` is the one entry; `load_weights` reads our checkpoints and the published
CIFAR ResNet files (``{'state_dict': ..., 'best_prec1': ...}`` with ``module.``-prefixed keys, saved on
CUDA) and refuses, naming the keys, when the architecture does not match.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reparam.graph import PrunePlan, apply_plan
from reparam.ops.modules import geometry_from_module, geometry_to_module

from .checkpoint import CheckpointError, load_file

__all__ = [
    "ModelConfig",
    "ModelError",
    "CifarResNet",
    "DigitsResNet",
    "build_model",
    "load_weights",
    "unwrap_state_dict",
    "load_state_dict_checked",
    "biased_like",
    "deploy_shell",
    "CIFAR_DEPTHS",
]

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


class ModelError(ValueError):
    """The model cannot be built or the weights do not fit it; the message names what to change."""


@dataclass
class ModelConfig:
    """Which network to build."""

    arch: str = "digits_resnet"
    """``resnet20|32|44|56|110`` (CIFAR ResNet), ``digits_resnet``, ``tv:<name>`` (any torchvision classifier, e.g. ``tv:resnet18``) or a factory ``pkg.module:callable`` (called with ``num_classes=``)."""
    shortcut: str = "A"
    """CIFAR ResNets only: ``A`` (zero-pad, parameter-free; the published checkpoints) or ``B`` (1x1 conv + BN projection)."""
    width: int = 16
    """Base width of ``digits_resnet``."""
    tv_weights: str = ""
    """torchvision weights name (e.g. ``DEFAULT``); downloads, so only when asked."""


class PadShortcut(nn.Module):
    """Option-A shortcut: x[:, :, ::2, ::2] zero-padded from C to 2C channels (C/2 zeros either side)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) with 3x3 convs."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            if cout != 2 * cin or stride != 2:
                raise ModelError(f"option-A shortcut needs cout = 2*cin and stride 2, got {cin}->{cout}/{stride}")
            self.shortcut = PadShortcut(cin // 2)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            raise ModelError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers; widths 16/32/64; stride 2 entering stages 2 and 3).

    Parameter names match the published checkpoints: ``conv1, bn1, layer{1,2,3}.{i}.conv1/bn1/conv2/bn2,
    linear`` (option B adds ``layer{2,3}.0.shortcut.{0,1}``).
    """

    def __init__(self, depth: int = 56, num_classes: int = 10, shortcut: str = "A", in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (e.g. {CIFAR_DEPTHS}), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, cin = (16, 32, 64), 16
        for s, w in enumerate(widths):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (s > 0 and i == 0) else 1, shortcut))
                cin = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DigitsResNet(nn.Module):
    """A small residual CNN for 8x8 digits: stem, two residual blocks at 8x8, one projection block to 4x4."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1, "B"), BasicBlock(width, width, 1, "B"))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, "B"))
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    mod, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ModelError(f"cannot import model module {mod!r} from {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{mod!r} has no attribute {attr!r} (model spec {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model spec {spec!r} is not callable")
    return obj


def build_model(cfg: ModelConfig, *, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the network named by `cfg` for `num_classes` outputs and `in_channels` input channels."""
    arch = cfg.arch
    if arch.startswith("resnet") and arch[6:].isdigit() and ":" not in arch:
        return CifarResNet(int(arch[6:]), num_classes, cfg.shortcut.upper(), in_channels)
    if arch == "digits_resnet":
        return DigitsResNet(num_classes, in_channels, cfg.width)
    if arch.startswith("tv:"):
        import torchvision

        name = arch[3:]
        if name not in torchvision.models.list_models():
            raise ModelError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        if cfg.tv_weights:
            model = torchvision.models.get_model(name, weights=cfg.tv_weights)
            if num_classes != getattr(model, "num_classes", num_classes):
                raise ModelError(
                    f"{name} weights {cfg.tv_weights} have a fixed head; drop tv_weights "
                    f"or use num_classes matching the weights"
                )
            return model
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if ":" in arch:
        model = _import_factory(arch)(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ModelError(f"{arch!r} returned {type(model).__name__}, not an nn.Module")
        return model
    raise ModelError(
        f"unknown arch {arch!r}: use resnet20/32/44/56/110, digits_resnet, tv:<name> or pkg.module:callable"
    )


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The bare state_dict from a checkpoint object: ``{'state_dict': sd}``, ``{'model': sd}`` or ``sd``;
    the ``module.`` prefix (DataParallel/DDP) is stripped."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "checkpoint holds no state_dict (expected a dict of tensors, or one under 'state_dict' / 'model')"
        )
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """`model.load_state_dict(sd)` that raises `ModelError` naming missing, unexpected and shape-mismatched
    keys (a checkpoint of another architecture) instead of a bare RuntimeError."""
    own = model.state_dict()
    # files from older PyTorch (the published CIFAR ResNets) lack BN step counters: keep the model's
    sd = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in sd}, **sd}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def head(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

        parts = [
            f"missing {head(missing)}" if missing else "",
            f"unexpected {head(unexpected)}" if unexpected else "",
            f"shape mismatch {head(shapes)}" if shapes else "",
        ]
        raise ModelError(
            f"{source} does not fit {type(model).__name__}: "
            + "; ".join(p for p in parts if p)
            + " (check --arch/--shortcut/--width)"
        )
    model.load_state_dict(sd)
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint file's weights into `model` (in place, onto the model's device/dtype).

    Accepts our training checkpoints (``{'model': sd, ...}``), the published CIFAR ResNet files
    (``{'state_dict': sd}``, ``module.`` prefixes, CUDA tensors) and bare state_dicts. Raises `ModelError`
    when the file was saved from another architecture and `CheckpointError` when it is unreadable.
    """
    return load_state_dict_checked(model, unwrap_state_dict(load_file(path)), f"checkpoint {path}")


def _resized(module: nn.Module, sd: Mapping[str, torch.Tensor], prefix: str) -> nn.Module:
    """A fresh module of `module`'s kind and geometry with the parameter shapes found in `sd`."""
    w = sd[prefix + "weight"]
    has_bias = prefix + "bias" in sd
    kw = dict(device=w.device, dtype=w.dtype)
    if isinstance(module, nn.Linear):
        return nn.Linear(w.shape[1], w.shape[0], bias=has_bias, **kw)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        groups = module.groups if module.groups == 1 else w.shape[0] // (module.out_channels // module.groups)
        return type(module)(
            w.shape[1] * groups,
            w.shape[0],
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            groups,
            has_bias,
            module.padding_mode,
            **kw,
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return type(module)(w.shape[0], module.eps, module.momentum, module.affine, module.track_running_stats, **kw)
    raise ModelError(f"{prefix[:-1]}: cannot resize a {type(module).__name__} to the saved shapes")


def biased_like(layer: nn.Module) -> nn.Module:
    """A fresh conv/linear with ``layer``'s geometry, size, device and dtype, and a bias."""
    kw = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=True, **kw)
    return geometry_to_module(geometry_from_module(layer), layer.in_channels, layer.out_channels, True, **kw)


def deploy_shell(model: nn.Module, state_dict: Mapping[str, torch.Tensor], plan: str | None = None) -> nn.Module:
    """`model` (built by `build_model`) reshaped to hold a converted state_dict, then loaded with it.

    A converted ResRep network keeps the original module names; its convs/linears are narrower and
    biased, and its BatchNorms are gone. With the conversion's channel ``plan`` (the JSON that
    `apps.resrep` stores in ``deploy.pt``): every BN without saved entries becomes `nn.Identity`, every
    conv/linear with a saved bias gets one, and `reparam.graph.apply_plan` redoes the surgery, which
    also rewrites sizes in the forward code (e.g. option-A shortcut pads). Without a plan (files of
    other tools): every conv/linear/BN whose saved shapes differ is rebuilt at those shapes, which is
    right only when no size is written in the forward code. Checked by `load_state_dict_checked`.
    """
    shell = model
    for name, module in list(shell.named_modules()):
        if not name or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
            continue
        prefix = name + "."
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and prefix + "weight" not in state_dict
            and prefix + "running_mean" not in state_dict
        ):
            replacement: nn.Module = nn.Identity()
        elif prefix + "weight" not in state_dict:
            continue
        elif plan is not None:
            if prefix + "bias" not in state_dict or module.bias is not None:
                continue
            replacement = biased_like(module)
        else:
            own = dict(module.named_parameters(recurse=False))
            same = state_dict[prefix + "weight"].shape == own["weight"].shape and (
                (prefix + "bias" in state_dict) == (own.get("bias") is not None)
            )
            if same:
                continue
            replacement = _resized(module, state_dict, prefix)
        parent, _, attr = name.rpartition(".")
        setattr(shell.get_submodule(parent) if parent else shell, attr, replacement)
    if plan is not None:
        shell = apply_plan(shell, PrunePlan.from_json(plan), "the converted model's channel plan")
    return load_state_dict_checked(shell, state_dict, "converted state_dict")
