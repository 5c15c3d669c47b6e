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

from experiments import data
from experiments.cli import UserError
from experiments.rules import HEADS, TEXT, TRANSFORMER, choice, count, multiples, real, tuple_of
from experiments.tasks.base import Task

VOCAB_SIZE = 256
# Directories never read: installed packages, test suites (the stdlib's hold binary fixtures
# and deliberately broken encodings), byte-code caches.
EXCLUDED_DIRS = frozenset("site-packages dist-packages test tests idle_test __pycache__".split())
# A file is binary when it holds a NUL byte or more than this fraction of undecodable bytes.
MAX_UNDECODABLE_FRACTION = 0.1
# Keeps the epoch stream apart from other users of np.random.default_rng([seed, epoch]).
_EPOCH_TAG = 0x74657874


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """A byte corpus: read-only uint8 ``train`` and ``test`` splits, ``context`` tokens per
    example, the ``source`` record of :func:`load` and the relative paths of the train and test
    files (empty for a file)."""

    train: np.ndarray
    test: np.ndarray
    context: int
    source: Mapping[str, Any]
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]

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
    (packages, test suites, caches and binary files left out: **the corpus, hence the test
    loss, depends on the Python version**); a file (its last ``test_fraction``, default 0.05,
    of bytes held out); or a directory (its files, or those ending in ``extensions``), split by
    file (:func:`is_test_file`). Files are read in sorted order and concatenated; ``max_bytes``
    caps each split at its share (a directory within it is read whole). ``source`` records the
    kind, path, split, sizes, a hash and the Python version. A missing path, an empty corpus,
    a binary file or a split shorter than ``context + 1`` bytes raises :class:`UserError`."""
    test_fraction = float(cfg.get("test_fraction", 0.05))
    max_bytes = None if cfg.get("max_bytes") is None else int(cfg["max_bytes"])
    kind, where, files = _find_corpus(cfg.get("path"), cfg.get("extensions"))
    files = [f for f in files if os.path.getsize(os.path.join(where, f))] or files  # no empty
    split = "bytes" if len(files) <= 1 else "file"
    if split == "bytes":  # a file: its last test_fraction of bytes is held out
        corpus = np.frombuffer(_read_text(os.path.join(where, *files), max_bytes), np.uint8)
        cut = len(corpus) - max(1, round(len(corpus) * test_fraction)) if len(corpus) else 0
        train, test, train_files, test_files = corpus[:cut], corpus[cut:], files, files
    else:  # each split gets a file at least (the one of the smallest or largest hash)
        test_set = {f for f in files if is_test_file(f, test_fraction)}
        test_set = test_set or {min(files, key=_path_hash)}
        if len(test_set) == len(files):
            test_set.discard(max(files, key=_path_hash))
        sizes = (os.path.getsize(os.path.join(where, f)) for f in files)  # read only if capped
        if max_bytes is not None and sum(sizes) <= max_bytes:
            max_bytes = None  # a cap the corpus is within cuts nothing
        test_cap = None if max_bytes is None else max(1, round(max_bytes * test_fraction))
        train_cap = None if max_bytes is None else max_bytes - test_cap
        strict = kind != "stdlib"  # the standard library's unreadable files are skipped
        train, train_files = _read_files(where, sorted(set(files) - test_set), train_cap, strict)
        test, test_files = _read_files(where, sorted(test_set), test_cap, strict)
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
                hint=(
                    "more files (the split is by file, by a hash of each path), one file "
                    "(split by bytes)"
                    if split == "file"
                    else "more text (or a larger data.max_bytes), another data.test_fraction"
                )
                + ", or a smaller --config.model.context.",
            )
    record = dict(
        kind=kind,
        path=where,
        split=split,
        test_fraction=test_fraction,
        max_bytes=max_bytes,
        num_train_files=len(train_files) if split == "file" else 1,  # a file: both its splits
        num_test_files=len(test_files) if split == "file" else 1,
        train_bytes=len(train),
        test_bytes=len(test),
        sha256=hashlib.sha256(b"".join((train, test))).hexdigest()[:16],
        python=platform.python_version(),
        python_implementation=platform.python_implementation(),
    )
    held_out = (
        f"{_files(len(train_files))}), {len(test):,} test bytes ({_files(len(test_files))})"
        if split == "file"
        else f"one file), {len(test):,} test bytes (its last {test_fraction:.0%})"
    )
    logging.info(
        "text corpus %s (%s): %s train bytes (%s, python %s",
        where, kind, f"{len(train):,}", held_out, record["python"],
    )  # fmt: skip
    share = len(test) / (len(train) + len(test))
    if split == "file" and not test_fraction / 3 <= share <= 3 * test_fraction:
        logging.warning(
            "The split by file holds out %.1f%% of the corpus's bytes, not about "
            "data.test_fraction=%g: its files differ much in size. Fewer, larger files split "
            "by bytes (one file), or files of similar sizes split as intended.",
            100 * share,
            test_fraction,
        )
    return TextDataset(train, test, context, record, tuple(train_files), tuple(test_files))


def _files(n: int) -> str:
    return f"{n} file" + ("s" if n != 1 else "")


def _find_corpus(path, extensions) -> tuple[str, str, list[str]]:
    """``(kind, absolute path, relative paths of its files)`` of the corpus at ``path`` (a
    file has none)."""
    if path is None:
        root = stdlib_root()
        return "stdlib", root, list_files(root, (".py",), exclude_dirs=EXCLUDED_DIRS)
    what = "a text file or a directory of text files (no data.path: the standard library)"
    path = data.existing_path(path, what)
    if not os.path.isdir(path):
        return "file", path, []
    files = list_files(path, extensions)
    if not files:
        what = f"files ending in {', '.join(extensions)}" if extensions else "files"
        raise UserError(
            f"data.path {path} is an empty corpus: the directory has no {what}.",
            hint="point data.path at a directory with text files (or set "
            "data.extensions to match them).",
        )
    return "directory", path, files


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


def _read_files(root: str, files: list[str], cap: int | None, strict: bool):
    """``(bytes, names)`` of the ``files`` read in order and concatenated up to ``cap`` bytes
    (``None``: all), empty ones left out; a binary or unreadable file raises with ``strict``,
    else is skipped."""
    chunks, used, total = [], [], 0
    for name in files:
        if cap is not None and total >= cap:
            break
        try:
            chunk = _read_text(os.path.join(root, name), None if cap is None else cap - total)
        except (UserError, OSError) as e:
            if strict:
                raise
            logging.info("skipping %s: %s", name, e)
            continue
        if chunk:
            chunks.append(chunk)
            used.append(name)
            total += len(chunk)
    return np.frombuffer(b"".join(chunks), np.uint8), used


def _read_text(path: str, max_bytes: int | None) -> bytes:
    """The first ``max_bytes`` (``None``: all) bytes of a text file; a binary one (a NUL byte,
    or more than ``MAX_UNDECODABLE_FRACTION`` of bytes not UTF-8) raises :class:`UserError`."""
    with open(path, "rb") as f:
        raw = f.read(max_bytes)
    # Not final: a cut at max_bytes may split the last multi-byte character.
    decoded = codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final=False)
    bad = decoded.count("\ufffd") - raw.count("\ufffd".encode())
    if b"\x00" in raw:
        problem = "it holds NUL bytes"
    elif bad > MAX_UNDECODABLE_FRACTION * len(raw):
        problem = f"{bad} of its {len(raw)} bytes are not UTF-8"
    else:
        return raw
    raise UserError(
        f"{path} is a binary file ({problem}), not text.",
        hint="data.path must be UTF-8 text (another encoding: convert it, e.g. iconv -f "
        "latin1 -t utf-8); in a directory, data.extensions selects the text files, e.g. "
        "--config.data.extensions=\"('.py', '.txt')\".",
    )


def train_offsets(
    num_bytes: int, window: int, seed: int, start_example: int, batch_size: int
) -> np.ndarray:
    """Start offsets (int64) of the train windows ``[start_example, start_example +
    batch_size)``. Epoch ``e`` has ``per_epoch = num_bytes // window`` windows at ``shift_e +
    window * k``, the shift and the order of ``k`` drawn from ``default_rng([seed, e, tag])``;
    example ``i`` is position ``i % per_epoch`` of epoch ``i // per_epoch``."""
    epoch = lambda e: (_epoch_offsets(seed, e, num_bytes, window),)
    return data.epoch_slice(epoch, num_bytes // window, start_example, batch_size)[0]


@functools.lru_cache(maxsize=4)
def _epoch_offsets(seed: int, epoch: int, num_bytes: int, window: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch, _EPOCH_TAG])
    per_epoch = num_bytes // window
    shift = int(rng.integers(0, num_bytes - per_epoch * window + 1))
    offsets = shift + window * rng.permutation(per_epoch)
    offsets.flags.writeable = False
    return offsets


def _windows(corpus: np.ndarray, offsets: np.ndarray, window: int) -> dict:
    w = corpus[offsets[:, None] + np.arange(window)]
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


# The rows of this task's config fields (experiments.rules).
FIELDS = (
    ("task", choice("lm")),
    ("target_bits_per_byte", real(0, open_lo=True).or_none),
    ("final_eval_examples", count(1).or_none),
    *TRANSFORMER,
    ("model.vocab_size", count(256)),
    ("data.path", TEXT.or_none),
    ("data.max_bytes", count(2, hi=2**62).or_none),
    ("data.test_fraction", real(0, 1, open_lo=True, open_hi=True)),
    ("data.extensions", tuple_of(TEXT, distinct=True).or_none),
)

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
    fields=FIELDS,
    cross=(multiples("model.width", "model.num_heads", HEADS),),
)
