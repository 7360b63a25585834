"""Reading the umask, which finished outputs are given (``ckptbridge.io.durability``).

A library runs inside someone else's process: setting the umask, even for an
instant to read it, races with the host's threads, whose files created in that
instant get the wrong mode (with a umask of 0, world-writable).  So the umask is
read without being set where the kernel reports it (Linux: /proc/self/status),
and the portable fallback never sets it to 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ckptbridge.io import atomic as _atomic
from ckptbridge.io import durability as _durability


def _proc_reports_umask() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return any(line.startswith("Umask:") for line in f)
    except OSError:
        return False


HAS_PROC_UMASK = sys.platform.startswith("linux") and _proc_reports_umask()  # Linux 4.7 and later


@pytest.fixture
def umask_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Run with umask 027 (restored afterwards) and record every os.umask() call meanwhile."""
    real = os.umask
    old = real(0o027)
    calls: list[int] = []

    def recording(mask: int) -> int:
        calls.append(mask)
        return real(mask)

    monkeypatch.setattr(os, "umask", recording)
    try:
        yield calls
    finally:
        real(old)


def _mode(path: Any) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.skipif(not HAS_PROC_UMASK, reason="the kernel reports no Umask in /proc/self/status")
def test_reading_the_umask_never_sets_it(umask_calls: list[int], tmp_path: Any) -> None:
    assert _durability.current_umask() == 0o027
    out = _atomic.AtomicFile(str(tmp_path / "o.bin"))
    with open(out.tmp, "wb") as f:
        f.write(b"x")
    out.commit()
    assert _mode(tmp_path / "o.bin") == 0o640
    assert 0 not in umask_calls, f"the umask was set to 0 while reading it: os.umask calls {umask_calls}"
    assert umask_calls == [], f"the umask was changed while reading it: os.umask calls {umask_calls}"


def test_the_fallback_never_sets_the_umask_to_0(umask_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_durability, "_umask_from_proc", lambda: None)  # as on a system without /proc
    assert _durability.current_umask() == 0o027
    assert umask_calls and 0 not in umask_calls, umask_calls
    assert os.umask(0o027) == 0o027  # put back as it was (os.umask is the recorder: this call is recorded too)


@pytest.mark.skipif(not HAS_PROC_UMASK, reason="the kernel reports no Umask in /proc/self/status")
@pytest.mark.parametrize("mask", [0o000, 0o002, 0o022, 0o077, 0o777])
def test_proc_reading_matches_the_umask(mask: int) -> None:
    old = os.umask(mask)
    try:
        assert _durability._umask_from_proc() == mask
        assert _durability.current_umask() == mask
    finally:
        os.umask(old)
