"""Streamed remote reads (``RemoteFile.stream``): several ranged requests in flight, in a bounded window.

A tensor read block by block from a remote object is fetched ahead of the writer,
in requests of at most ``BLOCK`` bytes, never more than ``WINDOW`` bytes in flight,
fetched or in use at once.  The tests shrink both so that a 3 MB tensor is dozens
of requests, and count what fsspec is asked for (its http filesystem's
``cat_file``, wrapped) against what the reader has taken; nothing is timed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge import errors
from ckptbridge.io import remote as _remote

from helpers import error_line, in_process, leftovers, tree, write_checkpoint
from servers import RangeHTTPServer

BLOCK = 64 << 10
WINDOW = 256 << 10
DATA = "model.ckpt-3.data-00000-of-00001"


@pytest.fixture()
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_remote, "BLOCK", BLOCK)
    monkeypatch.setattr(_remote, "WINDOW", WINDOW)
    monkeypatch.setattr(_remote, "BACKOFF", 0.0)


@pytest.fixture()
def streamed(tmp_path: Any) -> Iterator[tuple[RangeHTTPServer, str]]:
    """(server, local prefix): a checkpoint whose 3 MB tensor is ~48 blocks of the small window, on 127.0.0.1."""
    pytest.importorskip("fsspec", reason="the [remote] extra (fsspec, aiohttp) is not installed")
    pytest.importorskip("aiohttp", reason="the [remote] extra (fsspec, aiohttp) is not installed")
    rng = np.random.default_rng(23)
    prefix = write_checkpoint(str(tmp_path / "www" / "run" / "model.ckpt-3"), {
        "net/big": rng.standard_normal((750, 1000)).astype(np.float32),    # 3 MB, rows of 4000 bytes: blocks of whole rows
        "net/odd": rng.integers(0, 1 << 40, size=(7, 33_333)).astype(np.int64),  # 1.9 MB, rows longer than a block
        "net/bias": np.arange(10, dtype=np.float32),
        "global_step": np.array(3, dtype=np.int64),
    })
    server = RangeHTTPServer(str(tmp_path / "www")).start()
    try:
        yield server, prefix
    finally:
        server.stop()


class _Counted:
    """fsspec's http ``cat_file`` wrapped: each data file request's size, the most in flight at once, and the bytes
    asked for beyond what the reader has released (``taken``, which the test advances).

    The first piece of at most a block waits (a few seconds at most) for another request to start: a reader that never has two
    in flight shows as ``most == 1``, whatever the timing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import fsspec

        fs = fsspec.filesystem("http")  # the instance open_place gets too (fsspec caches them per thread)
        self.lock = threading.Lock()
        self.sizes: list[int] = []
        self.now = self.most = 0
        self.started = self.taken = self.ahead = self.pieces = 0
        self.second = threading.Event()
        original = fs.cat_file  # set on the instance by fsspec (its sync mirror of _cat_file)

        def cat_file(path: str, start: int | None = None, end: int | None = None, **kw: Any) -> Any:
            n = (end or 0) - (start or 0)
            if ".data-" not in path:  # the index: read before any tensor, alone
                return original(path, start=start, end=end, **kw)
            with self.lock:
                self.sizes.append(n)
                self.now += 1
                self.most = max(self.most, self.now)
                self.started += n
                self.ahead = max(self.ahead, self.started - self.taken)
                first = n <= BLOCK and not self.pieces  # the first piece of a stream (a lone small read asks for READAHEAD)
                if n <= BLOCK or self.pieces:
                    self.pieces += 1
                if self.pieces == 2:
                    self.second.set()
            try:
                if first:
                    self.second.wait(5)
                return original(path, start=start, end=end, **kw)
            finally:
                with self.lock:
                    self.now -= 1

        monkeypatch.setattr(fs, "cat_file", cat_file)

    def take(self, n: int) -> None:
        with self.lock:
            self.taken += n


def test_a_stream_fetches_ahead_within_its_window(streamed: tuple[RangeHTTPServer, str], small_window: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server, prefix = streamed
    local = open(prefix + ".data-00000-of-00001", "rb").read()
    place, name = _remote.open_place(server.url + "/run/model.ckpt-3", progress=False)
    f = place.open(name + ".data-00000-of-00001")
    counted = _Counted(monkeypatch)
    ranges = [(o, min(100_000, f.size - o)) for o in range(0, f.size, 100_000)]  # two requests each: 64 KiB and the rest
    got = []
    for (_, n), data in zip(ranges, f.stream(ranges), strict=True):
        assert len(data) == n
        got.append(data)
        counted.take(n)  # released when the next range is asked for
    assert b"".join(got) == local
    assert counted.most >= 2  # requests were in flight together
    assert max(counted.sizes) <= BLOCK and sum(counted.sizes) == f.size  # each byte once, in pieces of at most a block
    assert counted.ahead <= WINDOW, counted.ahead  # never more asked for than the window beyond what the reader released


def _npz_tensors(path: str) -> dict[str, tuple[str, bytes]]:
    with ckptbridge.read(path) as r:
        return {k: (str(r[k].dtype), r[k].tobytes()) for k in r.keys()}


def test_export_over_http_through_a_small_window_is_bit_exact(streamed: tuple[RangeHTTPServer, str], small_window: None,
                                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    server, prefix = streamed
    counted = _Counted(monkeypatch)
    rc, _, err = in_process("export", "-q", server.url + "/run/model.ckpt-3", str(tmp_path / "remote.npz"))
    assert rc == 0, err
    rc, _, err = in_process("export", "-q", prefix, str(tmp_path / "local.npz"))
    assert rc == 0, err
    got, want = _npz_tensors(str(tmp_path / "remote.npz")), _npz_tensors(str(tmp_path / "local.npz"))
    assert got == want and set(got) == {"net/big", "net/odd", "net/bias", "global_step"}
    data = os.path.getsize(prefix + ".data-00000-of-00001")
    assert counted.most >= 2 and max(counted.sizes) <= _remote.READAHEAD  # the big tensors in blocks, several in flight
    assert data <= server.sent <= data + os.path.getsize(prefix + ".index") + 2 * _remote.READAHEAD  # each byte once


def _asked(rng: str | None) -> int:
    """The bytes a logged ``Range: bytes=a-b`` asked for."""
    assert rng is not None
    a, b = rng.split("=", 1)[1].split("-")
    return int(b) - int(a) + 1


def test_a_connection_dropped_mid_range_is_retried_in_a_stream(streamed: tuple[RangeHTTPServer, str], small_window: None,
                                                              tmp_path: Any) -> None:
    server, prefix = streamed
    server.fault(".data-00000-of-00001", "drop", times=_remote.ATTEMPTS - 1)  # whichever requests come first, cut halfway
    rc, _, err = in_process("export", "-q", server.url + "/run/model.ckpt-3", str(tmp_path / "remote.npz"))
    assert rc == 0, err
    gets = [e for e in server.log if e.method == "GET" and e.path.endswith(".data-00000-of-00001")]
    assert sum(1 for e in gets if e.sent < _asked(e.range)) == _remote.ATTEMPTS - 1  # cut short, and asked for again
    assert max(_asked(e.range) for e in gets) <= _remote.READAHEAD  # the tensors came in pieces of the window
    with ckptbridge.read(prefix) as local, ckptbridge.read(str(tmp_path / "remote.npz")) as r:
        for k in local.keys():
            assert r[k].dtype == local[k].dtype and r[k].tobytes() == local[k].tobytes(), k


def test_a_connection_that_keeps_dropping_fails_a_stream_with_the_message_of_a_read(
        streamed: tuple[RangeHTTPServer, str], small_window: None, tmp_path: Any) -> None:
    server, _ = streamed
    dest = tmp_path / "dest"
    dest.mkdir()
    server.fault(".data-00000-of-00001", "drop")
    rc, out, err = in_process("export", server.url + "/run/model.ckpt-3", str(dest / "out.npz"), "--include", "^net/big$")
    line = error_line((rc, err), f"failed {_remote.ATTEMPTS} times", "model.ckpt-3.data-00000-of-00001")
    assert line.startswith(f"ckptbridge: error: reading {server.url}/run/{DATA} failed {_remote.ATTEMPTS} times (")
    assert out == "" and tree(str(dest)) == set() and leftovers(str(dest)) == []
    gets = [e for e in server.log if e.method == "GET" and e.path.endswith(".data-00000-of-00001")]
    assert len(gets) >= _remote.ATTEMPTS and max(_asked(e.range) for e in gets) <= BLOCK  # it failed in the window's pieces


def test_one_long_range_streams_in_blocks(streamed: tuple[RangeHTTPServer, str], small_window: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    server, prefix = streamed
    local = open(prefix + ".data-00000-of-00001", "rb").read()
    place, name = _remote.open_place(server.url + "/run/model.ckpt-3", progress=False)
    f = place.open(name + ".data-00000-of-00001")
    counted = _Counted(monkeypatch)
    assert list(f.stream([(7, 1_000_000)])) == [local[7:1_000_007]]
    assert counted.most >= 2 and max(counted.sizes) <= BLOCK and sum(counted.sizes) == 1_000_000


def test_a_stream_past_the_end_is_the_truncation_of_a_read(streamed: tuple[RangeHTTPServer, str], small_window: None) -> None:
    server, _ = streamed
    place, name = _remote.open_place(server.url + "/run/model.ckpt-3", progress=False)
    f = place.open(name + ".data-00000-of-00001")
    with pytest.raises(errors.FormatError, match=r"is truncated: needed bytes \d+\.\.\d+ of a \d+-byte file"):
        list(f.stream([(0, BLOCK), (f.size - 10, 20)]))


def test_a_tar_chain_is_read_one_range_at_a_time_and_exactly(streamed: tuple[RangeHTTPServer, str], small_window: None,
                                                            tmp_path: Any) -> None:
    """fsspec's tar filesystem reads one shared file object: its ranges must not be fetched from several threads."""
    import tarfile

    server, prefix = streamed
    with tarfile.open(tmp_path / "www" / "run.tar", "w") as t:
        for suffix in (".index", ".data-00000-of-00001"):
            t.add(prefix + suffix, arcname="model.ckpt-3" + suffix)
    url = f"tar://model.ckpt-3::{server.url}/run.tar"
    place, name = _remote.open_place(f"tar://model.ckpt-3.index::{server.url}/run.tar", progress=False)
    assert place.open(name).block_hint() is None  # not streamed ahead
    plain, _ = _remote.open_place(server.url + "/run/model.ckpt-3", progress=False)
    assert plain.open(DATA).block_hint() == BLOCK
    rc, _, err = in_process("export", "-q", url, str(tmp_path / "tar.npz"))
    assert rc == 0, err
    with ckptbridge.read(prefix) as local, ckptbridge.read(str(tmp_path / "tar.npz")) as r:
        assert list(r.keys()) == list(local.keys())
        for k in local.keys():
            assert r[k].dtype == local[k].dtype and r[k].tobytes() == local[k].tobytes(), k
