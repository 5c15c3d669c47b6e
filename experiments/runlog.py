"""The record of a run: strict JSON files and the metrics log.

This module is the one owner of what a run leaves in its workdir. Everything that writes or
reads ``config.json``, ``summary.json``, ``sweep.json`` or ``metrics.jsonl`` goes through it.

JSON convention: files are strict JSON (RFC 8259), so any parser reads them. A non-finite float
(``NaN``, ``Infinity``) is written as ``null``; the key that holds it says what was measured, and
the code that produced it documents what ``null`` means there (e.g. "no finite estimate").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging as std_logging
import math
import os
import tempfile
from typing import Any

import numpy as np
from absl import logging

from experiments.cli import UserError

__all__ = [
    "QuietOrbax",
    "to_strict_json",
    "dumps",
    "write_json",
    "read_json",
    "read_jsonl",
    "workdir_lock",
    "fingerprint",
    "differing_fields",
]

LOCK_FILE = ".lock"


class QuietOrbax(std_logging.Filter):
    """A logging filter for the mains: drops orbax's INFO chatter (several lines per
    checkpoint), keeps its warnings."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def to_strict_json(obj: Any) -> Any:
    """``obj`` with numpy/JAX scalars and arrays as Python values, tuples as lists and every
    non-finite float as ``None``: what :func:`json.dumps` writes with ``allow_nan=False``."""
    if isinstance(obj, dict):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_strict_json(v) for v in obj]
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "__array__") or isinstance(obj, np.generic):
        return to_strict_json(np.asarray(obj).tolist())
    return str(obj)


def dumps(obj: Any, **kwargs) -> str:
    """One strict-JSON string (non-finite floats as ``null``)."""
    return json.dumps(to_strict_json(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as strict JSON atomically (temp file in the same directory, fsync, then
    ``os.replace``): a killed run leaves the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    text = dumps(obj, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str) -> Any:
    """The parsed JSON file at ``path``."""
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file (``[]`` when it does not exist); a torn last line (killed
    run) is skipped with a warning."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("Skipping a malformed line of %s: %r", path, line[:80])
    return rows


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold ``workdir`` for this process: a second run in the same workdir stops at once with a
    :class:`~experiments.cli.UserError` that names the holder's pid.

    An advisory ``flock`` on ``workdir/.lock``: the kernel releases it when the holder exits,
    however it exits (SIGKILL included), so a stale lock never blocks a new run.

    Example::

        with workdir_lock("runs/cpu"):
            ...  # train, write files
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"another run (pid {holder}) is using the workdir {workdir}",
                hint="wait for it to finish, stop it, or pass another --workdir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def fingerprint(fields: dict) -> str:
    """A short stable hash of ``fields`` (canonical strict JSON): equal fields, equal hash."""
    text = dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differing_fields(old: dict, new: dict) -> list[str]:
    """Dotted names of the fields whose values differ between two nested dicts, e.g.
    ``['batch_size: 64 -> 128', 'data.num_train: None -> 512']``."""
    a, b = _flatten(to_strict_json(old)), _flatten(to_strict_json(new))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
