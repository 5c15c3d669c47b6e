"""Tests of experiments/data.py: sources, cache, errors, normalization, batches, augmentation."""

import gc
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import chex
import ml_collections
import numpy as np
import pytest
from PIL import Image

from experiments import data, download
from experiments.cli import UserError

# Class directories are created in this (unsorted) order; labels must follow the sorted names.
CLASSES = ("dog", "airplane", "cat")
COLOURS = {"airplane": (200, 30, 30), "cat": (30, 200, 30), "dog": (30, 30, 200)}
SIZE = 8


def _write_folder(root, per_class=None, size=SIZE, fmt="png"):
    """root/split/class/NNNN.fmt; image = class colour + the file index in pixel [0, 0]."""
    per_class = per_class or {"train": 3, "test": 2}
    for split, n in per_class.items():
        for cls in CLASSES:
            os.makedirs(root / split / cls)
            for i in range(n):
                pixels = np.empty((size, size, 3), np.uint8)
                pixels[:] = COLOURS[cls]
                pixels[0, 0] = (i, i, i)
                Image.fromarray(pixels).save(root / split / cls / f"{i:04d}.{fmt}")
    return root


def _tar(folder, out, prefix="."):
    """Archives folder with members in file-system creation order (test before train, dog first)."""
    with tarfile.open(out, "w:gz") as tar:
        for split in sorted(os.listdir(folder), reverse=True):
            classes = sorted(os.listdir(folder / split), key=lambda c: (c not in CLASSES, c))
            classes.sort(key=lambda c: CLASSES.index(c) if c in CLASSES else len(CLASSES))
            for cls in classes:
                tar.add(folder / split / cls, arcname=f"{prefix}/{split}/{cls}")
    return out


def _expected_labels(images):
    """Labels implied by the pixel colours, with the sorted class order."""
    names = sorted(CLASSES)
    colours = np.array([COLOURS[c] for c in names])
    centre = images[:, SIZE // 2, SIZE // 2].astype(int)
    return np.abs(centre[:, None, :] - colours[None]).sum(-1).argmin(1)


def data_cfg(**overrides):
    """A complete ``config.data`` (every field :func:`data.load` reads), with overrides."""
    cfg = ml_collections.ConfigDict(
        {
            "source": "folder",
            "name": "cifar10",
            "path": None,
            "cache_dir": None,
            "tfds_data_dir": None,
            "num_train": None,
            "num_test": None,
            "augment": True,
            "url": None,
            "md5": None,
            "synthetic": {"image_size": 32, "num_classes": 10, "seed": 0},
        }
    )
    cfg.update(overrides)
    return cfg


def _folder_cfg(path, cache_dir, **kw):
    return data_cfg(source="folder", path=str(path), cache_dir=str(cache_dir), **kw)


def _message(excinfo):
    """What the user sees: the message and the hint."""
    return f"{excinfo.value} {getattr(excinfo.value, 'hint', '') or ''}"


# --- folder source ----------------------------------------------------------------------------


@pytest.mark.parametrize("as_tar", [False, True])
def test_folder_source_labels_shapes_and_pixels(tmp_path, as_tar):
    folder = _write_folder(tmp_path / "imgs")
    path = _tar(folder, tmp_path / "imgs.tar.gz") if as_tar else folder
    ds = data.load(_folder_cfg(path, tmp_path / "cache"))
    assert ds.class_names == ("airplane", "cat", "dog")
    assert ds.num_classes == 3
    chex.assert_shape(ds.train_images, (9, SIZE, SIZE, 3))
    chex.assert_shape(ds.test_images, (6, SIZE, SIZE, 3))
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_labels, _expected_labels(ds.train_images))
    np.testing.assert_array_equal(ds.test_labels, _expected_labels(ds.test_images))
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [3, 3, 3])
    # PNG is lossless: pixels are exact, ordered by (class, file name).
    np.testing.assert_array_equal(ds.train_images[:, 0, 0, 0], [0, 1, 2] * 3)
    np.testing.assert_array_equal(ds.train_images[0, 1, 1], COLOURS["airplane"])
    ref = ds.train_images.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, ref.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(ds.std, ref.std(axis=(0, 1, 2)), atol=1e-6)


def test_folder_jpeg_in_tar_with_wrapping_directory(tmp_path):
    folder = _write_folder(tmp_path / "imgs", fmt="jpg")
    path = _tar(folder, tmp_path / "imgs.tgz", prefix="cifar")  # cifar/train/dog/0000.jpg
    ds = data.load(_folder_cfg(path, tmp_path / "cache"))
    np.testing.assert_array_equal(ds.train_labels, _expected_labels(ds.train_images))
    # JPEG is lossy, but a flat colour survives to within a few levels.
    assert np.abs(ds.train_images[0, 4, 4].astype(int) - COLOURS["airplane"]).max() <= 8


def test_folder_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    folder = _write_folder(tmp_path / "imgs")
    path = _tar(folder, tmp_path / "imgs.tar.gz")
    cache = tmp_path / "cache"
    first = data.load(_folder_cfg(path, cache))
    assert [f for f in os.listdir(cache) if f.endswith(".npz")] == os.listdir(cache)
    assert len(os.listdir(cache)) == 1  # no temporary file left

    def fail(_):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data, "_decode_image", fail)
    second = data.load(_folder_cfg(path, cache))
    np.testing.assert_array_equal(second.train_images, first.train_images)
    np.testing.assert_array_equal(second.test_labels, first.test_labels)
    assert second.class_names == first.class_names
    # The same archive by another path (a link, another checkout's ../shared): the same entry.
    os.symlink(path, tmp_path / "link.tar.gz")
    data.load(_folder_cfg(tmp_path / "link.tar.gz", cache))
    assert len(os.listdir(cache)) == 1
    # A changed archive (new size and mtime) has a new key: it is decoded again.
    _write_folder(tmp_path / "more", per_class={"train": 4, "test": 2})
    _tar(tmp_path / "more", path)
    with pytest.raises(ValueError, match="decoded again"):
        data.load(_folder_cfg(path, cache))
    monkeypatch.undo()
    assert len(data.load(_folder_cfg(path, cache)).train_labels) == 12


def test_folder_subsample_is_stratified_and_fixed(tmp_path):
    folder = _write_folder(tmp_path / "imgs", per_class={"train": 4, "test": 2})
    cfg = _folder_cfg(folder, tmp_path / "cache", num_train=6, num_test=3)
    ds = data.load(cfg)
    np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=3), [2, 2, 2])
    np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=3), [1, 1, 1])
    np.testing.assert_array_equal(ds.train_labels, _expected_labels(ds.train_images))
    np.testing.assert_array_equal(data.load(cfg).train_images, ds.train_images)
    with pytest.raises(ValueError, match="num_train"):
        data.load(_folder_cfg(folder, tmp_path / "cache", num_train=13))


def test_subsample_class_counts_differ_by_at_most_one():
    labels = np.repeat(np.arange(5), [40, 30, 30, 20, 10])
    for n in (1, 7, 25, 49, 130):
        idx = data.subsample(labels, n)
        assert len(np.unique(idx)) == n and np.all(np.diff(idx) > 0)
        counts = np.bincount(labels[idx], minlength=5)
        sizes = np.bincount(labels)
        not_full = counts < sizes  # classes that still had examples left
        if not_full.any():
            assert counts.max() - counts[not_full].min() <= 1
        else:
            assert n == len(labels)
    np.testing.assert_array_equal(data.subsample(labels, 25), data.subsample(labels, 25))


def _assert_layout_error(excinfo):
    assert isinstance(excinfo.value, UserError)
    assert "split/class/image.jpg" in _message(excinfo)


def test_folder_bad_paths_error_clearly(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="nope.tar.gz.*does not exist") as e:
        data.load(_folder_cfg(tmp_path / "nope.tar.gz", cache))
    _assert_layout_error(e)

    only_train = _write_folder(tmp_path / "only_train", per_class={"train": 1})
    with pytest.raises(ValueError, match="no test directory") as e:
        data.load(_folder_cfg(only_train, cache))
    _assert_layout_error(e)
    with pytest.raises(ValueError, match="test/") as e:
        data.load(_folder_cfg(_tar(only_train, tmp_path / "only_train.tar.gz"), cache))
    _assert_layout_error(e)

    empty_class = _write_folder(tmp_path / "empty_class", per_class={"train": 1, "test": 1})
    os.makedirs(empty_class / "test" / "zebra")
    os.makedirs(empty_class / "train" / "zebra")
    with pytest.raises(ValueError, match="zebra") as e:
        data.load(_folder_cfg(empty_class, cache))
    _assert_layout_error(e)

    mixed = _write_folder(tmp_path / "mixed", per_class={"train": 1, "test": 1})
    Image.fromarray(np.zeros((SIZE + 2, SIZE, 3), np.uint8)).save(mixed / "test" / "cat" / "x.png")
    with pytest.raises(
        ValueError, match=r"one size; 'test/cat/x.png' is \(10, 8\) but 'train/airplane/0000.png'"
    ) as e:
        data.load(_folder_cfg(mixed, cache))
    _assert_layout_error(e)

    flat = tmp_path / "flat"
    os.makedirs(flat / "train")
    os.makedirs(flat / "test")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(flat / "train" / "a.png")
    with pytest.raises(ValueError, match="not in a class dir") as e:
        data.load(_folder_cfg(flat, cache))
    _assert_layout_error(e)

    not_tar = tmp_path / "notes.txt"
    not_tar.write_text("hello")
    with pytest.raises(ValueError) as e:
        data.load(_folder_cfg(not_tar, cache))
    _assert_layout_error(e)
    assert not os.path.exists(cache) or not os.listdir(cache)  # nothing cached on errors


def test_a_folder_as_users_keep_them(tmp_path):
    """Images in a folder below their class count for it; a hidden directory is no class; a
    16-bit grayscale image is scaled to 8 bits, not clipped; a second copy of the splits
    elsewhere in the tree is refused, not merged."""
    folder = _write_folder(tmp_path / "imgs")
    os.makedirs(folder / "train" / "cat" / "more")
    cat = np.asarray(Image.open(folder / "train" / "cat" / "0000.png"))
    Image.fromarray(cat).save(folder / "train" / "cat" / "more" / "0000.png")
    os.makedirs(folder / "train" / ".ipynb_checkpoints")
    os.makedirs(folder / "test" / ".ipynb_checkpoints")
    gray16 = np.full((SIZE, SIZE), 40_000, np.uint16)  # 40,000 / 257 = 155.6 in 8 bits
    Image.fromarray(gray16).save(folder / "test" / "dog" / "0016.png")
    ds = data.load(_folder_cfg(folder, tmp_path / "cache"))
    assert ds.class_names == ("airplane", "cat", "dog")
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [3, 4, 3])
    np.testing.assert_array_equal(ds.test_images[-1], np.full((SIZE, SIZE, 3), 156, np.uint8))
    shutil.copytree(folder / "train", tmp_path / "imgs" / "backup" / "train")
    with pytest.raises(UserError, match=r"more than one place \(train/, backup/train/\)") as e:
        data.load(_folder_cfg(folder, tmp_path / "cache"))
    _assert_layout_error(e)


# --- tfds source ------------------------------------------------------------------------------


def test_tfds_source_with_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = data_cfg(
        source="tfds", tfds_data_dir=str(tmp_path / "tfds"), cache_dir=str(tmp_path / "cache")
    )
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(cfg)
        ref = tfds.data_source("cifar10", split="train")
        ref_images = np.stack([ref[i]["image"] for i in range(len(ref))])
        ref_labels = np.array([ref[i]["label"] for i in range(len(ref))])
        monkeypatch.setattr(data, "_progress", None)  # a second load must use the cache
        again = data.load(cfg)
    np.testing.assert_array_equal(again.test_images, ds.test_images)
    assert again.class_names == ds.class_names
    assert ds.num_classes == 10 and len(ds.class_names) == 10
    chex.assert_shape(ds.train_images, (12, 32, 32, 3))
    chex.assert_shape(ds.test_images, (12, 32, 32, 3))
    assert ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images, ref_images)
    np.testing.assert_array_equal(ds.train_labels, ref_labels)
    np.testing.assert_allclose(ds.mean, (ref_images / 255).mean(axis=(0, 1, 2)), atol=1e-6)


def test_tfds_unprepared_without_tensorflow_says_what_to_do(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
    cfg = data_cfg(source="tfds", tfds_data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError) as e:
        data.load(cfg)
    message = _message(e)
    assert "pip install -e '.[tfds]'" in message
    assert "data.source=folder" in message and "split/class/image.jpg" in message


# --- synthetic, normalization -----------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    cfg = data_cfg(source="synthetic", num_train=1000, num_test=500)
    cfg.synthetic.image_size = 16
    return data.load(cfg)


def test_synthetic_shapes_and_balance(synthetic):
    chex.assert_shape(synthetic.train_images, (1000, 16, 16, 3))
    chex.assert_shape(synthetic.test_images, (500, 16, 16, 3))
    np.testing.assert_array_equal(np.bincount(synthetic.train_labels), [100] * 10)
    np.testing.assert_array_equal(np.bincount(synthetic.test_labels), [50] * 10)


def test_synthetic_is_learnable_by_nearest_class_mean(synthetic):
    ds = synthetic
    x = data.normalize(ds.train_images, ds.mean, ds.std).reshape(len(ds.train_labels), -1)
    xt = data.normalize(ds.test_images, ds.mean, ds.std).reshape(len(ds.test_labels), -1)
    centres = np.stack([x[ds.train_labels == k].mean(0) for k in range(ds.num_classes)])
    dists = ((xt[:, None, :] - centres[None]) ** 2).sum(-1)
    accuracy = (dists.argmin(1) == ds.test_labels).mean()
    assert accuracy > 0.5  # chance is 0.1


def test_normalize_gives_zero_mean_unit_std(synthetic):
    x = data.normalize(synthetic.train_images, synthetic.mean, synthetic.std)
    assert x.dtype == np.float32
    x64 = x.astype(np.float64)  # float32 reductions over 768k values lose ~1e-4
    np.testing.assert_allclose(x64.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x64.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
    ref = (synthetic.train_images / 255.0 - synthetic.mean) / synthetic.std
    np.testing.assert_allclose(x, ref, atol=1e-5)


# --- train batches ----------------------------------------------------------------------------


def _indexed_dataset(n, size=8):
    """Image i is filled with value i, so batches reveal which examples they hold."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))
    images = np.ascontiguousarray(images)
    labels = (np.arange(n) % 4).astype(np.int32)
    mean, std = data.channel_stats(images)
    return data.Dataset(images, labels, images[:10], labels[:10], 4, mean, std)


def _random_dataset(n, size=8):
    images = np.random.default_rng(n).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = (np.arange(n) % 5).astype(np.int32)
    mean, std = data.channel_stats(images)
    return data.Dataset(images, labels, images, labels, 5, mean, std)


def _example_ids(ds, batch):
    pixels = batch["image"] * ds.std + ds.mean  # back to [0, 1]
    return np.rint(pixels[:, 0, 0, 0] * 255).astype(int)


def _take(iterator, n):
    out = [next(iterator) for _ in range(n)]
    iterator.close()
    return out


@pytest.mark.parametrize("augment", [False, True])
def test_train_batches_resume_equals_uninterrupted(augment):
    ds = _random_dataset(50)  # random pixels, so crops and flips show
    full = _take(data.train_batches(ds, 8, seed=3, augment=augment), 20)
    resumed = _take(data.train_batches(ds, 8, seed=3, start_step=7, augment=augment), 13)
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other_seed = _take(data.train_batches(ds, 8, seed=4, augment=augment), 1)[0]
    assert not np.array_equal(other_seed["image"], full[0]["image"])


def test_every_example_once_per_epoch():
    ds = _indexed_dataset(48)
    batches = _take(data.train_batches(ds, 8, seed=0, augment=False), 18)  # 3 epochs
    for b in batches:
        chex.assert_shape(b["image"], (8, 8, 8, 3))
        assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
        np.testing.assert_array_equal(b["label"], _example_ids(ds, b) % 4)
    ids = [
        np.concatenate([_example_ids(ds, b) for b in batches[e * 6 : (e + 1) * 6]])
        for e in range(3)
    ]
    for epoch_ids in ids:
        np.testing.assert_array_equal(np.sort(epoch_ids), np.arange(48))
    assert not np.array_equal(ids[0], ids[1])  # a fresh permutation every epoch
    np.testing.assert_array_equal(ids[0], np.random.default_rng([0, 0]).permutation(48))


def test_incomplete_epoch_tail_is_dropped():
    ds = _indexed_dataset(50)  # 6 steps of 8 per epoch, 2 examples dropped
    batches = _take(data.train_batches(ds, 8, seed=1, augment=False), 12)
    for e in range(2):
        ids = np.concatenate([_example_ids(ds, b) for b in batches[e * 6 : (e + 1) * 6]])
        assert len(np.unique(ids)) == 48
        np.testing.assert_array_equal(ids, np.random.default_rng([1, e]).permutation(50)[:48])


def test_crop_and_flip_matches_hand_computation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 6, 5, 2), dtype=np.uint8)
    offsets = np.array([[0, 8], [4, 4], [7, 1]])
    flips = np.array([False, False, True])
    out = data.crop_and_flip(images, offsets, flips)
    for i in range(3):
        padded = np.pad(images[i], ((4, 4), (4, 4), (0, 0)), mode="reflect")
        r, c = offsets[i]
        expected = padded[r : r + 6, c : c + 5]
        if flips[i]:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out[i], expected)
    np.testing.assert_array_equal(out[1], images[1])  # offset (pad, pad), no flip: identity


def test_augmented_batch_is_a_crop_or_flip_of_the_plain_batch():
    ds = _random_dataset(40)
    images, mean, std = ds.train_images, ds.mean, ds.std
    seed, step, b = 5, 6, 16
    plain = data.train_batch(ds, b, seed=seed, step=step, augment=False)
    aug = data.train_batch(ds, b, seed=seed, step=step, augment=True)
    np.testing.assert_array_equal(aug["label"], plain["label"])
    chex.assert_equal_shape([aug["image"], plain["image"]])
    # The documented recipe, by hand.
    epoch, i = divmod(step, 40 // b)
    idx = np.random.default_rng([seed, epoch]).permutation(40)[i * b : (i + 1) * b]
    offsets, flips = data.augment_params(seed, step, b)
    expected = data.normalize(data.crop_and_flip(images[idx], offsets, flips), mean, std)
    np.testing.assert_array_equal(aug["image"], expected)
    assert flips.any() and not flips.all()
    assert (offsets != 4).any() and offsets.min() >= 0 and offsets.max() <= 8
    # Independently of the recipe: each image is one of the 9 x 9 x 2 crops/flips of its source.
    raw = np.rint((aug["image"] * std + mean) * 255).astype(np.uint8)
    for k, i in enumerate(idx):
        padded = np.pad(images[i], ((4, 4), (4, 4), (0, 0)), mode="reflect")
        candidates = [
            view
            for r in range(9)
            for c in range(9)
            for view in (padded[r : r + 8, c : c + 8], padded[r : r + 8, c : c + 8][:, ::-1])
        ]
        assert any(np.array_equal(raw[k], v) for v in candidates)


def _prefetch_threads():
    return {t for t in threading.enumerate() if t.name.startswith("gns-prefetch")}


def test_prefetch_thread_stops_on_close_and_on_gc():
    ds = _indexed_dataset(32)
    before = _prefetch_threads()
    it = data.train_batches(ds, 4, seed=0)
    next(it)
    started = _prefetch_threads() - before
    assert len(started) == 1
    it.close()
    assert not any(t.is_alive() for t in started)

    it = data.train_batches(ds, 4, seed=0)
    next(it)
    started = _prefetch_threads() - before
    del it
    gc.collect()
    assert not any(t.is_alive() for t in started)


def test_prefetch_reraises_producer_errors_in_the_caller():
    ds = _indexed_dataset(16)
    broken = data.Dataset(
        ds.train_images, ds.train_labels, ds.test_images, ds.test_labels, 4, ds.mean[:2], ds.std
    )  # a 2-channel mean cannot broadcast against 3 channels
    it = data.train_batches(broken, 4, seed=0)
    with pytest.raises(ValueError, match="broadcast"):
        next(it)


# --- damaged inputs and caches: UserError naming the path and member, recovery ----------------


def test_truncated_archive_names_the_archive_and_member(tmp_path):
    folder = _write_folder(tmp_path / "imgs", per_class={"train": 20, "test": 2}, fmt="jpg")
    # Incompressible pixels, so that a cut lands in the middle of the archive's members.
    rng = np.random.default_rng(0)
    for name in sorted(os.listdir(folder / "train" / "cat")):
        noise = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / "train" / "cat" / name, quality=100)
    archive = _tar(folder, tmp_path / "imgs.tar.gz")
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(UserError, match="truncated or corrupt") as e:
        data.load(_folder_cfg(archive, tmp_path / "cache"))
    assert str(archive) in str(e.value)
    assert "member './train/" in str(e.value)  # the member being read, or the last one read
    assert "again" in e.value.hint
    archive.write_bytes(whole[:5])  # not even a gzip header: fails already when probing the type
    with pytest.raises(UserError, match="truncated or corrupt") as e:
        data.load(_folder_cfg(archive, tmp_path / "cache"))
    assert str(archive) in str(e.value)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def _corrupt(path, how):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if how == "truncated" else b"not an image" * 10)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_jpeg_member_names_the_archive_and_member(tmp_path, how):
    folder = _write_folder(tmp_path / "imgs", fmt="jpg")
    _corrupt(folder / "train" / "cat" / "0001.jpg", how)
    archive = _tar(folder, tmp_path / "imgs.tar.gz")
    with pytest.raises(UserError, match="cannot decode the member") as e:
        data.load(_folder_cfg(archive, tmp_path / "cache"))
    assert str(archive) in str(e.value) and "'./train/cat/0001.jpg'" in str(e.value)
    assert "replace or delete it" in e.value.hint
    with pytest.raises(UserError, match="cannot decode the file") as e:  # the same, as a folder
        data.load(_folder_cfg(folder, tmp_path / "cache"))
    assert str(folder) in str(e.value) and "'train/cat/0001.jpg'" in str(e.value)


def test_binary_archive_given_as_an_image_folder_says_which_source(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("repacked/data_batch_1.bin")  # not the official first entry
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UserError, match="binary version") as e:
        data.load(_folder_cfg(archive, tmp_path / "cache"))
    assert "source=cifar10_binary" in e.value.hint


def _damage_cache(path, how):
    if how == "zero-length":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "wrong keys":
        np.savez(path.open("wb"), images=np.zeros(3), num_classes=3, class_names=np.array(["a"]))
    elif how == "bad labels":  # readable, but not what the decoder wrote
        with np.load(path) as f:
            arrays = dict(f)
        arrays["train_labels"] = arrays["train_labels"] + 7
        with path.open("wb") as f:
            np.savez(f, **arrays)


@pytest.mark.parametrize("how", ["zero-length", "truncated", "wrong keys", "bad labels"])
def test_unreadable_cache_is_removed_with_a_warning_and_decoded_again(tmp_path, caplog, how):
    folder = _write_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = data.load(_folder_cfg(folder, cache))
    (cache_file,) = cache.iterdir()
    good = cache_file.read_bytes()
    _damage_cache(cache_file, how)
    with caplog.at_level("WARNING"):
        again = data.load(_folder_cfg(folder, cache))
    np.testing.assert_array_equal(again.train_images, first.train_images)
    np.testing.assert_array_equal(again.train_labels, first.train_labels)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(cache_file) in warnings[0], warnings
    assert cache_file.read_bytes() == good  # rewritten whole
    caplog.clear()
    with caplog.at_level("WARNING"):
        data.load(_folder_cfg(folder, cache))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # once, not every run


def test_orphan_temporary_files_are_removed_when_the_cache_is_used(tmp_path):
    folder = _write_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    host = download._host_tag()
    stale_pid = cache / f".gns-tmp.{host}.{dead.pid}.0123abcd.folder-imgs-x.npz"
    stale_age = cache / f".gns-tmp.{host}.{live}.89abcdef.folder-imgs-y.npz"
    fresh = cache / f".gns-tmp.{host}.{live}.fedcba98.folder-imgs-w.npz"  # a live writer's
    other_host = cache / f".gns-tmp.00000000.{dead.pid}.12345678.folder-imgs-v.npz"
    unrelated = cache / "notes.tmp"
    for f in (stale_pid, stale_age, fresh, other_host, unrelated):
        f.write_bytes(b"\0" * 1000)
    hours_ago = time.time() - 2 * 3600
    os.utime(stale_age, (hours_ago, hours_ago))
    data.load(_folder_cfg(folder, cache))
    left = set(os.listdir(cache))
    assert not left & {stale_pid.name, stale_age.name}
    assert {fresh.name, other_host.name, unrelated.name} <= left  # may still be being written
    assert len(left) == 4  # and the new cache file


def test_unwritable_cache_dir_warns_once_and_still_loads(tmp_path, caplog):
    folder = _write_folder(tmp_path / "imgs")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # works as root too, unlike chmod
    with caplog.at_level("WARNING"):
        ds = data.load(_folder_cfg(folder, blocker / "cache"))
    assert len(ds.train_labels) == 9
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cache_dir" in warnings[0] and str(blocker) in warnings[0]


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    folder = _write_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"

    def interrupted(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load(_folder_cfg(folder, cache))
    assert os.listdir(cache) == []


def test_private_cache_dir_is_the_users_alone(tmp_path, monkeypatch):
    """The compiled-code cache: mode 0700 in the user's cache; never a symlink or a directory
    another user owns (which could plant executables)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = data.private_cache_dir("jax")
    assert path == str(tmp_path / "gns" / "jax") and os.stat(path).st_mode & 0o777 == 0o700
    os.chmod(path, 0o777)  # made by an older version, or by hand: tightened
    assert data.private_cache_dir("jax") == path and os.stat(path).st_mode & 0o777 == 0o700
    os.symlink(tmp_path, tmp_path / "gns" / "link")
    assert data.private_cache_dir("link") is None
    if os.getuid() == 0:  # only root can give a directory to another user
        os.chown(path, 12345, -1)
        assert data.private_cache_dir("jax") is None


def test_a_cache_file_of_another_source_is_decoded_again(tmp_path, caplog):
    """Dataset A's cache file under dataset B's name (copied, renamed): B is decoded again."""
    a = data.load(_folder_cfg(_write_folder(tmp_path / "a", size=SIZE), tmp_path / "ca"))
    folder_b = _write_folder(tmp_path / "b", size=SIZE + 2)
    b = data.load(_folder_cfg(folder_b, tmp_path / "cb"))
    ((cache_a,), (cache_b,)) = (list((tmp_path / d).iterdir()) for d in ("ca", "cb"))
    cache_b.write_bytes(cache_a.read_bytes())
    with caplog.at_level("WARNING"):
        again = data.load(_folder_cfg(folder_b, tmp_path / "cb"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "another source" in warnings[0], warnings
    np.testing.assert_array_equal(again.train_images, b.train_images)
    assert again.fingerprint == b.fingerprint != a.fingerprint


def test_a_replaced_source_with_the_same_size_and_mtime_is_decoded_again(tmp_path):
    """The content is part of the cache key, not only the path, the size and the mtime."""
    folder, cache = _write_folder(tmp_path / "imgs", fmt="bmp"), tmp_path / "cache"
    first = data.load(_folder_cfg(folder, cache))
    image = folder / "train" / "cat" / "0001.bmp"  # BMP: the same size whatever the pixels
    st = os.stat(image)
    Image.fromarray(np.full((SIZE, SIZE, 3), 99, np.uint8)).save(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(image).st_size == st.st_size
    again = data.load(_folder_cfg(folder, cache))
    assert again.fingerprint != first.fingerprint and len(list(cache.iterdir())) == 2
    assert (again.train_images == 99).all(axis=(1, 2, 3)).sum() == 1


def test_the_data_fingerprint_is_the_content(tmp_path):
    ds = data.load(data_cfg(source="synthetic", num_train=64, num_test=32))
    same = data.load(data_cfg(source="synthetic", num_train=64, num_test=32))
    other = data.load(data_cfg(source="synthetic", num_train=64, num_test=16))
    assert ds.fingerprint == same.fingerprint != other.fingerprint
    flipped = data.Dataset(ds.train_images[::-1], ds.train_labels, ds.test_images,
                           ds.test_labels, ds.num_classes, ds.mean, ds.std)  # fmt: skip
    assert flipped.fingerprint != ds.fingerprint
