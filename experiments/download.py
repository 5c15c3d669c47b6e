"""Files in a shared cache directory: atomic writes, stale temporaries, checked downloads.

A file is written under a temporary name beside it, ``.gns-tmp.<host>.<pid>.<random>.<name>``,
then renamed (:func:`atomic_file`): a reader sees the old file or the complete new one. A writer
killed mid-write leaves its temporary behind, which :func:`remove_stale_temps` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from absl import logging

from experiments import progress
from experiments.cli import UserError

TEMP_PREFIX = ".gns-tmp."
STALE_AFTER_S = 30 * 60  # a temporary not written to for this long is abandoned, whoever's
TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole transfer
CHUNK = 1 << 20
_TEMP_RE = re.compile(r"^\.gns-tmp\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]{8}\.")


class DownloadError(UserError):
    """A download that failed, leaving nothing."""


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@contextlib.contextmanager
def atomic_file(final: str) -> Iterator[BinaryIO]:
    """A binary file to write that becomes ``final`` (its directory created) when the block
    succeeds (fsynced, renamed); on any exception it is removed and ``final`` untouched."""
    directory, name = os.path.split(os.path.abspath(final))
    os.makedirs(directory, exist_ok=True)
    tag = f"{TEMP_PREFIX}{_host_tag()}.{os.getpid()}.{uuid.uuid4().hex[:8]}."
    tmp = os.path.join(directory, tag + name)  # beside final, so the rename is atomic
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _is_stale(name: str, mtime: float, now: float) -> bool:
    """Whether ``name`` is a temporary of :func:`atomic_file` not modified for
    :data:`STALE_AFTER_S`, or whose writer (the pid in the name) no longer runs on this host."""
    match = _TEMP_RE.match(name)
    if match is None or now - mtime > STALE_AFTER_S:  # not ours, or abandoned
        return match is not None
    pid = int(match["pid"])
    if match["host"] != _host_tag() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        return False
    except (OverflowError, OSError):  # no such process
        return True
    return False


def remove_stale_temps(directory: str) -> list[str]:
    """Remove the stale temporaries of :func:`atomic_file` in ``directory``; returns their
    paths (one warning names them). Errors are ignored: this is housekeeping."""
    removed, size, now = [], 0, time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False) and _is_stale(entry.name, st.st_mtime, now):
                    os.remove(entry.path)
                    removed.append(entry.path)
                    size += st.st_size
    if removed:
        logging.warning(
            "Removed %d abandoned temporary file(s) (%.1f MB) of interrupted writes: %s",
            len(removed),
            size / 1e6,
            ", ".join(removed),
        )
    return removed


def file_md5(path: str) -> str:
    """Hex MD5 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def fetch(url: str, dest: str, *, md5: str | None = None, timeout_s: float = TIMEOUT_S) -> str:
    """Download ``url`` to ``dest`` (at once when it exists) and return ``dest``. The body
    streams to :func:`atomic_file`, checked against ``Content-Length`` and ``md5`` (``None``:
    unchecked); ``timeout_s`` bounds connecting and each read. A failed write raises OSError.

    Raises:
      DownloadError: the server cannot be reached or answers with an HTTP error, the transfer
        stops early, or the checksum differs.
    """
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    if url.lower().startswith("http://"):
        logging.warning(
            "The download of %s comes over plain http (%s): it can be altered "
            "on the way; use an https:// URL%s.",
            dest,
            url,
            "" if md5 else " and set its MD5",
        )
    logging.info("Downloading %s to %s.", url, dest)
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"cannot download {url}: the server answered HTTP {err.code}.") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err) or type(err).__name__
        raise DownloadError(f"cannot download {url}: {reason} (no network connection?).") from err
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    bar = progress.Progress(total, desc=f"download {os.path.basename(dest)}", unit="bytes")
    h = hashlib.md5(usedforsecurity=False)  # of the body as it arrives: no second read
    with response, contextlib.closing(bar), atomic_file(dest) as f:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (http.client.HTTPException, OSError) as err:
                raise DownloadError(
                    f"the download of {url} broke off after {f.tell()} bytes "
                    f"({type(err).__name__}: {err}); nothing was kept, run again."
                ) from err
            if not chunk:
                break
            h.update(chunk)
            bar.update(f.write(chunk))
        if total is not None and f.tell() != total:
            raise DownloadError(
                f"the download of {url} stopped after {f.tell()} of {total} bytes "
                f"(the connection closed early); nothing was kept, run again."
            )
        if md5 is not None and (digest := h.hexdigest()) != md5.lower():
            raise DownloadError(
                f"the file downloaded from {url} has MD5 {digest}, not the expected "
                f"{md5.lower()} (a wrong or damaged file); it was removed."
            )
    size = os.path.getsize(dest) / 1e6
    logging.info("Downloaded %s (%.1f MB, MD5 checked: %s).", dest, size, md5 is not None)
    return dest
