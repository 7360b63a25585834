"""Remote URLs by address: a refused connection, IPv6 literal hosts, fsspec chains (issue 21).

On f835772 ``http://127.0.0.1:<closed port>/x`` failed with "... (FileNotFoundError)",
and ``http://[::1]:PORT/x`` was cut at its ``::`` by fsspec's URL chaining.  The
servers are real and local (tests/servers.py).
"""

from __future__ import annotations

import os
import socket
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge import errors
from ckptbridge.io import remote as _remote

from helpers import error_line, in_process, write_checkpoint
from servers import RangeHTTPServer

TENSORS = {"net/w": np.arange(12, dtype=np.float32).reshape(3, 4), "net/b": np.array([1.5, -2.0], np.float64)}


@pytest.fixture(autouse=True)
def _remote_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fsspec", reason="the [remote] extra (fsspec, aiohttp) is not installed")
    pytest.importorskip("aiohttp", reason="the [remote] extra (fsspec, aiohttp) is not installed")
    monkeypatch.setattr(_remote, "BACKOFF", 0.0)


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nothing else takes it) but not listening."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_a_refused_connection_says_so(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/run/model.ckpt"
    with pytest.raises(errors.RemoteError) as e:
        ckptbridge.read(url)
    msg = str(e.value)
    assert isinstance(e.value, ConnectionError) and not isinstance(e.value, FileNotFoundError)
    assert msg.startswith(f"cannot connect to 127.0.0.1:{closed_port}: connection refused"), msg
    assert "FileNotFoundError" not in msg and "that the server is running" in msg, msg

    rc, out, err = in_process("ls", url)
    line = error_line((rc, err), f"cannot connect to 127.0.0.1:{closed_port}: connection refused")
    assert out == "" and "FileNotFoundError" not in line


def _site(root: Any) -> str:
    """run/model.ckpt-7 (and its state file) and a.tar holding it, under ``root``; returns the prefix."""
    prefix = write_checkpoint(str(root / "run" / "model.ckpt-7"), TENSORS)
    (root / "run" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-7"\n')
    with tarfile.open(str(root / "a.tar"), "w") as t:
        for suffix in (".index", ".data-00000-of-00001"):
            t.add(prefix + suffix, "model.ckpt-7" + suffix)
    return prefix


def _same(url: str, tmp_path: Any) -> None:
    out = str(tmp_path / f"o{len(os.listdir(tmp_path))}.npz")
    ckptbridge.export(url, out)
    with ckptbridge.read(out) as got:
        assert sorted(got) == sorted(TENSORS)
        for n, want in TENSORS.items():
            assert got[n].dtype == want.dtype and got[n].tobytes() == want.tobytes(), n


def _server(root: Any, host: str) -> RangeHTTPServer:
    try:
        return RangeHTTPServer(str(root), host=host).start()
    except OSError as e:
        pytest.skip(f"cannot serve on {host} here ({e.strerror}): no IPv6 loopback")


@pytest.mark.parametrize("host", ["::1", "127.0.0.1"])
def test_literal_hosts_and_chained_urls(tmp_path: Any, host: str) -> None:
    if ":" in host and not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    _site(tmp_path / "www")
    server = _server(tmp_path / "www", host)
    try:
        base = server.url
        assert base.startswith("http://[::1]:" if ":" in host else "http://127.0.0.1:")
        for url in (f"{base}/run/model.ckpt-7", f"{base}/run/", f"tar://model.ckpt-7::{base}/a.tar"):
            _same(url, tmp_path)
        rc, out, err = in_process("ls", f"{base}/run/model.ckpt-7")
        assert rc == 0 and "net/w" in out, err
    finally:
        server.stop()


def test_an_ipv6_host_that_refuses_says_so() -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM) if socket.has_ipv6 else None
    if s is None:
        pytest.skip("this Python has no IPv6")
    try:
        s.bind(("::1", 0))
    except OSError as e:
        s.close()
        pytest.skip(f"no IPv6 loopback here ({e.strerror})")
    try:
        port = s.getsockname()[1]
        with pytest.raises(errors.RemoteError, match=rf"^cannot connect to \[::1\]:{port}: connection refused"):
            ckptbridge.read(f"http://[::1]:{port}/run/model.ckpt")
    finally:
        s.close()


def test_chain_split_keeps_bracketed_hosts_whole() -> None:
    assert _remote._chain("tar://m::http://[::1]:80/a.tar") == ["tar://m", "http://[::1]:80/a.tar"]
    assert _remote._chain("http://[fe80::1%25eth0]:80/x") == ["http://[fe80::1%25eth0]:80/x"]
    assert _remote._chain("zip://a::tar://b::s3://bucket/c") == ["zip://a", "tar://b", "s3://bucket/c"]
