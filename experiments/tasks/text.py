"""Byte-level language modelling (``config.task='lm'``): byte corpora and their splits; an
example is a window of ``context + 1`` bytes, ``{'tokens', 'targets'}`` (the next byte of each
token; vocabulary 256). Target ``config.target_bits_per_byte`` (lower is better; bits per byte
= loss in nats / ln 2)."""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import math
import os
import platform
import sysconfig
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from experiments.cli import UserError
from experiments.tasks.base import Task

VOCAB_SIZE = 256
# Directories never read: installed packages, test suites (the stdlib's hold binary fixtures
# and deliberately broken encodings), byte-code caches.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# A file is binary when it holds a NUL byte or more than this fraction of undecodable bytes.
MAX_UNDECODABLE_FRACTION = 0.1
# Keeps the epoch stream apart from other users of np.random.default_rng([seed, epoch]).
_EPOCH_TAG = 0x74657874


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """A byte corpus: read-only uint8 ``train`` and ``test`` splits, ``context`` tokens per
    example, the ``source`` record (``kind``: ``stdlib``, ``file`` or ``directory``, ``path``,
    ``split``: by ``file`` or ``bytes``, sizes, ``sha256`` of the bytes, ``python`` version)
    and the relative paths of the train and test files (empty for a file)."""

    train: np.ndarray
    test: np.ndarray
    context: int
    source: Mapping[str, Any]
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()

    @property
    def window(self) -> int:  # bytes per example
        return self.context + 1

    @property
    def examples_per_epoch(self) -> int:
        return len(self.train) // self.window

    @property
    def num_eval_windows(self) -> int:  # non-overlapping windows of the test split
        return len(self.test) // self.window


def load(cfg, *, context: int) -> TextDataset:
    """The corpus of ``cfg`` (``config.data`` or a mapping) with ``context`` tokens per
    example. ``path``: ``None``, the ``.py`` files of the running interpreter's standard library
    (no download; packages, test suites, caches and binary files left out: **the corpus, hence
    the test loss, depends on the Python version**, recorded in ``source``); a file (its last
    ``test_fraction``, default 0.05, of bytes held out); or a directory (its files, or those
    ending in ``extensions``), split by file (:func:`is_test_file`). Files are read in sorted
    order and concatenated; ``max_bytes`` caps each split at its share. A missing path, an empty
    corpus, a binary file or a split shorter than ``context + 1`` bytes raises
    :class:`UserError`."""
    test_fraction = float(cfg.get("test_fraction", 0.05))
    max_bytes = None if cfg.get("max_bytes") is None else int(cfg["max_bytes"])
    extensions = cfg.get("extensions")
    extensions = (extensions,) if isinstance(extensions, str) else extensions
    record, (train, test, train_files, test_files, split) = _read_corpus(
        cfg.get("path"), max_bytes, test_fraction, extensions
    )
    where = record["path"]
    if len(train) + len(test) == 0:
        raise UserError(
            f"data.path {where} is an empty corpus (0 bytes).", hint="give it some text."
        )
    for name, part in (("train", train), ("test", test)):
        if len(part) < context + 1:
            raise UserError(
                f"the {name} split of {where} has {len(part)} bytes, fewer than context + 1 = "
                f"{context + 1} (corpus: {len(train)} train + {len(test)} test bytes, split by "
                f"{split}).",
                hint="use more text (or a larger data.max_bytes / data.test_fraction), or a "
                "smaller --config.model.context.",
            )
    digest = hashlib.sha256(train.tobytes())
    digest.update(test.tobytes())
    record.update(split=split, test_fraction=test_fraction, max_bytes=max_bytes,
                  num_train_files=len(train_files), num_test_files=len(test_files),
                  train_bytes=len(train), test_bytes=len(test), sha256=digest.hexdigest()[:16],
                  python=platform.python_version(),
                  python_implementation=platform.python_implementation())  # fmt: skip
    for a in (train, test):
        a.flags.writeable = False
    logging.info(
        "text corpus %s (%s): %d train bytes (%d files), %d test bytes (%d files), python %s",
        where, record["kind"], len(train), len(train_files), len(test), len(test_files),
        record["python"],
    )  # fmt: skip
    return TextDataset(train, test, context, record, tuple(train_files), tuple(test_files))


def _read_corpus(path, max_bytes, test_fraction, extensions) -> tuple[dict, tuple]:
    """The source record (``kind``, ``path``) and the split of the corpus at ``path``."""
    if path is None:
        root = stdlib_root()
        files = list_files(root, (".py",), exclude_dirs=EXCLUDED_DIRS)
        arrays = _split_by_file(root, files, test_fraction, max_bytes, strict=False)
        return {"kind": "stdlib", "path": root}, arrays
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise UserError(
            f"data.path {path} does not exist.",
            hint="pass a text file or a directory of text files, or leave data.path unset "
            "for the Python standard library.",
        )
    if not os.path.isdir(path):
        return {"kind": "file", "path": path}, _split_bytes(path, max_bytes, test_fraction, [])
    files = list_files(path, extensions)
    if not files:
        what = f"files ending in {', '.join(extensions)}" if extensions else "files"
        raise UserError(
            f"data.path {path} is an empty corpus: the directory has no {what}.",
            hint="point data.path at a directory with text files (or set "
            "data.extensions to match them).",
        )
    if len(files) == 1:  # one file: split its bytes
        arrays = _split_bytes(os.path.join(path, files[0]), max_bytes, test_fraction, files)
    else:
        arrays = _split_by_file(path, files, test_fraction, max_bytes, strict=True)
    return {"kind": "directory", "path": path}, arrays


def stdlib_root() -> str:
    """The directory of the running interpreter's standard library."""
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def list_files(root: str, extensions=None, *, exclude_dirs=("__pycache__",)) -> list[str]:
    """Relative ``/``-separated paths of the regular files under ``root``, sorted, but hidden
    ones, those in the directories ``exclude_dirs`` and (with ``extensions``, suffixes) others."""
    suffixes = tuple(extensions or ("",))
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in exclude_dirs and not d.startswith(".")]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not name.startswith(".") and name.endswith(suffixes) and os.path.isfile(full):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


def is_test_file(rel_path: str, test_fraction: float) -> bool:
    """Whether a file belongs to the test split: the first 8 bytes of ``sha256(rel_path)``,
    as a fraction of 2**64, below ``test_fraction``."""
    return _path_hash(rel_path) < test_fraction


def _path_hash(rel_path: str) -> float:
    digest = hashlib.sha256(rel_path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_by_file(root, files, test_fraction, max_bytes, *, strict):
    """(train, test, train_files, test_files, 'file'): files read in order, capped per split;
    a binary or unreadable file raises with ``strict``, else is skipped (the standard library).
    Each split gets a file at least (the smallest or largest hash)."""
    test_set = {f for f in files if is_test_file(f, test_fraction)} or {min(files, key=_path_hash)}
    if len(test_set) == len(files):
        test_set.discard(max(files, key=_path_hash))
    test_cap = None if max_bytes is None else max(1, round(max_bytes * test_fraction))
    caps = (None, None) if max_bytes is None else (max_bytes - test_cap, test_cap)
    parts = []
    for is_test, cap in zip((False, True), caps, strict=True):
        chunks, used, total = [], [], 0
        for name in (f for f in files if (f in test_set) == is_test):
            if cap is not None and total >= cap:
                break
            try:
                data = _read_text(os.path.join(root, name), None if cap is None else cap - total)
            except (UserError, OSError) as e:
                if strict:
                    raise
                logging.info("skipping %s: %s", name, e)
                continue
            if data:
                chunks.append(data)
                used.append(name)
                total += len(data)
        parts.append((np.frombuffer(b"".join(chunks), np.uint8).copy(), used))
    (train, train_files), (test, test_files) = parts
    return train, test, train_files, test_files, "file"


def _split_bytes(path: str, max_bytes, test_fraction: float, files: list[str]):
    """(train, test, files, files, 'bytes'): the file's last ``test_fraction`` of bytes is test."""
    arr = np.frombuffer(_read_text(path, max_bytes), np.uint8).copy()
    cut = len(arr) - max(1, round(len(arr) * test_fraction)) if len(arr) else 0
    return arr[:cut], arr[cut:], files, files, "bytes"


def _read_text(path: str, max_bytes: int | None) -> bytes:
    """The first ``max_bytes`` (``None``: all) bytes of a text file; a binary one (a NUL byte,
    or more than ``MAX_UNDECODABLE_FRACTION`` of bytes not UTF-8) raises :class:`UserError`."""
    with open(path, "rb") as f:
        data = f.read(max_bytes)
    # Not final: a cut at max_bytes may split the last multi-byte character.
    decoded = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)
    bad = decoded.count("\ufffd") - data.count("\ufffd".encode())
    if b"\x00" in data:
        problem = "it holds NUL bytes"
    elif bad > MAX_UNDECODABLE_FRACTION * len(data):
        problem = f"{bad} of its {len(data)} bytes are not UTF-8"
    else:
        return data
    raise UserError(
        f"{path} is a binary file ({problem}), not text.",
        hint="data.path must be text; in a directory, data.extensions selects the text "
        "files, e.g. --config.data.extensions=\"('.py', '.txt')\".",
    )


def train_offsets(
    num_bytes: int, window: int, seed: int, start_example: int, batch_size: int
) -> np.ndarray:
    """Start offsets (int64) of the train windows ``[start_example, start_example +
    batch_size)``. Epoch ``e`` has ``per_epoch = num_bytes // window`` windows at ``shift_e +
    window * k``, the shift and the order of ``k`` drawn from ``default_rng([seed, e, tag])``;
    example ``i`` is position ``i % per_epoch`` of epoch ``i // per_epoch``."""
    per_epoch = num_bytes // window
    slack = num_bytes - per_epoch * window
    index = np.arange(start_example, start_example + batch_size, dtype=np.int64)
    epoch, position = np.divmod(index, per_epoch)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        shift, order = _epoch_order(seed, int(e), per_epoch, slack)
        mask = epoch == e
        out[mask] = shift + window * order[position[mask]]
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, per_epoch: int, slack: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([seed, epoch, _EPOCH_TAG])
    shift = int(rng.integers(0, slack + 1))
    order = rng.permutation(per_epoch)
    order.flags.writeable = False
    return shift, order


def _windows(data: np.ndarray, offsets: np.ndarray, window: int) -> dict:
    w = data[offsets[:, None] + np.arange(window)]
    return {"tokens": w[:, :-1].astype(np.int32), "targets": w[:, 1:].astype(np.int32)}


def train_batch(ds: TextDataset, start_example: int, batch_size: int, seed: int) -> dict:
    """The train examples ``[start_example, start_example + batch_size)``: ``{'tokens',
    'targets'}``, int32 ``[B, context]``, ``targets[:, t]`` the byte after ``tokens[:, t]``."""
    offsets = train_offsets(len(ds.train), ds.window, seed, start_example, batch_size)
    return _windows(ds.train, offsets, ds.window)


def eval_arrays(ds: TextDataset, max_windows: int | None = None) -> dict:
    """Fixed held-out windows: the non-overlapping windows of the test split, all of them or
    ``max_windows`` spread evenly, as ``{'tokens', 'targets'}`` (int32 ``[W, context]``)."""
    total = ds.num_eval_windows
    n = total if max_windows is None else min(int(max_windows), total)
    offsets = (np.arange(n, dtype=np.int64) * total // n) * ds.window
    return _windows(ds.test, offsets, ds.window)


def bits_per_byte(loss: float) -> float:
    """Bits per byte of a mean next-byte cross-entropy ``loss`` in nats: ``loss / ln 2``."""
    return loss / math.log(2.0)


def _eval_arrays(config, ds: TextDataset, split: str, n: int | None) -> dict:
    if split == "test":
        return eval_arrays(ds, n)
    n = ds.examples_per_epoch if n is None else min(n, ds.examples_per_epoch)
    return train_batch(ds, 0, n, seed=config.seed)  # the first windows of training


TASK = Task(
    name="lm",
    keys=("tokens", "targets"),
    metric="bits_per_byte",
    lower_is_better=True,
    target_field="target_bits_per_byte",
    load=lambda config: load(config.data, context=config.model.context),
    num_train=lambda ds: ds.examples_per_epoch,
    input_spec=lambda ds: ((ds.context,), np.int32),
    batch=lambda config, ds, size, start: train_batch(ds, start, size, seed=config.seed),
    eval_arrays=_eval_arrays,
    describe=lambda ds: dict(ds.source),
    metrics=lambda result: {"bits_per_byte": bits_per_byte(result["loss"])},
)
