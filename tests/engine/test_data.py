"""Data sources of the ResRep app: digits, arrays .npz, JPEG-bytes .npz, folders, and the resumable sampler."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from apps.engine.data import (
    ArrayDataset,
    DataConfig,
    DataError,
    EpochSampler,
    build_datasets,
    build_loaders,
    load_digits_arrays,
    load_jpeg_npz_arrays,
    load_npz_arrays,
)


def _arrays(n_train=12, n_test=5, size=8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        x_train=rng.integers(0, 256, (n_train, size, size, channels), dtype=np.uint8),
        y_train=rng.integers(0, 4, n_train),
        x_test=rng.integers(0, 256, (n_test, size, size, channels), dtype=np.uint8),
        y_test=rng.integers(0, 4, n_test),
    )


def test_digits_split_is_fixed_and_stratified():
    x_tr, y_tr, x_te, y_te = load_digits_arrays()
    assert len(x_tr) + len(x_te) == 1797 and abs(len(x_te) - 450) <= 5
    assert x_tr.shape[1:] == (8, 8, 1) and x_tr.dtype == np.uint8 and x_tr.max() == 16
    assert set(np.unique(y_te)) == set(range(10)) and np.bincount(y_te).min() >= 44  # stratified
    again = load_digits_arrays()
    assert np.array_equal(again[0], x_tr) and np.array_equal(again[3], y_te)


def test_digits_datasets_scale_to_unit_range():
    train, test, info = build_datasets(DataConfig(dataset="digits", augment=False))
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    x, y = test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.dtype == torch.int64


def test_npz_dataset_normalises_and_limits(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "d.npz", **arrays)
    train, test, info = build_datasets(
        DataConfig(dataset="npz", root=str(tmp_path / "d.npz"), augment=False, normalize="cifar", test_limit=3)
    )
    assert len(train) == 12 and len(test) == 3 and info.in_channels == 3 and info.image_size == 8
    x, y = train[4]
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)
    expected = (torch.from_numpy(arrays["x_train"][4]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    assert int(y) == arrays["y_train"][4]


def test_augmentation_is_a_shifted_crop_and_follows_the_global_rng():
    img = np.arange(2 * 8 * 8 * 1, dtype=np.uint8).reshape(2, 8, 8, 1)
    ds = ArrayDataset(img, np.zeros(2, np.int64), mean=(0.0,), std=(1.0,), augment=True)
    torch.manual_seed(3)
    a = ds[1][0]
    torch.manual_seed(3)
    b = ds[1][0]
    torch.testing.assert_close(a, b)
    plain = torch.from_numpy(img[1]).permute(2, 0, 1).float() / 255
    padded = torch.nn.functional.pad(plain, (1, 1, 1, 1))
    crops = [padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)]
    assert any(torch.equal(a, c) or torch.equal(a, c.flip(-1)) for c in crops)


@pytest.mark.parametrize("problem", ["missing", "keys", "dtype", "corrupt"])
def test_npz_errors_are_clear(tmp_path, problem):
    path = tmp_path / "d.npz"
    arrays = _arrays()
    if problem == "keys":
        arrays.pop("y_test")
    if problem == "dtype":
        arrays["x_train"] = arrays["x_train"].astype(np.float32)
    if problem != "missing":
        np.savez(path, **arrays)
    if problem == "corrupt":
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        DataError,
        match={"missing": "not found", "keys": "lacks keys", "dtype": "uint8", "corrupt": "cannot read"}[problem],
    ):
        load_npz_arrays(str(path))


def test_jpeg_npz_decodes_like_pillow(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    blobs = []
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    data = np.concatenate(blobs)
    np.savez(
        tmp_path / "j.npz",
        train_jpeg=data,
        train_offsets=offsets,
        y_train=np.arange(5),
        test_jpeg=data,
        test_offsets=offsets,
        y_test=np.arange(5),
    )
    x_tr, y_tr, x_te, y_te = load_jpeg_npz_arrays(str(tmp_path / "j.npz"), test_limit=2)
    assert x_tr.shape == (5, 8, 8, 3) and x_te.shape == (2, 8, 8, 3) and list(y_te) == [0, 1]
    expected = np.asarray(Image.open(io.BytesIO(blobs[3].tobytes())).convert("RGB"))
    assert np.array_equal(x_tr[3], expected)
    corrupt = data.copy()
    corrupt[offsets[2] : offsets[3]] = 0  # image 2's bytes overwritten
    np.savez(tmp_path / "bad.npz", **{**np.load(tmp_path / "j.npz"), "test_jpeg": corrupt})
    with pytest.raises(DataError, match=r"bad.npz, test_jpeg: image 2 does not decode .* corrupt"):
        load_jpeg_npz_arrays(str(tmp_path / "bad.npz"))


def test_cifar_folder_missing_is_refused_without_download(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="--download"):
        build_datasets(DataConfig(dataset="cifar10", root=str(root)))
    assert not root.exists()


def test_imagefolder_layout(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((10, 12, 3), 100, np.uint8)).save(tmp_path / split / cls / "x.png")
    train, test, info = build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8))
    assert info.num_classes == 2 and len(train) == 2 and test[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match="ImageNet layout"):
        build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path / "train")))


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        build_datasets(DataConfig(dataset="mnist"))


@given(
    n=st.integers(1, 60),
    batch=st.integers(1, 9),
    world=st.integers(1, 3),
    epoch=st.integers(0, 5),
    seed=st.integers(0, 3),
    data=st.data(),
)
def test_epoch_sampler_shards_cover_and_resume(n, batch, world, epoch, seed, data):
    samplers = [EpochSampler(n, batch_size=batch, seed=seed, rank=r, world_size=world) for r in range(world)]
    shards = []
    for s in samplers:
        s.set_epoch(epoch)
        shards.append(list(s))
    assert len({len(x) for x in shards}) == 1  # every rank takes as many steps
    assert set().union(*map(set, shards)) == set(range(n))
    start = data.draw(st.integers(0, len(shards[0]) // batch))
    samplers[0].set_epoch(epoch, start)
    assert list(samplers[0]) == shards[0][start * batch :] and len(samplers[0]) == len(shards[0]) - start * batch
    again = EpochSampler(n, batch_size=batch, seed=seed, rank=0, world_size=world)
    again.set_epoch(epoch)
    assert list(again) == shards[0]


def test_epochs_shuffle_differently():
    s = EpochSampler(50, batch_size=5)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == sorted(first)


def test_loaders_batch_shapes():
    train, test, info = build_loaders(DataConfig(dataset="digits", batch_size=32))
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert len(train) == -(-len(train.dataset) // 32) and sum(len(b[1]) for b in test) == len(test.dataset)


def test_real_cifar10_jpeg_decodes(shared_data):
    x_tr, y_tr, x_te, y_te = load_jpeg_npz_arrays(
        str(shared_data / "cifar10-jpeg" / "cifar10_jpegbytes.npz"), train_limit=64, test_limit=64
    )
    assert x_tr.shape == (64, 32, 32, 3) and x_te.shape == (64, 32, 32, 3)
    assert set(np.unique(np.concatenate([y_tr, y_te]))) <= set(range(10))
    assert 60 < x_te.mean() < 200  # real photographs, not blank decodes
