"""CIFAR-style image data: sources, an array cache, normalized and augmented batches.

``config.data.source``: ``'cifar10_binary'`` (the official binary version, downloaded once and
checked, or at ``data.path``), ``'folder'`` (a directory or ``.tar.gz`` at ``data.path``),
``'tfds'`` or ``'synthetic'``. Batches are a pure function of the seed and the step (or the
example position), so a resumed run sees the batches of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import itertools
import os
import stat
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from experiments import download
from experiments.cli import UserError
from experiments.progress import Progress

LAYOUT = "split/class/image.jpg (splits train and test, e.g. train/airplane/0000.jpg)"
SPLITS = ("train", "test")
# The cache key's version of how a folder is read (images in subfolders of a class included).
FOLDER_LAYOUT = 2
IMAGE_EXTENSIONS = tuple(".jpg .jpeg .jfif .png .bmp .gif .webp .ppm .tif .tiff".split())
CROP_PADDING = 4
CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_CLASSES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())
CIFAR10_BATCHES = (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")  # train, test
_CIFAR10_RECORD = 1 + 3 * 32 * 32  # label byte, then the R, G and B planes of 32 x 32
# Seeds: epoch permutation from default_rng([seed, epoch]); augmentation from
# default_rng([seed, step or epoch, _AUGMENT_TAG]). The tag keeps the two streams apart
# (SeedSequence pads entropy with zeros, so [seed, s, 0] would equal [seed, s]).
_AUGMENT_TAG = 0x61756720


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


def _progress(items, desc: str):
    """``items`` with a progress bar on a terminal (log lines elsewhere)."""
    with contextlib.closing(Progress(len(items), desc=desc, unit="img")) as bar:
        for item in items:
            yield item
            bar.update(1)


def load(cfg) -> Dataset:
    """The dataset of ``cfg`` (``config.data``, or a mapping): ``num_train`` and ``num_test``
    are None (all) or the size of a class-stratified subset (:func:`subsample`; of
    ``'synthetic'``: the generated sizes, None: 2048 and 512). A :class:`UserError` names a bad
    path, archive member, download or field."""
    if isinstance(cfg, Mapping):
        cfg = ml_collections.ConfigDict(dict(cfg))
    sizes = (cfg.num_train, cfg.num_test)
    if cfg.source == "synthetic":
        arrays = _synthetic_arrays(cfg.synthetic, sizes[0] or 2048, sizes[1] or 512)
        sizes = (None, None)  # generated at the requested sizes
    elif cfg.source == "folder":
        path = existing_path(cfg.path, f"'folder': a directory or .tar.gz laid out {LAYOUT}")
        decode = functools.partial(_decode_folder, path)
        arrays = _cached(
            cfg.cache_dir, f"folder{FOLDER_LAYOUT}-{_source_fingerprint(path)}", decode
        )
    elif cfg.source == "cifar10_binary":
        arrays = _cifar10_binary_arrays(cfg)
    else:  # 'tfds' (experiments.rules checks data.source)
        arrays = _tfds_arrays(cfg.name, cfg.tfds_data_dir, cfg.cache_dir)
    splits = []
    for split, n in zip(SPLITS, sizes, strict=True):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].astype(np.int32)
        if n is not None and n > len(labels):
            raise UserError(
                f"data.num_{split}={n} but the split has only {len(labels)} examples.",
                hint=f"use data.num_{split}=None for all of them, or a smaller number.",
            )
        idx = slice(None) if n is None else subsample(labels, n)
        splits += [images[idx], labels[idx]]
    return Dataset(
        *splits,
        int(arrays["num_classes"]),
        *channel_stats(splits[0]),
        tuple(str(c) for c in arrays["class_names"]),
    )


def subsample(labels: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of a class-stratified subset of ``n`` of ``labels``: the examples in a
    fixed seeded order, taken round-robin over the classes (the first of each class, then the
    second of each, ...), so class counts differ by at most one where classes have enough."""
    labels = np.asarray(labels)
    perm = np.random.default_rng(0).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # an example's place in its class's order
    for c in np.unique(labels):
        in_class = perm[labels[perm] == c]
        rank[in_class] = np.arange(len(in_class))
    return np.sort(perm[np.argsort(rank[perm], kind="stable")[:n]])


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel ``(mean, std)`` (float32 ``[C]``, ``[0, 1]`` scale) of uint8 images
    ``[N, H, W, C]``, from histograms of the byte values (no float copy of the images)."""
    channels = np.moveaxis(images, -1, 0)
    freq = np.array([np.bincount(x.ravel(), minlength=256) for x in channels], np.float64)
    freq /= freq.sum(axis=1, keepdims=True)  # [C, 256]: of each byte value
    values = np.arange(256) / 255.0
    mean = freq @ values
    std = np.sqrt((freq * (values - mean[:, None]) ** 2).sum(axis=1))
    # A constant channel must not divide by zero.
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _synthetic_arrays(scfg, num_train: int, num_test: int) -> dict[str, Any]:
    """Class-dependent colour + low-frequency pattern, with per-example colour jitter and noise."""
    image_size, num_classes = int(scfg.image_size), int(scfg.num_classes)
    seed = int(scfg.get("seed") or 0)
    rng = np.random.default_rng([seed, num_classes, image_size])
    # Templates in uint8 units around 128: a colour (robust to crops and flips) plus a smooth
    # spatial pattern (nearest-upsampled 4x4 grid).
    colours = rng.normal(0.0, 30.0, size=(num_classes, 1, 1, 3))
    coarse = rng.normal(0.0, 30.0, size=(num_classes, 4, 4, 3))
    reps = -(-image_size // 4)
    pattern = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)
    templates = 128.0 + colours + pattern[:, :image_size, :image_size]
    out: dict[str, Any] = {
        "num_classes": num_classes,
        "class_names": [f"class_{k}" for k in range(num_classes)],
    }
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
    """A tfds dataset through ``tfds.data_source`` (reading needs no TensorFlow, preparing
    does), cached under its name, version, prepared directory and split sizes."""
    import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy import, only for this source)

    data_dir = data_dir and os.path.expanduser(data_dir)
    can_prepare = _tensorflow_available()
    try:  # with TensorFlow, an unprepared dataset is downloaded and prepared
        sources = tfds.data_source(
            name, split=list(SPLITS), data_dir=data_dir, download=can_prepare
        )
    except Exception as err:  # tfds raises several types for "not prepared"
        if not can_prepare:
            where = data_dir or "the tfds default data_dir (~/tensorflow_datasets)"
            raise UserError(
                f"tfds dataset {name!r} is not prepared in {where}, and preparing it needs "
                f"TensorFlow, which is not installed ({type(err).__name__}: {err}).",
                hint="install it once with `pip install -e '.[tfds]'` (the next run prepares the "
                "data), or use --config.data.source=cifar10_binary --config.data.path=None "
                "(downloads CIFAR-10 without "
                "TensorFlow) or an image folder: --config.data.source=folder "
                f"--config.data.path=/path/to/cifar10-jpeg.tar.gz (layout {LAYOUT}).",
            ) from err
        raise
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
            examples = [source[i] for i in _progress(range(len(source)), f"tfds {name} {split}")]
            out[f"{split}_images"] = np.stack([np.asarray(e["image"]) for e in examples])
            out[f"{split}_labels"] = np.array([int(e["label"]) for e in examples], np.int32)
        return out

    return _cached(cache_dir, f"tfds-{name.replace('/', '_')}-{key}", decode)


def user_cache_dir() -> str:
    """``$XDG_CACHE_HOME/gns``, or ``~/.cache/gns`` (the XDG base directory convention)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: ignored, as the spec says
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gns")


def private_cache_dir(name: str) -> str | None:
    """``user_cache_dir()/name`` made this user's alone (mode 0700), for a cache of executed
    code; ``None`` (warned) when it is a symbolic link, another user's, or not creatable."""
    path = os.path.join(user_cache_dir(), name)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            os.chmod(path, 0o700, follow_symlinks=False)
            return path
        problem = f"not a directory of this user alone (owner {st.st_uid})"
    except OSError as err:
        problem = str(err)
    logging.warning("Not using the cache %s (%s).", path, problem)
    return None


def _cache_dir(cache_dir: str | None) -> str:
    """The cache directory, after removing abandoned temporaries of killed writers in it."""
    path = os.path.abspath(os.path.expanduser(str(cache_dir))) if cache_dir else user_cache_dir()
    download.remove_stale_temps(path)
    return path


def _cached(cache_dir: str | None, stem: str, decode: Callable[[], dict]) -> dict[str, Any]:
    """``decode()``'s arrays, from ``<cache_dir>/<stem>.npz`` when it is there and usable (made
    from ``stem``), else decoded and written there atomically (a failed write: a warning)."""
    path = os.path.join(_cache_dir(cache_dir), f"{stem}.npz")
    if os.path.isfile(path) and (arrays := _read_cache(path, stem)) is not None:
        logging.info("Loaded the cached arrays %s.", path)
        return arrays
    start = time.perf_counter()
    arrays = decode()
    logging.info(
        "Decoded %d train and %d test images in %.1f s; caching them in %s.",
        len(arrays["train_labels"]),
        len(arrays["test_labels"]),
        time.perf_counter() - start,
        path,
    )
    try:
        with download.atomic_file(path) as f:
            np.savez(f, **arrays, source=np.str_(stem))
    except OSError as err:
        logging.warning(
            "Cannot write the data cache %s (%s); continuing without it, so the next run decodes "
            "the data again. Set --config.data.cache_dir to a writable directory to cache it.",
            path,
            err,
        )
    return arrays


def _read_cache(path: str, stem: str) -> dict[str, Any] | None:
    """The arrays of the cache file ``path`` made from ``stem``, else None (warned)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = dict(f)
        if str(arrays["source"]) != stem:
            raise ValueError(f"it holds the arrays of another source, {arrays['source']}")
        n, names = int(arrays["num_classes"]), arrays["class_names"]
        for split in SPLITS:  # what a decoder returns, else the file is not ours
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            shaped = images.ndim == 4 and labels.shape == images.shape[:1] and len(labels) > 0
            if not shaped or images.dtype != np.uint8 or labels.min() < 0 or labels.max() >= n:
                raise ValueError(
                    f"{split}: images {images.dtype}{images.shape}, labels "
                    f"{labels.shape} not in [0, {n})"
                )
        if len(names) not in (0, n):
            raise ValueError(f"{len(names)} class names for {n} classes")
    except MemoryError:
        raise
    except Exception as err:  # zero-length, truncated, wrong keys, wrong arrays: decode again
        logging.warning(
            "The cache file %s is unusable (%s: %s); removing it and decoding the data again.",
            path,
            type(err).__name__,
            err,
        )
        with contextlib.suppress(OSError):
            os.remove(path)
        return None
    return arrays


_SAMPLE_BLOCKS, _BLOCK = 16, 1 << 16  # sampled per file, and files per directory


def _source_fingerprint(path: str) -> str:
    """Cache key of a data source: the name, size and mtime of each file and evenly spread
    blocks of content, so a source replaced behind the same path gets another key and the same
    source reached by another path (a link, another checkout's ``../shared``) the same one."""
    path, h = os.path.realpath(path), hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        entries = _members(path, wanted=lambda name: False)  # the listing only
        files = [os.path.join(path, name) for name, is_dir, _ in entries if not is_dir]
    for file in files:
        st = os.stat(file)
        h.update(f"\0{os.path.relpath(file, path)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    for file in files[:: max(1, len(files) // _SAMPLE_BLOCKS)][:_SAMPLE_BLOCKS]:
        end = max(0, os.path.getsize(file) - _BLOCK)
        with open(file, "rb") as f:
            for i in range(_SAMPLE_BLOCKS if end else 1):
                f.seek(end * i // (_SAMPLE_BLOCKS - 1))
                h.update(f.read(_BLOCK))
    stem = os.path.basename(path.rstrip(os.sep)).split(".")[0] or "data"
    return f"{stem}-{h.hexdigest()[:16]}"


def existing_path(path: str, what: str) -> str:
    """The absolute ``data.path``; a missing one raises :class:`UserError` saying ``what``."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise UserError(f"data.path={path!r} does not exist.", hint=f"Expected {what}.")
    return path


def _members(path: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bool, bytes | None]]:
    """``(name, is_dir, bytes)`` of each entry of a directory or tar archive (any compression),
    names relative to ``path``; bytes only of the files ``wanted(name)``, else None."""
    where = "at its start"
    try:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path, followlinks=True):
                dirs.sort()
                for name in dirs + sorted(files):  # a directory's list is short
                    where, data = os.path.relpath(os.path.join(root, name), path), None
                    if name not in dirs and wanted(where):
                        with open(os.path.join(root, name), "rb") as f:
                            data = f.read()
                    yield where, name in dirs, data
        else:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    where, data = f"in member {member.name!r}", None
                    if member.isfile() and wanted(member.name):
                        data = tar.extractfile(member).read()
                    yield member.name, member.isdir(), data
                    where = f"after member {member.name!r}"
    except (EOFError, OSError, zlib.error, tarfile.TarError) as err:
        raise UserError(
            f"data.path={path!r} is truncated or corrupt, or not a directory or tar archive "
            f"({where}: {type(err).__name__}: {err}).",
            hint="copy or download it again (compare its size or checksum with the original), or "
            f"point data.path at an intact copy; the layout is {LAYOUT}, or the CIFAR-10 binary "
            "version's.",
        ) from err


def _layout_error(path: str, problem: str) -> UserError:
    return UserError(
        f"data.path={path!r}: {problem}.",
        hint=f"Expected a directory or .tar.gz with the layout {LAYOUT}.",
    )


def _decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG/... bytes as a uint8 ``[H, W, 3]`` RGB array; a 16-bit grayscale image scaled
    to 8 bits (PIL's RGB conversion would clip it to 255)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode.startswith("I;16"):
            gray = np.round(np.asarray(img, np.float64) / 257).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        if img.mode in ("I", "F"):  # 32-bit: no range to scale from
            raise ValueError(f"a 32-bit image (mode {img.mode}): save it with 8 or 16 bits")
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _decode_folder(path: str) -> dict[str, Any]:
    """The images of a folder or tar archive laid out ``split/class/image.jpg`` (or of the
    CIFAR-10 binary version), ordered by (class name, file name); labels index the sorted class
    names, which both splits must share."""
    files: dict[str, dict[str, list]] = {split: {} for split in SPLITS}  # split: class: files
    is_image = lambda name: (
        not os.path.basename(name).startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
    )
    roots = set()  # where the splits stand: one place
    for name, is_dir, data in _members(path, is_image):
        parts = [p for p in name.split("/") if p not in ("", ".")]  # archives: ./train/...
        if parts and parts[-1] in CIFAR10_BATCHES:
            return _decode_cifar10_binary(path)
        at = next((i for i, p in enumerate(parts) if p in SPLITS), None)  # the split's place
        if at is None or len(parts) < at + 2 or not (is_dir or data is not None):
            continue
        split, cls = parts[at], parts[at + 1]
        if cls.startswith("."):  # a hidden directory (.ipynb_checkpoints): not a class
            continue
        roots.add("".join(p + "/" for p in parts[:at]))
        if data is not None and len(parts) == at + 2:
            raise _layout_error(
                path, f"image {name!r} lies directly in {split}/, not in a class dir"
            )
        if is_dir and len(parts) == at + 2:
            files[split].setdefault(cls, [])  # a class directory: may stay empty
        elif data is not None:  # in the class directory, or in a folder below it
            files[split].setdefault(cls, []).append(("/".join(parts[at + 2 :]), name, data))
    if len(roots) > 1:
        places = ", ".join(root + "train/" for root in sorted(roots))
        raise _layout_error(
            path,
            f"the splits stand in more than one place ({places}), and would be merged: point "
            "data.path at one of them",
        )
    for split in SPLITS:
        if not files[split]:
            raise _layout_error(
                path,
                f"no {split} directory of class directories with images ({split}/class/image.jpg)",
            )
        for cls, items in files[split].items():
            if not items:
                raise _layout_error(path, f"the class directory {split}/{cls}/ has no images")
    class_names = sorted(files["train"])
    if sorted(files["test"]) != class_names:
        raise _layout_error(
            path,
            f"train/ and test/ have different class directories: "
            f"{class_names} vs {sorted(files['test'])}",
        )
    out: dict[str, Any] = {"num_classes": len(class_names), "class_names": class_names}
    shape = None
    for split in SPLITS:
        listing = [
            (label, item)
            for label, cls in enumerate(class_names)
            for item in sorted(files[split][cls])
        ]
        images = []
        for _, (_, name, data) in _progress(listing, f"decode {split}"):
            try:
                images.append(_decode_image(data))
            except Exception as err:
                kind = "file" if os.path.isdir(path) else "member"
                raise UserError(
                    f"data.path={path!r}: cannot decode the {kind} {name!r} "
                    f"({type(err).__name__}: {err}).",
                    hint="the image is corrupt or not an image: replace or delete it"
                    + (" and re-create the archive." if kind == "member" else "."),
                ) from err
            if shape is None:
                shape, first = images[-1].shape, name
            if images[-1].shape != shape:
                raise _layout_error(
                    path,
                    f"images must all have one size; {name!r} is {images[-1].shape[:2]} but "
                    f"{first!r} is {shape[:2]} (resize them to one size first)",
                )
        out[f"{split}_images"] = np.stack(images)
        out[f"{split}_labels"] = np.array([label for label, _ in listing], dtype=np.int32)
    return out


def _cifar10_binary_arrays(cfg) -> dict[str, Any]:
    """Arrays of the CIFAR-10 binary version at ``data.path`` (used as it is), or of the archive
    in the cache directory, downloaded from ``data.url`` when absent and checked against
    ``data.md5`` (``None``: unchecked, warned) before it is decoded."""
    if cfg.path:
        path = existing_path(cfg.path, "cifar-10-binary.tar.gz, or data.path=None to download it")
    else:
        path = os.path.join(_cache_dir(cfg.cache_dir), "cifar-10-binary.tar.gz")
        try:
            download.fetch(cfg.url, path, md5=cfg.md5)
        except download.DownloadError as err:
            raise UserError(
                f"{err} Use local data instead: DATA= a folder or archive laid out "
                "split/class/image.jpg (e.g. `make demo DATA=path/to/cifar10-jpeg.tar.gz`, "
                "i.e. --config.data.source=folder --config.data.path=...), or "
                "--config.data.source=tfds.",
                hint=f"or copy cifar-10-binary.tar.gz (from {CIFAR10_BINARY_URL}, MD5 "
                f"{CIFAR10_BINARY_MD5}) to {path} yourself, or set data.path to it.",
            ) from err

    def decode() -> dict[str, Any]:
        md5 = cfg.md5  # checked of a file in the cache directory (downloaded, or placed by hand)
        if not cfg.path and md5 is None:
            logging.warning(
                "%s is used without a checksum (data.md5=None): a wrong or "
                "tampered file goes unnoticed; set the expected MD5 to check it.",
                path,
            )
        elif not cfg.path and (actual := download.file_md5(path)) != md5.lower():
            raise UserError(
                f"{path} has MD5 {actual}, not the expected {md5.lower()}: it is not the "
                "official cifar-10-binary.tar.gz, or it is damaged.",
                hint=f"delete it (it is downloaded again), or set data.path={path} to use it "
                "without the check.",
            )
        return _decode_cifar10_binary(path)

    return _cached(cfg.cache_dir, f"cifar10_binary-{_source_fingerprint(path)}", decode)


def _decode_cifar10_binary(path: str) -> dict[str, Any]:
    """The CIFAR-10 binary version, an archive or directory of ``data_batch_1.bin`` ...
    ``data_batch_5.bin`` (train) and ``test_batch.bin``: records of a label byte and the red,
    green and blue planes of a 32 x 32 image."""
    wanted = lambda name: os.path.basename(name) in CIFAR10_BATCHES
    found = {os.path.basename(name): data for name, _, data in _members(path, wanted) if data}
    missing = [name for name in CIFAR10_BATCHES if name not in found]
    if missing:
        raise UserError(
            f"data.path={path!r} has no {', '.join(missing)}: not the CIFAR-10 binary version.",
            hint="data.source=cifar10_binary reads cifar-10-binary.tar.gz (members "
            "cifar-10-batches-bin/data_batch_1.bin ... test_batch.bin) or its directory, and "
            "downloads it with --config.data.path=None; data.source=folder an image folder.",
        )
    records = []
    for name in CIFAR10_BATCHES:
        if len(found[name]) % _CIFAR10_RECORD:
            raise UserError(
                f"data.path={path!r}: {name!r} has {len(found[name])} bytes, not a multiple of "
                f"the {_CIFAR10_RECORD}-byte CIFAR-10 record (1 label byte + 3 x 32 x 32 pixels).",
                hint="the file is truncated or not the CIFAR-10 binary version: get it again.",
            )
        records.append(np.frombuffer(found[name], np.uint8).reshape(-1, _CIFAR10_RECORD))
        if records[-1][:, 0].max() >= len(CIFAR10_CLASSES):
            raise UserError(
                f"data.path={path!r}: {name!r} has label {records[-1][:, 0].max()}; CIFAR-10 has "
                f"{len(CIFAR10_CLASSES)} classes.",
                hint="this is not the CIFAR-10 binary version (CIFAR-100's records differ).",
            )
    out: dict[str, Any] = {"num_classes": len(CIFAR10_CLASSES), "class_names": CIFAR10_CLASSES}
    for split, rows in zip(SPLITS, (np.concatenate(records[:-1]), records[-1]), strict=True):
        images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes: HWC
        out[f"{split}_images"] = np.ascontiguousarray(images)
        out[f"{split}_labels"] = rows[:, 0].astype(np.int32)
    return out


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(images / 255 - mean) / std`` per channel as float32, for uint8 ``images [..., C]``
    and ``mean``, ``std`` in ``[0, 1]`` scale (:class:`Dataset`'s)."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    out = np.multiply(images, np.float32(1.0 / 255.0) / std, dtype=np.float32)  # one pass
    out -= mean / std
    return out


def crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Each image ``[B, H, W, C]`` cropped from its reflect-padded copy at ``offsets`` (int
    ``[B, 2]``, row and column in ``[0, 2 * pad]``; ``(pad, pad)`` is the identity) and mirrored
    left-right where ``flips`` (bool ``[B]``)."""
    _, h, w, _ = images.shape
    pad = CROP_PADDING
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


@functools.lru_cache(maxsize=4)
def _epoch(seed: int, epoch: int, num_train: int) -> tuple[np.ndarray, ...]:
    """The permutation of epoch ``epoch`` and the augmentation of its positions, read-only."""
    arrays = (
        np.random.default_rng([seed, epoch]).permutation(num_train),
        *augment_params(seed, epoch, num_train),
    )
    for a in arrays:
        a.flags.writeable = False
    return arrays


def train_draws(
    seed: int,
    batch_size: int,
    num_train: int,
    *,
    step: int | None = None,
    start_example: int | None = None,
) -> tuple[np.ndarray, ...]:
    """``(indices, crop offsets, flips)`` of a train batch. Of step ``step``: epoch ``e``'s
    permutation ``default_rng([seed, e]).permutation(num_train)`` cut into batches, its
    incomplete tail dropped; :func:`augment_params`. Or of the example stream's positions
    ``[start_example, start_example + batch_size)``: the permutations end to end, each position
    augmented once per epoch (epoch ``e``: ``augment_params(seed, e, num_train)``), so a batch
    size that changes during a run still sees every example once per epoch."""
    if (step is None) == (start_example is None):
        raise ValueError("pass exactly one of step= (step stream) and start_example= (examples).")
    if start_example is None:
        epoch, i = divmod(step, num_train // batch_size)
        idx = _epoch(seed, epoch, num_train)[0][i * batch_size : (i + 1) * batch_size]
        return (idx, *augment_params(seed, step, batch_size))
    return epoch_slice(lambda e: _epoch(seed, e, num_train), num_train, start_example, batch_size)


def epoch_slice(epoch_arrays: Callable[[int], tuple], per_epoch: int, start: int, size: int):
    """Positions ``[start, start + size)`` of the arrays ``epoch_arrays(e)`` (each
    ``per_epoch`` long) of the epochs ``e = 0, 1, ...`` laid end to end."""
    epoch, position = np.divmod(np.arange(start, start + size), per_epoch)
    parts = [[a[position[epoch == e]] for a in epoch_arrays(int(e))] for e in np.unique(epoch)]
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def train_batch(
    ds: Dataset,
    batch_size: int,
    *,
    seed: int,
    augment: bool,
    step: int | None = None,
    start_example: int | None = None,
) -> dict:
    """The batch of :func:`train_draws` ``step`` or ``start_example``: ``{'image': float32
    [B, H, W, C] normalized, 'label': int32 [B]}``, augmented (a crop of the image padded by 4
    pixels, a horizontal flip) when ``augment``."""
    idx, offsets, flips = train_draws(
        seed, batch_size, len(ds.train_labels), step=step, start_example=start_example
    )
    images = ds.train_images[idx]
    images = crop_and_flip(images, offsets, flips) if augment else images
    return {"image": normalize(images, ds.mean, ds.std), "label": ds.train_labels[idx]}


def train_batches(
    ds: Dataset, batch_size: int, *, seed: int, start_step: int = 0, augment: bool = True
) -> Iterator[dict]:
    """Endless :func:`train_batch` batches of steps ``start_step, start_step + 1, ...``,
    :func:`prefetched`. The example stream is :meth:`experiments.tasks.Task.train_batches`."""
    steps = itertools.count(start_step)
    return prefetched(
        lambda: train_batch(ds, batch_size, seed=seed, augment=augment, step=next(steps))
    )


def prefetched(produce: Callable[[], Any]) -> Iterator[Any]:
    """Yields ``produce()`` results computed up to 2 ahead by a worker thread; errors in
    ``produce`` re-raise here. Closing or dropping the generator stops and joins the thread."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="gns-prefetch")
    ahead = [pool.submit(produce) for _ in range(2)]
    try:
        while True:
            ahead.append(pool.submit(produce))
            yield ahead.pop(0).result()
    finally:
        pool.shutdown(cancel_futures=True)
