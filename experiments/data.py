"""CIFAR-style image data for the experiments: loading, normalization, batches.

Four sources, picked by ``config.data.source`` (each field: :mod:`experiments.rules`):
``'cifar10_binary'`` (the official CIFAR-10 binary version at ``data.path``, or downloaded once
into the cache from ``data.url`` and checked against ``data.md5``), ``'folder'`` (a directory or
``.tar.gz`` laid out ``split/class/image.jpg``, splits ``train`` and ``test``; labels index the
sorted class names), ``'tfds'`` (a prepared ``tensorflow-datasets`` dataset, read without
TensorFlow) and ``'synthetic'`` (class-dependent colours and patterns plus noise).

The decoded arrays are cached as ``.npz`` in ``data.cache_dir`` (default
:func:`user_cache_dir`), keyed by the source's path, size, mtime and sampled content; a cache
file that is unreadable or holds another source's arrays is decoded again with a warning.
:attr:`Dataset.fingerprint` is the data's identity that a resumed run checks. A problem with
the user's data raises :class:`~experiments.cli.UserError` naming the path (and archive
member) and the fix. Batches are a pure function of the seed and the step (or the example
positions), so a resumed run sees the batches of an uninterrupted one.

Example::

    ds = data.load(config.data)
    batches = data.train_batches(ds, 128, seed=0, start_step=start)
    # next(batches)['image']: float32 [128, 32, 32, 3] normalized; ['label']: int32 [128]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import io
import itertools
import os
import queue
import re
import stat
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from experiments import download
from experiments.cli import UserError

LAYOUT = (
    "split/class/image.jpg (splits 'train' and 'test', one subdirectory per class, e.g. "
    "train/airplane/0000.jpg, test/airplane/0000.jpg)"
)
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
CROP_PADDING = 4
# The official CIFAR-10 binary version, as published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch.bin"
_CIFAR10_RECORD = 1 + 3 * 32 * 32  # label byte, then the R, G and B planes of 32 x 32
# Where data.source='cifar10_binary' can be replaced when the download is impossible.
ALTERNATIVES = (
    "Use local data instead: DATA= a folder or archive laid out split/class/image.jpg (e.g. "
    "`make demo DATA=path/to/cifar10-jpeg.tar.gz`, i.e. --config.data.source=folder "
    "--config.data.path=...), or --config.data.source=tfds."
)
# Seeds: epoch permutation from default_rng([seed, epoch]); augmentation from
# default_rng([seed, step or epoch, _AUGMENT_TAG]). The tag keeps the two streams apart
# (SeedSequence pads entropy with zeros, so [seed, s, 0] would equal [seed, s]).
_AUGMENT_TAG = 0x61756720
_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Decoded uint8 images ``[N, H, W, C]`` and int32 labels of a train and a test split;
    ``mean`` and ``std`` (float32 ``[C]``, ``[0, 1]`` scale) are the train images' per
    channel; ``class_names`` in label order (empty where the source has none)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    class_names: tuple[str, ...] = ()

    @functools.cached_property
    def fingerprint(self) -> str:
        """The data's identity: SHA-256 (16 hex digits) of both splits' arrays, shapes and
        dtypes; a run resumes only on the same one."""
        h = hashlib.sha256()
        for a in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.data)
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Loading.


def load(cfg) -> Dataset:
    """The dataset of ``cfg`` (``config.data``, or a mapping): ``source``, ``path``,
    ``cache_dir``, ``name`` and ``tfds_data_dir`` (tfds), ``num_train`` and ``num_test``
    (None: all; else a class-stratified subset, :func:`subsample`; the split sizes of
    ``'synthetic'``, None: 2048 and 512), ``synthetic.*``, optional ``url`` and ``md5``. A
    :class:`UserError` names a bad path, archive member, download or field."""
    if isinstance(cfg, Mapping):
        cfg = ml_collections.ConfigDict(dict(cfg))
    source, num_train, num_test = cfg.source, cfg.num_train, cfg.num_test
    if source == "synthetic":
        arrays = _synthetic_arrays(
            cfg.synthetic,
            num_train=2048 if num_train is None else _check_count("num_train", num_train),
            num_test=512 if num_test is None else _check_count("num_test", num_test),
        )
        num_train = num_test = None  # generated at the requested sizes
    elif source == "folder":
        arrays = _folder_arrays(cfg.path, cfg.cache_dir)
    elif source == "cifar10_binary":
        url = cfg.get("url") or CIFAR10_BINARY_URL
        md5 = cfg.md5 if "md5" in cfg else CIFAR10_BINARY_MD5  # None: unchecked (warned)
        arrays = _cifar10_binary_arrays(cfg.path, cfg.cache_dir, url=url, md5=md5)
    elif source == "tfds":
        arrays = _tfds_arrays(cfg.name, cfg.tfds_data_dir, cfg.cache_dir)
    else:
        raise UserError(
            f"Unknown data.source={source!r}.",
            hint="use 'cifar10_binary' (downloads CIFAR-10), 'folder' (with data.path), 'tfds' "
            "or 'synthetic'.",
        )
    splits = []
    for split, n in zip(SPLITS, (num_train, num_test), strict=True):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if n is not None:
            idx = subsample(labels, _check_count(f"num_{split}", n, len(labels)))
            images, labels = images[idx], labels[idx]
        splits += [images, labels.astype(np.int32)]
    return Dataset(*splits, int(arrays["num_classes"]), *channel_stats(splits[0]),
                   tuple(str(c) for c in arrays["class_names"]))  # fmt: skip


def _check_count(name: str, n: Any, available: int | None = None) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise UserError(f"data.{name} must be a positive int or None (all), got {n!r}.")
    if available is not None and n > available:
        raise UserError(
            f"data.{name}={n} but the split has only {available} examples.",
            hint=f"use data.{name}=None for all of them, or a smaller number.",
        )
    return int(n)


def subsample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified subset of ``n`` of ``labels``: the examples in a
    fixed seeded order, taken round-robin over the classes (the first of each class, then the
    second of each, ...), so class counts differ by at most one where classes have enough.

    Example::

        subsample(np.array([0, 0, 0, 1]), 2)  # one example of each class
    """
    labels = np.asarray(labels)
    perm = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[perm]
    # Rank of each shuffled example within its class: 0 for the first of a class, 1, ...
    order = np.argsort(shuffled, kind="stable")
    sorted_labels = shuffled[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts
    take = np.lexsort((np.arange(len(labels)), rank))[:n]
    return np.sort(perm[take])


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel ``(mean, std)`` (float32 ``[C]``, ``[0, 1]`` scale) of uint8 images
    ``[N, H, W, C]``, from histograms of the byte values (no float copy of the images)."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}.")
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        mean = (counts @ values) / counts.sum()
        means.append(mean)
        stds.append(np.sqrt((counts @ (values - mean) ** 2) / counts.sum()))
    std = np.maximum(np.asarray(stds), 1e-6)  # a constant channel must not divide by zero
    return np.asarray(means, np.float32), std.astype(np.float32)


def _synthetic_arrays(scfg, num_train: int, num_test: int) -> dict[str, Any]:
    """Class-dependent colour + low-frequency pattern, with per-example colour jitter and noise."""
    image_size, num_classes = int(scfg.image_size), int(scfg.num_classes)
    seed = int(scfg.get("seed") or 0)
    if num_classes < 2 or image_size < 4:
        raise UserError(
            f"data.synthetic needs num_classes >= 2 and image_size >= 4, got "
            f"num_classes={num_classes}, image_size={image_size}."
        )
    rng = np.random.default_rng([seed, num_classes, image_size])
    # Templates in uint8 units around 128: a colour (robust to crops and flips) plus a smooth
    # spatial pattern (nearest-upsampled 4x4 grid).
    colours = rng.normal(0.0, 30.0, size=(num_classes, 1, 1, 3))
    coarse = rng.normal(0.0, 30.0, size=(num_classes, 4, 4, 3))
    reps = -(-image_size // 4)
    pattern = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)
    templates = 128.0 + colours + pattern[:, :image_size, :image_size]
    out: dict[str, Any] = {"num_classes": num_classes,
                           "class_names": [f"class_{k}" for k in range(num_classes)]}  # fmt: skip
    for part, (split, n) in enumerate(zip(SPLITS, (num_train, num_test), strict=True), 1):
        split_rng = np.random.default_rng([seed, part])
        labels = split_rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        jitter = split_rng.normal(0.0, 20.0, size=(n, 1, 1, 3))
        noise = split_rng.normal(0.0, 50.0, size=(n, image_size, image_size, 3))
        images = np.clip(np.rint(templates[labels] + jitter + noise), 0, 255).astype(np.uint8)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_arrays(name: str, data_dir: str | None, cache_dir: str | None) -> dict[str, Any]:
    """A prepared tfds dataset through ``tfds.data_source`` (no TensorFlow needed), cached
    under its name, version, prepared directory and split sizes."""
    import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy import, only for this source)

    if data_dir is not None:
        data_dir = os.path.expanduser(data_dir)
    try:
        sources = tfds.data_source(name, split=list(SPLITS), data_dir=data_dir, download=False)
    except Exception as err:  # tfds raises several types for "not prepared"
        if not _tensorflow_available():
            where = data_dir or "the tfds default data_dir (~/tensorflow_datasets)"
            raise UserError(
                f"tfds dataset {name!r} is not prepared in {where}, and preparing it needs "
                f"TensorFlow, which is not installed ({type(err).__name__}: {err}).",
                hint=f"install it once with `pip install -e '.[tfds]'` and prepare the data with "
                f'`python -c "import tensorflow_datasets as tfds; '
                f"tfds.data_source('{name}', data_dir={data_dir!r})\"` (this downloads); or "
                f"--config.data.source=cifar10_binary (downloads CIFAR-10 without TensorFlow); "
                f"or read an image folder: --config.data.source=folder "
                f"--config.data.path=/path/to/cifar10-jpeg.tar.gz (layout {LAYOUT}).",
            ) from err
        logging.info("tfds dataset %r not prepared; downloading and preparing it.", name)
        sources = tfds.data_source(name, split=list(SPLITS), data_dir=data_dir, download=True)
    info = sources[0].dataset_info
    key = hashlib.sha256(
        f"{name}\0{info.version}\0{info.data_dir}\0{[len(s) for s in sources]}".encode()
    ).hexdigest()[:16]

    def decode() -> dict[str, Any]:
        labels = info.features["label"]
        out = {"num_classes": int(labels.num_classes), "class_names": list(labels.names)}
        for split, source in zip(SPLITS, sources, strict=True):
            if len(source) == 0:
                raise UserError(f"tfds {name} {split}: the split is empty.")
            first = np.asarray(source[0]["image"])
            images = np.empty((len(source), *first.shape), dtype=np.uint8)
            out[f"{split}_labels"] = np.empty((len(source),), dtype=np.int32)
            for i in tqdm(range(len(source)), desc=f"tfds {name} {split}", unit="img",
                          mininterval=1.0, leave=False):  # fmt: skip
                images[i] = np.asarray(source[i]["image"])
                out[f"{split}_labels"][i] = int(source[i]["label"])
            out[f"{split}_images"] = images
        return out

    return _cached(cache_dir, f"tfds-{name.replace('/', '_')}-{key}", decode)


# --- the array cache --------------------------------------------------------------------------


def user_cache_dir() -> str:
    """``$XDG_CACHE_HOME/gns``, or ``~/.cache/gns`` (the XDG base directory convention)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: ignored, as the spec says
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gns")


def private_cache_dir(name: str) -> str | None:
    """``user_cache_dir()/name``, a directory of this user alone (mode 0700, tightened when
    looser), for a cache whose content is executed (compiled code); ``None`` with one warning
    when it is a symbolic link, not a directory, another user's, or not creatable."""
    path = os.path.join(user_cache_dir(), name)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o700, follow_symlinks=False)
            st = os.lstat(path)
    except OSError as e:
        logging.warning("Not using the cache %s (%s).", path, e)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        logging.warning("Not using the cache %s: not a directory of this user alone (mode %o, "
                        "owner %d).", path, stat.S_IMODE(st.st_mode), st.st_uid)  # fmt: skip
        return None
    return path


def _cache_dir(cache_dir: str | None) -> str:
    """The cache directory, after removing abandoned temporaries of killed writers in it."""
    path = os.path.abspath(os.path.expanduser(str(cache_dir))) if cache_dir else user_cache_dir()
    download.remove_stale_temps(path)
    return path


def _cached(cache_dir: str | None, stem: str, decode: Callable[[], dict]) -> dict[str, Any]:
    """``decode()``'s arrays, read from ``<cache_dir>/<stem>.npz`` when there (and made from
    ``stem``, which the file stores), else decoded and written there."""
    cache_path = os.path.join(_cache_dir(cache_dir), f"{stem}.npz")
    cached = _read_cache(cache_path, stem)
    if cached is not None:
        return cached
    start = time.perf_counter()
    arrays = decode()
    logging.info("Decoded %d train and %d test images in %.1f s; caching them in %s.",
                 len(arrays["train_labels"]), len(arrays["test_labels"]),
                 time.perf_counter() - start, cache_path)  # fmt: skip
    _write_cache(cache_path, arrays, stem)
    return arrays


# Content sampled by _source_fingerprint: a file's first, last and evenly spread blocks (all of
# a file up to _SAMPLE_BLOCKS blocks), and that many files of a directory, spread evenly.
_SAMPLE_BLOCKS, _BLOCK = 16, 1 << 16


def _update_with_content(h, path: str, size: int) -> None:
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCKS * _BLOCK:
            h.update(f.read())
            return
        for i in range(_SAMPLE_BLOCKS):
            f.seek((size - _BLOCK) * i // (_SAMPLE_BLOCKS - 1))
            h.update(f.read(_BLOCK))


def _source_fingerprint(path: str) -> str:
    """Cache key of a data source: its path, the size and mtime of the archive (of every file,
    for a directory) and sampled content, so a source replaced behind the same path (even with
    the old size and mtime) gets another key."""
    h = hashlib.sha256(path.encode())
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), path)
                h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
                found.append((os.path.join(root, name), st.st_size))
        step = max(1, len(found) // _SAMPLE_BLOCKS)
        for file, size in found[::step][:_SAMPLE_BLOCKS]:
            _update_with_content(h, file, size)
    else:
        st = os.stat(path)
        h.update(f"\0{st.st_size}\0{st.st_mtime_ns}".encode())
        _update_with_content(h, path, st.st_size)
    stem = os.path.basename(path.rstrip(os.sep)).split(".")[0] or "data"
    return f"{stem}-{h.hexdigest()[:16]}"


def _check_cached_arrays(arrays: dict[str, Any]) -> None:
    """Raises ValueError unless the arrays are what a decoder returns (shapes, types, labels)."""
    num_classes = int(arrays["num_classes"])
    if num_classes < 1 or len(arrays["class_names"]) not in (0, num_classes):
        raise ValueError(f"num_classes={num_classes} and {len(arrays['class_names'])} names")
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1:
            raise ValueError(f"{split}: images {images.dtype}{images.shape}, labels {labels.shape}")
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"{split}: {len(images)} images, {len(labels)} labels")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{split}: labels outside [0, {num_classes})")


def _read_cache(cache_path: str, source: str) -> dict[str, Any] | None:
    """The cached arrays, or None when absent; an unreadable file is removed with a warning,
    one made from another ``source`` is left to be overwritten, with a warning."""
    if not os.path.isfile(cache_path):  # absent, or its directory is unusable (warned on write)
        return None
    start = time.perf_counter()
    try:
        with np.load(cache_path, allow_pickle=False) as f:
            missing = [k for k in (*_CACHE_KEYS, "num_classes", "class_names") if k not in f]
            if missing:
                raise KeyError(f"no {', '.join(missing)} in {sorted(f.files)}")
            arrays = {k: f[k] for k in _CACHE_KEYS}
            arrays["num_classes"] = int(f["num_classes"])
            arrays["class_names"] = [str(c) for c in f["class_names"]]
            made_from = str(f["source"]) if "source" in f else None
        _check_cached_arrays(arrays)
    except FileNotFoundError:  # removed meanwhile
        return None
    except MemoryError:
        raise
    except Exception as err:  # zero-length, truncated, wrong keys, wrong arrays: decode again
        logging.warning("The cache file %s is unreadable (%s: %s); removing it and decoding "
                        "the data again.", cache_path, type(err).__name__, err)  # fmt: skip
        try:
            os.remove(cache_path)
        except OSError as rm_err:
            logging.warning("Could not remove %s (%s).", cache_path, rm_err)
        return None
    if made_from != source:
        logging.warning("The cache file %s holds the arrays of another source (%s, not %s: "
                        "copied or renamed); decoding the data again.",
                        cache_path, made_from, source)  # fmt: skip
        return None
    logging.info("Loaded cached arrays %s in %.2f s.", cache_path, time.perf_counter() - start)
    return arrays


def _write_cache(cache_path: str, arrays: dict[str, Any], source: str) -> None:
    """The arrays as an uncompressed ``.npz``, written atomically with the name of their
    ``source``; a cache that cannot be written costs one warning (the next run decodes)."""
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with download.atomic_file(cache_path) as f:
            np.savez(
                f,
                **{k: arrays[k] for k in _CACHE_KEYS},
                num_classes=np.int64(arrays["num_classes"]),
                class_names=np.asarray(arrays["class_names"], dtype=np.str_),
                source=np.str_(source),
            )
    except OSError as err:
        logging.warning(
            "Cannot write the data cache %s (%s); continuing without it, so the next run decodes "
            "the data again. Set --config.data.cache_dir to a writable directory to cache it.",
            cache_path, err)  # fmt: skip


# --- archives and folders ---------------------------------------------------------------------


def _archive_error(path: str, where: str, err: BaseException) -> UserError:
    return UserError(
        f"data.path={path!r}: the archive is truncated or corrupt ({where}: "
        f"{type(err).__name__}: {err}).",
        hint="copy or download the archive again (compare its size or checksum with the "
        "original), or point data.path at an intact copy.",
    )


def _is_tar(path: str) -> bool:
    """Whether ``path`` is a tar archive; a truncated or corrupt compressed file raises."""
    try:
        return tarfile.is_tarfile(path)
    except (EOFError, OSError, zlib.error, tarfile.TarError) as err:
        raise _archive_error(path, "at its start", err) from err


def _tar_entries(
    path: str, wanted: Callable[[str], bool]
) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Streams ``(member, bytes)`` of a tar archive (any compression), bytes only if ``wanted``;
    a truncated or corrupt archive raises naming the member being read (or the last one)."""
    where = "at the first member"
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                where = f"in member {member.name!r}"
                data = None
                if member.isfile() and wanted(member.name):
                    data = tar.extractfile(member).read()
                yield member, data
                where = f"after member {member.name!r}"
    except (EOFError, OSError, zlib.error, tarfile.TarError) as err:
        raise _archive_error(path, where, err) from err


def _layout_error(path: str, problem: str) -> UserError:
    return UserError(
        f"data.path={path!r}: {problem}.",
        hint=f"Expected a directory or .tar.gz with the layout {LAYOUT}.",
    )


def _existing_path(path: str | None, what: str) -> str:
    """The absolute ``data.path``; a missing one raises :class:`UserError` saying ``what``."""
    if not path:
        raise UserError(f"data.source={what} needs data.path.")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise UserError(f"data.path={path!r} does not exist.", hint=f"Expected {what}.")
    return path


def _folder_arrays(path: str | None, cache_dir: str | None) -> dict[str, Any]:
    """Decoded arrays of an image folder or archive (or of the CIFAR-10 binary version given
    as one), from the cache when it is fresh."""
    path = _existing_path(path, f"'folder': a directory or .tar.gz laid out {LAYOUT}")
    if not os.path.isdir(path) and not _is_tar(path):
        raise _layout_error(path, "is neither a directory nor a tar archive (.tar.gz)")
    if _is_cifar10_binary(path):
        return _binary_cached(cache_dir, path)
    return _cached(cache_dir, f"folder-{_source_fingerprint(path)}",
                   functools.partial(_decode_folder, path))  # fmt: skip


def _is_cifar10_binary(path: str) -> bool:
    """Whether a directory holds ``test_batch.bin`` (or ``cifar-10-batches-bin/`` does), or an
    archive's first entry is ``cifar-10-batches-bin``."""
    if os.path.isdir(path):
        inner = os.path.join(path, "cifar-10-batches-bin")
        return any(os.path.isfile(os.path.join(d, CIFAR10_TEST_BATCH)) for d in (path, inner))
    for member, _ in _tar_entries(path, lambda name: False):
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        return bool(parts) and parts[0] == "cifar-10-batches-bin"
    return False


def _is_image(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


# An image file found in a folder or archive: (split, class, file name, bytes or None to read
# from the folder, where it is: the archive member name or the path inside the folder). An
# empty class directory is (split, class, '', None, '').
_Entry = tuple[str, str, str, bytes | None, str]


def _iter_directory(path: str) -> Iterator[_Entry]:
    missing = [s for s in SPLITS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        found = sorted(os.listdir(path))[:10]
        raise _layout_error(path, f"no {' or '.join(missing)} directory (found {found})")
    for split in SPLITS:
        for entry in sorted(os.scandir(os.path.join(path, split)), key=lambda e: e.name):
            if entry.is_dir():
                names = [n for n in os.listdir(entry.path) if _is_image(n)]
                if not names:
                    yield split, entry.name, "", None, ""
                for name in names:
                    yield split, entry.name, name, None, f"{split}/{entry.name}/{name}"
            elif _is_image(entry.name):
                raise _layout_error(
                    path, f"image {entry.path!r} lies directly in {split}/, not in a class dir"
                )


def _iter_tar(path: str) -> Iterator[_Entry]:
    """The image files of an archive; names may carry a leading ``./`` or one wrapping
    directory (``cifar10/train/...``)."""
    for member, data in _tar_entries(path, _is_image):
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        if member.isdir():
            if len(parts) >= 2 and parts[-2] in SPLITS:
                yield parts[-2], parts[-1], "", None, ""  # class dir: may stay empty
            continue
        if parts and (parts[-1] in CIFAR10_TRAIN_BATCHES or parts[-1] == CIFAR10_TEST_BATCH):
            raise UserError(
                f"data.path={path!r} is the CIFAR-10 binary version, not an image folder.",
                hint="read it with --config.data.source=cifar10_binary.",
            )
        if data is None:
            continue
        if len(parts) >= 3 and parts[-3] in SPLITS:
            yield parts[-3], parts[-2], parts[-1], data, member.name
        elif len(parts) >= 2 and parts[-2] in SPLITS:
            raise _layout_error(
                path, f"image {member.name!r} lies directly in {parts[-2]}/, not in a class dir"
            )


def _decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG/... bytes as a uint8 ``[H, W, 3]`` RGB array."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _decode_folder(path: str) -> dict[str, Any]:
    """The images of a folder or tar archive laid out ``split/class/image.jpg``, ordered by
    (class name, file name) in each split; labels index the sorted class names, which both
    splits must share. Every problem raises a :class:`UserError` naming the layout."""
    is_dir = os.path.isdir(path)
    files: dict[str, dict[str, list[tuple[str, bytes | None, str]]]] = {s: {} for s in SPLITS}
    for split, cls, name, data, origin in _iter_directory(path) if is_dir else _iter_tar(path):
        items = files[split].setdefault(cls, [])
        if name:
            items.append((name, data, origin))
    for split in SPLITS:
        if not files[split]:
            raise _layout_error(path, f"no class directories with images under {split}/")
        for cls, items in files[split].items():
            if not items:
                raise _layout_error(path, f"the class directory {split}/{cls}/ has no images")
    class_names = sorted(files["train"])
    if sorted(files["test"]) != class_names:
        raise _layout_error(path, f"train/ and test/ have different class directories: "
                                  f"{class_names} vs {sorted(files['test'])}")  # fmt: skip
    out: dict[str, Any] = {"num_classes": len(class_names), "class_names": class_names}
    for split in SPLITS:
        listing = [(label, item) for label, cls in enumerate(class_names)
                   for item in sorted(files[split][cls], key=lambda item: item[0])]  # fmt: skip
        bar = tqdm(listing, desc=f"decode {split}", unit="img", mininterval=1.0, leave=False)
        images = [_read_image(path, origin, data, is_dir) for _, (_, data, origin) in bar]
        shape = out["train_images"].shape[1:] if split == "test" else images[0].shape
        for image, (_, (_, _, origin)) in zip(images, listing, strict=True):
            if image.shape != shape:
                raise _layout_error(path, f"images must all have one size; {origin!r} is "
                                          f"{image.shape[:2]} but the first image is "
                                          f"{shape[:2]} (resize them first)")  # fmt: skip
        out[f"{split}_images"] = np.stack(images).astype(np.uint8)
        out[f"{split}_labels"] = np.array([label for label, _ in listing], dtype=np.int32)
    return out


def _read_image(path: str, origin: str, data: bytes | None, is_dir: bool) -> np.ndarray:
    """The decoded image ``origin`` of the folder or archive ``path`` (``data``: its bytes)."""
    try:
        if data is None:
            with open(os.path.join(path, origin), "rb") as f:
                data = f.read()
        return _decode_image(data)
    except Exception as err:
        raise UserError(
            f"data.path={path!r}: cannot decode {'the file' if is_dir else 'the member'} "
            f"{origin!r} ({type(err).__name__}: {err}).",
            hint="the image is corrupt or not an image: replace or delete it"
            + ("." if is_dir else " and re-create the archive."),
        ) from err


# --- CIFAR-10 binary version ------------------------------------------------------------------


def _cifar10_binary_arrays(
    path: str | None, cache_dir: str | None, *, url: str, md5: str | None
) -> dict[str, Any]:
    """Arrays of ``cifar-10-binary.tar.gz`` at ``path`` (used as it is), or of the one in the
    cache directory: downloaded when absent (:func:`download.fetch` checks it), else its MD5
    checked before it is decoded (placed by hand, or damaged since)."""
    if path:
        return _binary_cached(cache_dir, _existing_path(path, "cifar-10-binary.tar.gz"))
    path = os.path.join(
        _cache_dir(cache_dir),
        os.path.basename(url.split("?")[0].rstrip("/")) or "cifar-10-binary.tar.gz",
    )
    if not os.path.exists(path):
        try:
            download.fetch(url, path, md5=md5)
        except download.DownloadError as err:
            raise UserError(
                f"{err} {ALTERNATIVES}",
                hint=f"or copy cifar-10-binary.tar.gz (from {CIFAR10_BINARY_URL}, MD5 "
                f"{CIFAR10_BINARY_MD5}) to {path} yourself, or set data.path to it.",
            ) from err
        return _binary_cached(cache_dir, path)

    def checked_decode(path: str) -> dict[str, Any]:
        download.warn_unverified(None, md5, path)
        actual = download.file_md5(path)
        if md5 is not None and actual != md5.lower():
            raise UserError(
                f"{path} has MD5 {actual}, not the expected {md5.lower()}: it is not the "
                f"official cifar-10-binary.tar.gz, or it is damaged.",
                hint=f"delete it (it is downloaded again), or set data.path={path} to use it "
                f"without the check.",
            )
        return _decode_cifar10_binary(path)

    return _binary_cached(cache_dir, path, checked_decode)


def _binary_cached(cache_dir: str | None, path: str, decode: Callable | None = None) -> dict:
    """The cached arrays of a CIFAR-10 binary archive or directory, else ``decode(path)``."""
    decode = functools.partial(decode or _decode_cifar10_binary, path)
    return _cached(cache_dir, f"cifar10_binary-{_source_fingerprint(path)}", decode)


def _parse_cifar10_batch(path: str, name: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(raw) == 0 or len(raw) % _CIFAR10_RECORD:
        raise UserError(
            f"data.path={path!r}: {name!r} has {len(raw)} bytes, not a multiple of the "
            f"{_CIFAR10_RECORD}-byte CIFAR-10 record (1 label byte + 3 x 32 x 32 pixels).",
            hint="the file is truncated or not the CIFAR-10 binary version: get it again.",
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int32)
    if labels.max() >= len(CIFAR10_CLASSES):
        raise UserError(
            f"data.path={path!r}: {name!r} has label {labels.max()}; CIFAR-10 has "
            f"{len(CIFAR10_CLASSES)} classes.",
            hint="this is not the CIFAR-10 binary version (CIFAR-100's records differ).",
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes -> HWC
    return np.ascontiguousarray(images), labels


def _decode_cifar10_binary(path: str) -> dict[str, Any]:
    """The CIFAR-10 binary version (an archive of ``cifar-10-batches-bin/*.bin``, or a directory
    of the ``.bin`` files): records of 1 label byte and the 1024 red, green and blue bytes of a
    32 x 32 image in ``data_batch_1.bin`` ... ``data_batch_5.bin`` (train) and
    ``test_batch.bin`` (https://www.cs.toronto.edu/~kriz/cifar.html)."""
    wanted = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH, "batches.meta.txt")
    found: dict[str, bytes] = {}
    if os.path.isdir(path):
        inner = os.path.join(path, "cifar-10-batches-bin")
        directory = inner if os.path.isdir(inner) else path
        for name in wanted:
            if os.path.isfile(os.path.join(directory, name)):
                with open(os.path.join(directory, name), "rb") as f:
                    found[name] = f.read()
    elif _is_tar(path):
        for member, data in _tar_entries(path, lambda n: os.path.basename(n) in wanted):
            if data is not None:
                found[os.path.basename(member.name)] = data
    else:
        raise UserError(
            f"data.path={path!r} is neither a directory nor a tar archive.",
            hint="data.source=cifar10_binary reads cifar-10-binary.tar.gz or its directory.",
        )
    missing = [n for n in wanted[:-1] if n not in found]
    if missing:
        raise UserError(
            f"data.path={path!r} has no {', '.join(missing)}: not the CIFAR-10 binary version.",
            hint="use cifar-10-binary.tar.gz (members cifar-10-batches-bin/data_batch_1.bin ... "
            "test_batch.bin), or data.source=folder for an image folder.",
        )
    train = [_parse_cifar10_batch(path, n, found[n]) for n in CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _parse_cifar10_batch(path, CIFAR10_TEST_BATCH,
                                                    found[CIFAR10_TEST_BATCH])  # fmt: skip
    names = re.findall(r"\S+", found.get("batches.meta.txt", b"").decode("utf-8", "replace"))
    return {
        "train_images": np.concatenate([images for images, _ in train]),
        "train_labels": np.concatenate([labels for _, labels in train]),
        "test_images": test_images,
        "test_labels": test_labels,
        "num_classes": len(CIFAR10_CLASSES),
        "class_names": names if len(names) == len(CIFAR10_CLASSES) else list(CIFAR10_CLASSES),
    }


# ----------------------------------------------------------------------------------------------
# Batches.


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(images / 255 - mean) / std`` per channel as float32, for uint8 ``images [..., C]``
    and ``mean``, ``std`` in ``[0, 1]`` scale (:class:`Dataset`'s)."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    out = np.multiply(images, np.float32(1.0 / 255.0) / std, dtype=np.float32)  # one pass
    out -= mean / std
    return out


def crop_and_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int = CROP_PADDING
) -> np.ndarray:
    """Each image ``[B, H, W, C]`` cropped from its reflect-padded copy at ``offsets`` (int
    ``[B, 2]``, row and column in ``[0, 2 * pad]``; ``(pad, pad)`` is the identity) and mirrored
    left-right where ``flips`` (bool ``[B]``)."""
    _, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.empty_like(images)
    # A loop of slice copies is ~4x faster than one fancy-indexing gather here.
    for i, ((r, c), flip) in enumerate(zip(offsets.tolist(), flips.tolist(), strict=True)):
        crop = padded[i, r : r + h, c : c + w]
        out[i] = crop[:, ::-1] if flip else crop
    return out


def augment_params(seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop offsets ``[B, 2]`` in ``[0, 2 * CROP_PADDING]`` and flips ``[B]`` of a train step,
    drawn from ``default_rng([seed, step, tag])``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, step, _AUGMENT_TAG])
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(batch_size, 2))
    return offsets, rng.random(batch_size) < 0.5


def train_indices(seed: int, step: int, batch_size: int, num_train: int) -> np.ndarray:
    """Indices of the train examples of step ``step``: epoch ``e`` is the permutation
    ``default_rng([seed, e]).permutation(num_train)`` cut into ``num_train // batch_size``
    batches, its incomplete tail dropped (an example is seen at most once per epoch)."""
    epoch, i = divmod(step, num_train // batch_size)
    return _epoch_permutation(seed, epoch, num_train)[i * batch_size : (i + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_train: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_train)
    perm.flags.writeable = False
    return perm


# The augmentation of every position of an epoch of the example stream, drawn as a step's.
_epoch_augment = functools.lru_cache(maxsize=4)(augment_params)


def _stream(start: int, size: int, num_train: int, per_epoch: Callable) -> list[np.ndarray]:
    """Positions ``[start, start + size)`` of the stream that lays the arrays
    ``per_epoch(e)`` (a tuple, one value per example of epoch ``e``) end to end."""
    parts, pos = [], start
    while pos < start + size:
        epoch, at = divmod(pos, num_train)
        n = min(num_train - at, start + size - pos)
        parts.append([a[at : at + n] for a in per_epoch(epoch)])
        pos += n
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def stream_indices(seed: int, start: int, batch_size: int, num_train: int) -> np.ndarray:
    """Indices of the examples ``[start, start + batch_size)`` of the example stream: the epoch
    permutations of :func:`train_indices` end to end, no tail dropped (a batch may straddle two
    epochs). Independent of how the stream is cut into batches, so a batch size that changes
    during a run still sees every example once per epoch."""
    perm = lambda e: (_epoch_permutation(seed, e, num_train),)  # noqa: E731
    return _stream(start, batch_size, num_train, perm)[0]


def stream_augment_params(
    seed: int, start: int, batch_size: int, num_train: int
) -> tuple[np.ndarray, np.ndarray]:
    """Crop offsets and flips of the stream positions ``[start, start + batch_size)``: one
    draw per position (those of epoch ``e`` are :func:`augment_params` ``(seed, e,
    num_train)``), so independent of the batch sizes."""
    draw = lambda e: _epoch_augment(seed, e, num_train)  # noqa: E731
    offsets, flips = _stream(start, batch_size, num_train, draw)
    return offsets, flips


def train_batch(ds: Dataset, batch_size: int, *, seed: int, augment: bool,
                step: int | None = None, start_example: int | None = None) -> dict:  # fmt: skip
    """The batch of step ``step`` (:func:`train_indices`, :func:`augment_params`), or with
    ``start_example`` instead the examples ``[start_example, start_example + batch_size)`` of
    the example stream: ``{'image': float32 [B, H, W, C] normalized, 'label': int32 [B]}``,
    augmented (a crop of the image padded by 4 pixels, a horizontal flip) when ``augment``."""
    n = len(ds.train_labels)
    if (step is None) == (start_example is None):
        raise ValueError("pass exactly one of step= (step stream) and start_example= (examples).")
    if start_example is None:
        idx = train_indices(seed, step, batch_size, n)
        draw = functools.partial(augment_params, seed, step, batch_size)
    else:
        idx = stream_indices(seed, start_example, batch_size, n)
        draw = functools.partial(stream_augment_params, seed, start_example, batch_size, n)
    images = crop_and_flip(ds.train_images[idx], *draw()) if augment else ds.train_images[idx]
    label = ds.train_labels[idx].astype(np.int32)
    return {"image": normalize(images, ds.mean, ds.std), "label": label}


def train_batches(ds: Dataset, batch_size: int, *, seed: int, start_step: int = 0,
                  augment: bool = True, prefetch: int = 2,
                  start_example: int | None = None) -> Iterator[dict]:  # fmt: skip
    """Endless :func:`train_batch` batches of steps ``start_step, start_step + 1, ...``
    (resuming at ``start_step`` yields those of an uninterrupted run), or with
    ``start_example`` the consecutive pieces of the example stream from there; prepared up to
    ``prefetch`` ahead in a thread (0: in the caller's)."""
    num_train = len(ds.train_labels)
    if not 1 <= batch_size <= num_train:
        raise ValueError(
            f"batch_size={batch_size} must be in [1, {num_train}] (the number of train examples)."
        )
    if start_step < 0 or (start_example or 0) < 0:
        raise ValueError(f"start_step={start_step} and start_example={start_example} must be >= 0.")
    make = functools.partial(train_batch, ds, batch_size, seed=seed, augment=augment)
    if start_example is None:
        steps = itertools.count(start_step)
        produce = lambda: make(step=next(steps))  # noqa: E731
    else:
        starts = itertools.count(start_example, batch_size)
        produce = lambda: make(start_example=next(starts))  # noqa: E731
    if prefetch <= 0:
        return (produce() for _ in itertools.count())
    return prefetched(produce, prefetch)


_thread_ids = itertools.count()


def prefetched(produce: Callable[[], Any], size: int = 2) -> Iterator[Any]:
    """Yields ``produce()`` results computed ahead by a daemon thread (queue of ``size``).

    The thread holds no reference to the generator, so closing or dropping the generator runs
    its ``finally``, which stops and joins the thread. Errors in ``produce`` re-raise here.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            while put((produce(), None)):
                pass
        except BaseException as err:  # handed to the consumer
            put((None, err))

    thread = threading.Thread(target=work, name=f"gns-prefetch-{next(_thread_ids)}", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
