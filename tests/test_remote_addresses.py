"""Remote URLs by address: a refused connection, IPv6 literal hosts, fsspec chains (issue 21).

On f835772 ``http://127.0.0.1:<closed port>/x`` failed with "... (FileNotFoundError)",
and ``http://[::1]:PORT/x`` was cut at its ``::`` by fsspec's URL chaining.  The
servers are real and local (tests/servers.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

import ckptbridge
from ckptbridge import _remote, errors

from helpers import error_line, in_process


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
