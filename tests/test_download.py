"""Tests of experiments/download.py and the cifar10_binary source, against a local HTTP server.

Nothing here touches the internet: the server listens on 127.0.0.1 on an ephemeral port and
serves a tiny archive in the CIFAR-10 binary layout built by the test.
"""

import contextlib
import hashlib
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading

import ml_collections
import numpy as np
import pytest

from experiments import data, download
from experiments.cli import UserError

TRAIN_PER_BATCH = 3
NUM_TEST = 4


@pytest.fixture(autouse=True)
def _no_proxy_and_private_cache(monkeypatch, tmp_path):
    """Requests to 127.0.0.1 go direct, and no test writes to the real user cache."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _records(rng, n):
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    raw = np.concatenate([labels[:, None], pixels], axis=1).tobytes()
    # Independently of the parser: channel c of image i is the c-th 1024-byte plane, row-major.
    images = np.stack(
        [pixels[:, c * 1024 : (c + 1) * 1024].reshape(n, 32, 32) for c in range(3)], -1
    )
    return raw, images, labels.astype(np.int32)


def _binary_members(seed=0):
    """(members {name: bytes}, expected arrays) of a tiny CIFAR-10 binary version."""
    rng = np.random.default_rng(seed)
    members, train_images, train_labels = {}, [], []
    for name in data.CIFAR10_BATCHES[:-1]:
        members[name], images, labels = _records(rng, TRAIN_PER_BATCH)
        train_images.append(images)
        train_labels.append(labels)
    members["test_batch.bin"], test_images, test_labels = _records(rng, NUM_TEST)
    members["batches.meta.txt"] = "\n".join(data.CIFAR10_CLASSES).encode() + b"\n\n"
    expected = {
        "train_images": np.concatenate(train_images),
        "train_labels": np.concatenate(train_labels),
        "test_images": test_images,
        "test_labels": test_labels,
    }
    return members, expected


def _binary_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_dir_info("cifar-10-batches-bin"))
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _dir_info(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    members, expected = _binary_members()
    path = _binary_archive(tmp_path_factory.mktemp("src") / "cifar-10-binary.tar.gz", members)
    payload = path.read_bytes()
    return {
        "path": path,
        "payload": payload,
        "md5": hashlib.md5(payload).hexdigest(),
        "members": members,
        "expected": expected,
    }


@contextlib.contextmanager
def serve(payload, mode="ok"):
    """An HTTP server on 127.0.0.1 serving ``payload`` at any path; yields (url, stats).

    Modes: ``ok``; ``truncated`` (announces the full length, sends half, closes); ``no_length``
    (no Content-Length, sends half, closes); ``hang`` (accepts, never answers until shut down).
    """
    stats = {"requests": 0}
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            stats["requests"] += 1
            if mode == "hang":
                release.wait(timeout=10)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            if mode != "no_length":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload if mode == "ok" else payload[: len(payload) // 2])
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-binary.tar.gz", stats
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz"  # nothing listens there now


def _binary_cfg(cache, url, md5, path=None):
    """The ``config.data`` fields the cifar10_binary source reads."""
    return ml_collections.ConfigDict(
        {
            "source": "cifar10_binary",
            "path": None if path is None else str(path),
            "cache_dir": None if cache is None else str(cache),
            "url": url,
            "md5": md5,
            "num_train": None,
            "num_test": None,
        }
    )


def _assert_loaded(ds, expected):
    for key, value in expected.items():
        np.testing.assert_array_equal(getattr(ds, key), value)
    assert ds.class_names == data.CIFAR10_CLASSES and ds.num_classes == 10
    assert ds.train_images.shape == (5 * TRAIN_PER_BATCH, 32, 32, 3)


def test_download_checked_cached_and_not_downloaded_again(tmp_path, archive):
    cache = tmp_path / "cache"
    with serve(archive["payload"]) as (url, stats):
        ds = data.load(_binary_cfg(cache, url, archive["md5"]))
        assert stats["requests"] == 1
        _assert_loaded(ds, archive["expected"])
        # By hand, on one record: pixel (row 5, col 7) of channel G of test image 2.
        raw = archive["members"]["test_batch.bin"]
        assert ds.test_images[2, 5, 7, 1] == raw[2 * 3073 + 1 + 1024 + 5 * 32 + 7]
        assert ds.test_labels[2] == raw[2 * 3073]
        assert (cache / "cifar-10-binary.tar.gz").read_bytes() == archive["payload"]
        again = data.load(_binary_cfg(cache, url, archive["md5"]))  # from the array cache
        for npz in cache.glob("*.npz"):
            npz.unlink()
        decoded_again = data.load(_binary_cfg(cache, url, archive["md5"]))  # from the archive
        assert stats["requests"] == 1  # never downloaded again
    _assert_loaded(again, archive["expected"])
    _assert_loaded(decoded_again, archive["expected"])
    left = sorted(os.listdir(cache))
    assert len(left) == 2 and "cifar-10-binary.tar.gz" in left  # and one .npz, no temporary
    assert [f for f in left if f.endswith(".npz")]


def test_default_download_dir_is_the_user_cache_dir(tmp_path, archive):
    with serve(archive["payload"]) as (url, _):
        data.load(_binary_cfg(None, url, archive["md5"]))
    assert (tmp_path / "xdg" / "gns" / "cifar-10-binary.tar.gz").is_file()
    assert data.user_cache_dir() == str(tmp_path / "xdg" / "gns")


def test_wrong_checksum_leaves_nothing(tmp_path, archive):
    cache = tmp_path / "cache"
    with serve(archive["payload"]) as (url, _):
        with pytest.raises(UserError, match="MD5") as e:
            data.load(_binary_cfg(cache, url, "0" * 32))
    message = str(e.value)
    assert archive["md5"] in message and "0" * 32 in message and "removed" in message
    assert os.listdir(cache) == []


@pytest.mark.parametrize("mode", ["truncated", "no_length"])
def test_truncated_transfer_leaves_nothing(tmp_path, archive, mode):
    cache = tmp_path / "cache"
    with serve(archive["payload"], mode=mode) as (url, _):
        with pytest.raises(UserError) as e:
            data.load(_binary_cfg(cache, url, archive["md5"]))
    half, whole = len(archive["payload"]) // 2, len(archive["payload"])
    if mode == "truncated":  # the announced length is not met
        assert f"stopped after {half} of {whole} bytes" in str(e.value)
    else:  # nothing announced: the checksum catches it
        assert "MD5" in str(e.value)
    assert os.listdir(cache) == []


def test_offline_names_the_alternatives(tmp_path, archive):
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as e:
        data.load(_binary_cfg(cache, _closed_port_url(), archive["md5"]))
    message = str(e.value)
    assert "cannot download" in message and "no network" in message
    assert "DATA=" in message and "--config.data.source=tfds" in message
    assert str(cache / "cifar-10-binary.tar.gz") in e.value.hint  # or place the file by hand
    assert isinstance(e.value.__cause__, download.DownloadError)
    assert os.listdir(cache) == []


def test_timeout_is_an_offline_error(tmp_path, archive):
    with serve(archive["payload"], mode="hang") as (url, _):
        with pytest.raises(download.DownloadError) as e:
            download.fetch(url, str(tmp_path / "f.tar.gz"), timeout_s=0.3)
    assert "no network connection" in str(e.value) and "timed out" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_local_archive_and_directory_need_no_network(tmp_path, archive):
    offline = _closed_port_url()
    ds = data.load(_binary_cfg(tmp_path / "c1", offline, archive["md5"], path=archive["path"]))
    _assert_loaded(ds, archive["expected"])
    extracted = tmp_path / "extracted"
    with tarfile.open(archive["path"]) as tar:
        tar.extractall(extracted, filter="data")
    ds = data.load(_binary_cfg(tmp_path / "c2", offline, archive["md5"], path=extracted))
    _assert_loaded(ds, archive["expected"])


def test_folder_source_recognizes_the_binary_version(tmp_path, archive):
    extracted = tmp_path / "extracted"
    with tarfile.open(archive["path"]) as tar:
        tar.extractall(extracted, filter="data")
    for path in (archive["path"], extracted, extracted / "cifar-10-batches-bin"):
        cfg = _binary_cfg(tmp_path / "cache", None, None, path=path)
        cfg.source = "folder"  # what `make demo DATA=...` passes
        _assert_loaded(data.load(cfg), archive["expected"])


def test_malformed_binary_archives_are_named(tmp_path, archive):
    members = dict(archive["members"])
    members["data_batch_3.bin"] = members["data_batch_3.bin"][:-5]
    bad = _binary_archive(tmp_path / "short.tar.gz", members)
    with pytest.raises(UserError, match="'data_batch_3.bin' has .* not a multiple of the 3073"):
        data.load(_binary_cfg(tmp_path / "c", None, None, path=bad))
    del members["test_batch.bin"]
    bad = _binary_archive(tmp_path / "missing.tar.gz", members)
    with pytest.raises(UserError, match="has no test_batch.bin"):
        data.load(_binary_cfg(tmp_path / "c", None, None, path=bad))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive["payload"][: len(archive["payload"]) // 2])
    with pytest.raises(UserError, match="truncated or corrupt.*member 'cifar-10-batches-bin/"):
        data.load(_binary_cfg(tmp_path / "c", None, None, path=cut))


def test_wrong_file_placed_in_the_cache_dir_is_reported(tmp_path, archive):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cifar-10-binary.tar.gz").write_bytes(archive["payload"])
    with pytest.raises(UserError, match="not the expected") as e:
        data.load(_binary_cfg(cache, _closed_port_url(), "f" * 32))
    assert "delete it" in e.value.hint
    ds = data.load(_binary_cfg(cache, _closed_port_url(), archive["md5"]))  # the right sum
    _assert_loaded(ds, archive["expected"])


def test_temp_file_of_a_killed_writer_is_removed_next_time(tmp_path):
    """A writer SIGKILLed mid-file leaves its temporary; the next use of the directory removes
    it, and the file never appears under its final name."""
    final = tmp_path / "arrays.npz"
    script = textwrap.dedent(f"""
        import os, signal
        from experiments import download
        with download.atomic_file({str(final)!r}) as f:
            f.write(b"x" * 100000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (orphan,) = os.listdir(tmp_path)
    assert orphan.startswith(download.TEMP_PREFIX) and orphan.endswith(".arrays.npz")
    assert download.remove_stale_temps(str(tmp_path)) == [str(tmp_path / orphan)]
    assert os.listdir(tmp_path) == []


def test_atomic_file_replaces_only_on_success(tmp_path):
    final = tmp_path / "f.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError), download.atomic_file(str(final)) as f:
        f.write(b"new, but failing")
        raise RuntimeError
    assert final.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    with download.atomic_file(str(final)) as f:
        f.write(b"new")
    assert final.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_plain_http_and_no_checksum_are_warned(tmp_path, archive, caplog):
    """The test server is plain http: one warning; without data.md5 one more, and the cached
    archive decoded later without a checksum warns again."""
    with serve(archive["payload"]) as (url, _), caplog.at_level("WARNING"):
        data.load(_binary_cfg(tmp_path / "c1", url, archive["md5"]))
    assert len(_warnings(caplog)) == 1 and "plain http" in _warnings(caplog)[0]
    caplog.clear()
    with serve(archive["payload"]) as (url, _), caplog.at_level("WARNING"):
        data.load(_binary_cfg(tmp_path / "c2", url, None))
    assert len(_warnings(caplog)) == 2 and "md5=None" in _warnings(caplog)[1]
    for name in os.listdir(tmp_path / "c2"):  # the decoded arrays: decode the archive again
        if name.endswith(".npz"):
            os.remove(tmp_path / "c2" / name)
    caplog.clear()
    with caplog.at_level("WARNING"):
        data.load(_binary_cfg(tmp_path / "c2", _closed_port_url(), None))
    assert len(_warnings(caplog)) == 1 and "without a checksum" in _warnings(caplog)[0]
