"""Datasets for the ResRep app: in-memory arrays, torchvision folders, and the offline digits default.

Every source ends up as a `torch.utils.data.Dataset` of `(image CHW float32, label int64)` pairs plus a
`DataInfo` (classes, channels, image size). Nothing is downloaded unless `DataConfig.download` is set.

Sources (`DataConfig.dataset`):
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, offline).
- ``npz``: an arrays file with ``x_train, y_train, x_test, y_test`` (uint8 NHWC images).
- ``jpeg-npz``: JPEG bytes with offsets (``train_jpeg, train_offsets, y_train, test_jpeg, ...``),
  decoded once with pillow.
- ``cifar10`` / ``cifar100``: the torchvision CIFAR folders under ``root``.
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet layout).

Batches are drawn by `EpochSampler`: a shuffle fixed by ``(seed, epoch)`` that can start at any batch,
so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DataConfig",
    "DataInfo",
    "DataError",
    "ArrayDataset",
    "EpochSampler",
    "Views",
    "load_digits_arrays",
    "load_npz_arrays",
    "load_jpeg_npz_arrays",
    "build_datasets",
    "build_loaders",
]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A data source is missing, malformed or unsupported; the message says what to fix."""


@dataclass
class DataConfig:
    """Where the data comes from and how it is batched."""

    dataset: str = "digits"
    """digits | npz | jpeg-npz | cifar10 | cifar100 | imagefolder."""
    root: str = ""
    """File (npz, jpeg-npz) or folder (cifar10/100, imagefolder); unused for digits."""
    batch_size: int = 64
    """Per-process batch size."""
    workers: int = 0
    """DataLoader worker processes."""
    augment: bool = True
    """Random crop (pad = size/8) and horizontal flip for training (no flip for digits)."""
    download: bool = False
    """Let torchvision download CIFAR into root when it is missing."""
    image_size: int = 224
    """Crop size for imagefolder (train RandomResizedCrop, test resize 8/7 + center crop)."""
    normalize: str = "imagenet"
    """Mean/std preset: imagenet | cifar | none (digits are always scaled to [0, 1])."""
    train_limit: int = 0
    """Keep only the first N training examples (0: all), for smoke runs."""
    test_limit: int = 0
    """Keep only the first N test examples (0: all), for smoke runs."""


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int


class ArrayDataset(Dataset):
    """uint8 NHWC images held in memory; augmentation runs on tensors with torch's global RNG.

    Output x = (crop/flip(img) / 255 - mean) / std, as float32 CHW.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool,
        flip: bool = True,
        scale: float = 255.0,
    ):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(f"images must be uint8 NHWC, got {images.dtype} with shape {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # N C H W view
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        c = self.images.shape[1]
        self.mean = torch.tensor(mean[:c] if len(mean) >= c else mean * c, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std[:c] if len(std) >= c else std * c, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.flip, self.scale = augment, flip, scale
        self.pad = max(1, self.images.shape[-1] // 8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float() / self.scale
        if self.augment:
            h, w = x.shape[-2:]
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = padded[:, dy : dy + h, dx : dx + w]
            if self.flip and bool(torch.rand(()) < 0.5):
                x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]


class Views(Dataset):
    """Each example of `dataset` as ``views`` independent draws of its augmentation, stacked: ``x`` of
    shape (views, C, H, W) per example, (B, views, C, H, W) per batch (what a two-view method such as
    CR-SFP trains on)."""

    def __init__(self, dataset: Dataset, views: int) -> None:
        if views < 2:
            raise ValueError(f"Views needs at least 2 views, got {views}")
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        draws = [self.dataset[i] for _ in range(self.views)]
        return torch.stack([x for x, _ in draws]), draws[0][1]


class EpochSampler(Sampler[int]):
    """Indices for one process: a permutation fixed by (seed, epoch), split across ranks, from a start batch.

    `set_epoch(epoch, start_batch)` selects the permutation and skips the batches already consumed, which
    is what makes a resumed run continue exactly where the checkpoint was written.
    """

    def __init__(
        self, n: int, *, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(n / world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size  # pad (cyclically) so every rank gets as many
        order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start_batch * self.batch_size)


def _limit(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    return (x[:n], y[:n]) if n > 0 else (x, y)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (the file behind `sklearn.datasets.load_digits`) as uint8 NHWC
    (values 0..16), split 75/25 per class with a fixed seed.

    The CSV is read straight from the installed package, which skips importing scikit-learn (seconds).
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"scikit-learn's digits file is missing at {path}; reinstall scikit-learn")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    x, y = table[:, :-1].reshape(-1, 8, 8, 1).astype(np.uint8), table[:, -1]
    rng = np.random.default_rng(0)
    test = np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[: round(0.25 * int((y == c).sum()))] for c in np.unique(y)]
        )
    )
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train], y[train], x[test], y[test]


def _check_file(path: str, what: str) -> Path:
    if not path:
        raise DataError(f"{what}: no path given (set --root to the file)")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what}: file not found: {p}")
    return p


def _open_npz(p: Path, keys: tuple[str, ...], what: str):
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # zip/format errors surface as many exception types
        raise DataError(f"{what}: cannot read {p} as .npz ({type(e).__name__}: {e})") from e
    missing = [k for k in keys if k not in z.files]
    if missing:
        raise DataError(f"{what}: {p} lacks keys {missing} (has {sorted(z.files)})")
    return z


def load_npz_arrays(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read ``x_train, y_train, x_test, y_test`` (uint8 NHWC images, integer labels) from an .npz."""
    p = _check_file(path, "npz dataset")
    z = _open_npz(p, ("x_train", "y_train", "x_test", "y_test"), "npz dataset")
    out = []
    for xk, yk in (("x_train", "y_train"), ("x_test", "y_test")):
        x, y = z[xk], z[yk]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"npz dataset: {xk} must be uint8 (N,H,W,C), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"npz dataset: {yk} must be (N,) with N = {len(x)}, got {y.shape}")
        out += [x, y.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, what: str) -> np.ndarray:
    from PIL import Image

    images = []
    for i in range(len(offsets) - 1):
        try:
            images.append(
                np.asarray(Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
            )
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for undecodable bytes
            raise DataError(f"{what}: image {i} does not decode ({e}); the file is corrupt, rebuild it") from None
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{what}: the images differ in size ({sorted({im.shape for im in images})[:3]} …)")
    return np.stack(images)


def load_jpeg_npz_arrays(
    path: str, *, train_limit: int = 0, test_limit: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode a JPEG-bytes .npz (``train_jpeg, train_offsets, y_train, test_jpeg, test_offsets, y_test``)."""
    p = _check_file(path, "jpeg-npz dataset")
    keys = ("train_jpeg", "train_offsets", "y_train", "test_jpeg", "test_offsets", "y_test")
    z = _open_npz(p, keys, "jpeg-npz dataset")
    out = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        off, y = z[f"{split}_offsets"], z[f"y_{split}"].astype(np.int64)
        if len(off) != len(y) + 1:
            raise DataError(f"jpeg-npz dataset: {split}_offsets has {len(off)} entries for {len(y)} labels")
        n = min(limit, len(y)) if limit > 0 else len(y)
        out += [_decode_jpegs(z[f"{split}_jpeg"], off[: n + 1], f"jpeg-npz dataset {p}, {split}_jpeg"), y[:n]]
    return out[0], out[1], out[2], out[3]


def _stats(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    preset = cfg.normalize
    table = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR_MEAN, CIFAR_STD), "none": ((0.0,), (1.0,))}
    if preset not in table:
        raise DataError(f"unknown normalize preset {preset!r}; use one of {sorted(table)}")
    return table[preset]


def _arrays_datasets(
    cfg: DataConfig, arrays, *, scale: float = 255.0, flip: bool = True, stats=None
) -> tuple[Dataset, Dataset, DataInfo]:
    x_tr, y_tr, x_te, y_te = arrays
    x_tr, y_tr = _limit(x_tr, y_tr, cfg.train_limit)
    x_te, y_te = _limit(x_te, y_te, cfg.test_limit)
    mean, std = stats or _stats(cfg)
    train = ArrayDataset(x_tr, y_tr, mean=mean, std=std, augment=cfg.augment, flip=flip, scale=scale)
    test = ArrayDataset(x_te, y_te, mean=mean, std=std, augment=False, scale=scale)
    classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    return train, test, DataInfo(classes, x_tr.shape[-1], x_tr.shape[1])


def _torchvision_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, DataInfo]:
    import torchvision
    from torchvision import transforms as T

    root = Path(cfg.root) if cfg.root else None
    if root is None:
        raise DataError(f"{cfg.dataset}: set --root to the dataset folder")
    if not root.is_dir() and not cfg.download:
        raise DataError(f"{cfg.dataset}: data folder not found: {root} (pass --download to fetch it)")
    if cfg.dataset in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        mean, std = _stats(cfg)
        norm = [T.ToTensor(), T.Normalize(mean, std)]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if cfg.augment else []
        try:
            train = cls(str(root), train=True, transform=T.Compose(aug + norm), download=cfg.download)
            test = cls(str(root), train=False, transform=T.Compose(norm), download=cfg.download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DataError(f"{cfg.dataset}: {e} (root {root}; pass --download to fetch it)") from e
        info = DataInfo(10 if cfg.dataset == "cifar10" else 100, 3, 32)
    else:  # imagefolder
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"imagefolder: expected {root / split}/<class>/<images> (ImageNet layout)")
        mean, std = _stats(cfg)
        s = cfg.image_size
        norm = [T.ToTensor(), T.Normalize(mean, std)]
        aug = (
            [T.RandomResizedCrop(s), T.RandomHorizontalFlip()]
            if cfg.augment
            else [T.Resize(s * 8 // 7), T.CenterCrop(s)]
        )
        train = torchvision.datasets.ImageFolder(str(root / "train"), transform=T.Compose(aug + norm))
        test = torchvision.datasets.ImageFolder(
            str(root / "val"), transform=T.Compose([T.Resize(s * 8 // 7), T.CenterCrop(s)] + norm)
        )
        if train.classes != test.classes:
            raise DataError(f"imagefolder: train and val class folders differ under {root}")
        info = DataInfo(len(train.classes), 3, s)
    if cfg.train_limit > 0:
        train = torch.utils.data.Subset(train, range(min(cfg.train_limit, len(train))))
    if cfg.test_limit > 0:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    return train, test, info


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, DataInfo]:
    """The (train, test) datasets and their `DataInfo` for `cfg`; raises `DataError` on bad input."""
    if cfg.dataset == "digits":
        return _arrays_datasets(cfg, load_digits_arrays(), scale=16.0, flip=False, stats=((0.0,), (1.0,)))
    if cfg.dataset == "npz":
        return _arrays_datasets(cfg, load_npz_arrays(cfg.root))
    if cfg.dataset == "jpeg-npz":
        arrays = load_jpeg_npz_arrays(cfg.root, train_limit=cfg.train_limit, test_limit=cfg.test_limit)
        return _arrays_datasets(cfg, arrays)
    if cfg.dataset in ("cifar10", "cifar100", "imagefolder"):
        return _torchvision_datasets(cfg)
    raise DataError(f"unknown dataset {cfg.dataset!r}; use digits, npz, jpeg-npz, cifar10, cifar100 or imagefolder")


def build_loaders(
    cfg: DataConfig,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    views: int = 1,
) -> tuple[DataLoader, DataLoader, DataInfo]:
    """Train loader (an `EpochSampler` shuffled by `seed` and the epoch, this rank's shard; with
    ``views`` > 1 every image as that many independently augmented `Views`) and test loader (whole set,
    in order, on every rank, one view)."""
    train, test, info = build_datasets(cfg)
    if views > 1:
        train = Views(train, views)
    sampler = EpochSampler(len(train), batch_size=cfg.batch_size, seed=seed, rank=rank, world_size=world_size)
    kw = dict(num_workers=cfg.workers, pin_memory=pin_memory, persistent_workers=False)
    train_loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=False, **kw)
    test_loader = DataLoader(test, batch_size=max(cfg.batch_size, 256), shuffle=False, **kw)
    return train_loader, test_loader, info
