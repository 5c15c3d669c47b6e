"""Tests of experiments/tasks/text.py (byte corpora, splits, batches) and configs/lm.py."""

import logging
import math
import os
import pathlib
import platform

import numpy as np
import pytest

from configs import lm
from experiments import rules, tasks
from experiments.cli import UserError
from experiments.tasks import text


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _text(i: int, n: int = 200) -> bytes:
    """Distinct printable bytes per file, so concatenation order is visible."""
    rng = np.random.default_rng(i)
    return bytes(rng.integers(32, 127, size=n, dtype=np.uint8)) + b"\n"


def _corpus(tmp_path, num_bytes=1000, context=7):
    path = _write(tmp_path / "corpus.txt", _text(0, num_bytes - 1))
    return text.load({"path": path, "test_fraction": 0.2}, context=context)


# ----------------------------------------------------------------------------------------------
# The standard-library corpus.


def test_stdlib_corpus_order_split_and_record():
    ds = text.load({}, context=64)
    again = text.load({}, context=64)
    assert ds.train_files == again.train_files and ds.test_files == again.test_files
    np.testing.assert_array_equal(ds.train, again.train)
    np.testing.assert_array_equal(ds.test, again.test)
    assert list(ds.train_files) == sorted(ds.train_files)
    assert not set(ds.train_files) & set(ds.test_files)
    # The split is the hash of the relative path; the test split is ~5% of the files.
    assert all(text.is_test_file(f, 0.05) for f in ds.test_files)
    assert not any(text.is_test_file(f, 0.05) for f in ds.train_files)
    assert 0.02 < len(ds.test_files) / (len(ds.train_files) + len(ds.test_files)) < 0.1
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    for f in ds.train_files + ds.test_files:
        assert f.endswith(".py") and not excluded & set(f.split("/")[:-1]), f
    assert ds.source["kind"] == "stdlib" and ds.source["path"] == text.stdlib_root()
    assert ds.source["python"] == platform.python_version()
    assert ds.source["train_bytes"] == len(ds.train) > 1_000_000
    assert ds.source["sha256"] == again.source["sha256"]


def test_stdlib_cap_takes_files_in_order():
    cap = 40_000
    ds = text.load({"max_bytes": cap}, context=16)
    root = text.stdlib_root()
    test_cap = round(cap * 0.05)
    for files, part, limit in (
        (ds.train_files, ds.train, cap - test_cap),
        (ds.test_files, ds.test, test_cap),
    ):
        expected = b"".join(pathlib.Path(root, f).read_bytes() for f in files)[:limit]
        assert part.tobytes() == expected
    assert (
        ds.train_files[0]
        == sorted(
            f
            for f in text.list_files(root, (".py",), exclude_dirs=text.EXCLUDED_DIRS)
            if not text.is_test_file(f, 0.05) and os.path.getsize(os.path.join(root, f))
        )[0]
    )


# ----------------------------------------------------------------------------------------------
# File and directory sources.


def test_file_source_splits_the_last_bytes(tmp_path):
    data = _text(1, 999)
    path = _write(tmp_path / "a.txt", data)
    ds = text.load({"path": path, "test_fraction": 0.1}, context=8)
    assert ds.train.tobytes() == data[:900] and ds.test.tobytes() == data[900:]
    assert ds.source["kind"] == "file" and ds.source["split"] == "bytes"
    assert ds.source["num_train_files"] == ds.source["num_test_files"] == 1  # both its splits
    capped = text.load({"path": path, "test_fraction": 0.1, "max_bytes": 500}, context=8)
    assert capped.train.tobytes() == data[:450] and capped.test.tobytes() == data[450:500]


def test_directory_source_splits_by_file(tmp_path):
    files = {f"d{i // 10}/f{i:02d}.txt": _text(i) for i in range(40)}
    for name, data in files.items():
        _write(tmp_path / name, data)
    _write(tmp_path / ".hidden/x.txt", b"\x00binary but hidden")
    _write(tmp_path / "__pycache__/x.pyc", b"\x00\x01")
    ds = text.load({"path": str(tmp_path), "test_fraction": 0.3}, context=8)
    test = sorted(f for f in files if text.is_test_file(f, 0.3))
    train = sorted(f for f in files if f not in test)
    assert 0 < len(test) < 40
    assert (list(ds.train_files), list(ds.test_files)) == (train, test)
    assert ds.train.tobytes() == b"".join(files[f] for f in train)
    assert ds.test.tobytes() == b"".join(files[f] for f in test)
    # A cap the corpus is within cuts nothing (it cut the test split to its share of the cap).
    total = sum(map(len, files.values()))
    whole = text.load({"path": str(tmp_path), "test_fraction": 0.3, "max_bytes": total}, context=8)
    assert (whole.train.tobytes(), whole.test.tobytes()) == (ds.train.tobytes(), ds.test.tobytes())
    # A new file does not move the others.
    _write(tmp_path / "d0/new.txt", _text(99))
    more = text.load({"path": str(tmp_path), "test_fraction": 0.3}, context=8)
    assert set(ds.test_files) <= set(more.test_files)
    assert set(ds.train_files) <= set(more.train_files)
    # extensions select files.
    _write(tmp_path / "d0/skip.md", b"not read")
    only = text.load(
        {"path": str(tmp_path), "extensions": (".txt",), "test_fraction": 0.3}, context=8
    )
    assert "d0/skip.md" not in only.train_files + only.test_files


def test_directory_with_few_files_still_has_both_splits(tmp_path):
    _write(tmp_path / "a.txt", _text(1))
    _write(tmp_path / "b.txt", _text(2))
    ds = text.load({"path": str(tmp_path), "test_fraction": 1e-9}, context=8)
    assert sorted(ds.train_files + ds.test_files) == ["a.txt", "b.txt"]
    assert len(ds.test_files) == 1
    single = tmp_path / "one"
    data = _text(3, 99)
    _write(single / "only.txt", data)
    ds = text.load({"path": str(single), "test_fraction": 0.2}, context=8)
    assert ds.source["split"] == "bytes" and ds.test.tobytes() == data[80:]


def test_an_empty_file_is_no_split_and_a_lopsided_split_is_warned(tmp_path, caplog):
    _write(tmp_path / "a.txt", b"")
    _write(tmp_path / "b.txt", _text(1, 999))
    ds = text.load({"path": str(tmp_path), "test_fraction": 0.1}, context=8)
    assert ds.source["split"] == "bytes" and len(ds.test) == 100  # b.txt's last 10%
    _write(tmp_path / "novel.txt", _text(2, 99_999))  # 100x b.txt: one of them is held out
    with caplog.at_level(logging.WARNING):
        ds = text.load({"path": str(tmp_path), "test_fraction": 0.1}, context=8)
    share = len(ds.test) / (len(ds.train) + len(ds.test))
    assert (share < 0.05 or share > 0.3) and "holds out" in caplog.text


# ----------------------------------------------------------------------------------------------
# Errors.


def _raises(cfg, path, context=8, match=None):
    with pytest.raises(UserError) as info:
        text.load(cfg, context=context)
    assert str(path) in str(info.value)
    if match:
        assert match in str(info.value)
    return info.value


def test_missing_path(tmp_path):
    path = tmp_path / "nope.txt"
    err = _raises({"path": str(path)}, path, match="does not exist")
    assert err.hint


def test_empty_directory_and_empty_file(tmp_path):
    os.makedirs(tmp_path / "empty")
    _raises({"path": str(tmp_path / "empty")}, tmp_path / "empty", match="empty corpus")
    _write(tmp_path / "only_md/x.md", b"text")
    _raises({"path": str(tmp_path / "only_md"), "extensions": (".py",)}, tmp_path / "only_md")
    path = _write(tmp_path / "empty.txt", b"")
    _raises({"path": path}, path, match="empty")
    _write(tmp_path / "blank/a.txt", b"")
    _write(tmp_path / "blank/b.txt", b"")
    _raises({"path": str(tmp_path / "blank")}, tmp_path / "blank", match="empty")


def test_binary_files_are_named(tmp_path):
    path = _write(tmp_path / "nul.txt", b"hello\x00world" * 20)
    _raises({"path": path}, path, match="binary")
    noise = bytes(np.random.default_rng(0).integers(128, 256, size=500, dtype=np.uint8))
    path = _write(tmp_path / "noise.bin", noise)
    _raises({"path": path}, path, match="not UTF-8")
    # In a directory, the binary file itself is named.
    _write(tmp_path / "dir/a.txt", _text(1))
    _write(tmp_path / "dir/b.txt", _text(2))
    bad = _write(tmp_path / "dir/c.dat", b"\x00\x01\x02" * 50)
    _raises({"path": str(tmp_path / "dir")}, bad, match="binary")
    # Non-ASCII text is text, also when the cap cuts a multi-byte character.
    path = _write(tmp_path / "utf8.txt", "é".encode() * 200)
    ds = text.load({"path": path, "max_bytes": 301}, context=8)
    assert len(ds.train) + len(ds.test) == 301


def test_corpus_shorter_than_context(tmp_path):
    path = _write(tmp_path / "short.txt", b"x" * 100)  # 95 train, 5 test bytes
    _raises({"path": path}, path, context=8, match="test split")
    text.load({"path": path, "test_fraction": 0.5}, context=8)
    _raises({"path": path, "test_fraction": 0.5}, path, context=50, match="train split")


# ----------------------------------------------------------------------------------------------
# Batches.


def test_windows_are_slices_and_targets_shift_by_one(tmp_path):
    ds = _corpus(tmp_path)
    batch = text.train_batch(ds, 3, 50, seed=1)
    offsets = text.train_offsets(len(ds.train), ds.window, 1, 3, 50)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (50, 7)
    for o, tok, tgt in zip(offsets, batch["tokens"], batch["targets"], strict=True):
        window = ds.train[o : o + 8]
        np.testing.assert_array_equal(tok, window[:-1])
        np.testing.assert_array_equal(tgt, window[1:])
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])


def test_each_epoch_sees_every_window_once(tmp_path):
    ds = _corpus(tmp_path)  # 800 train bytes, window 8: 100 examples per epoch, no slack
    per_epoch = ds.examples_per_epoch
    assert per_epoch == len(ds.train) // 8
    for epoch in range(3):
        offsets = text.train_offsets(len(ds.train), 8, 0, epoch * per_epoch, per_epoch)
        assert sorted(offsets) == list(range(0, 8 * per_epoch, 8))
    # With slack, an epoch is a shifted grid of non-overlapping windows inside the split.
    offsets = text.train_offsets(805, 8, 0, 0, 100)
    assert len(set(offsets % 8)) == 1 and offsets.min() >= 0 and offsets.max() + 8 <= 805
    assert len(set(offsets)) == 100


@pytest.mark.parametrize("start,size,k", [(0, 64, 1), (5, 90, 40), (170, 100, 30), (0, 350, 199)])
def test_batch_of_a_range_is_the_concatenation_of_its_parts(tmp_path, start, size, k):
    ds = _corpus(tmp_path)  # 100 examples per epoch: several ranges cross epochs
    whole = text.train_batch(ds, start, size, seed=3)
    first = text.train_batch(ds, start, k, seed=3)
    rest = text.train_batch(ds, start + k, size - k, seed=3)
    for key in ("tokens", "targets"):
        np.testing.assert_array_equal(whole[key], np.concatenate([first[key], rest[key]]))
    other = text.train_batch(ds, start, size, seed=4)
    assert not np.array_equal(whole["tokens"], other["tokens"])


def test_eval_arrays_are_fixed_non_overlapping_windows(tmp_path):
    ds = _corpus(tmp_path)  # 200 test bytes: 25 windows of 8
    full = text.eval_arrays(ds)
    windows = ds.test[: 25 * 8].reshape(25, 8)
    np.testing.assert_array_equal(full["tokens"], windows[:, :-1])
    np.testing.assert_array_equal(full["targets"], windows[:, 1:])
    capped = text.eval_arrays(ds, 5)
    np.testing.assert_array_equal(capped["tokens"], windows[[0, 5, 10, 15, 20], :-1])
    assert text.eval_arrays(ds, 1000)["tokens"].shape == (25, 7)


def test_bits_per_byte():
    assert text.bits_per_byte(math.log(256)) == pytest.approx(8.0)
    assert text.bits_per_byte(0.0) == 0.0


# ----------------------------------------------------------------------------------------------
# configs/lm.py


@pytest.mark.parametrize("variant", lm.VARIANTS)
def test_config_variants(variant):
    """Each variant passes the rules, every field has a rule and a comment that ``--help``
    prints, and the variant's docstring gives its command."""
    c = lm.get_config(variant)
    assert c.model.name == "transformer" and c.model.vocab_size == text.VOCAB_SIZE
    assert c.model.width % c.model.num_heads == 0
    rules.check(c, tasks.table(c))
    lines = rules.describe(c, tasks.table(c), lm.__file__)
    assert not [ln for ln in lines if "(no rule)" in ln or "(no comment)" in ln]
    assert f"configs/lm.py:{variant}" in getattr(lm, variant).__doc__
    assert "compare" not in c  # the language model trains only


def test_config_unknown_variant():
    with pytest.raises(UserError, match="smoke"):
        lm.get_config("gpu")
