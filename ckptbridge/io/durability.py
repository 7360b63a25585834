"""Durability of outputs: fsync before the rename, writeback started early, the umask.

An output is fsynced before it is renamed into place (unless the caller's
:func:`durability` block says not to), and its directory after.  While a file is
still being written, :func:`start_writeback` asks the kernel to begin writing it
out, so the final fsync finds little left to do.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
from typing import Any

from .threads import Job

# Whether outputs are made durable (fsync) before they are renamed into place.
_durable: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptbridge_durable", default=True)


@contextlib.contextmanager
def durability(fsync: bool) -> Iterator[None]:
    """Within the block, outputs opened are fsynced before their rename (the default) or not.

    Without the fsync a conversion runs at the speed of the page cache, like
    ``cp``, but a power loss or a VM killed in the next half minute can leave
    the new file incomplete under its final name (the source is untouched).
    """
    token = _durable.set(fsync)
    try:
        yield
    finally:
        _durable.reset(token)


def fsync_wanted() -> bool:
    """Whether an output opened now is to be fsynced before its rename (see :func:`durability`)."""
    return _durable.get()


_libc: Any = None
_SYNC_FILE_RANGE_WRITE = 2
_kick_lock = threading.Lock()
_kick_busy = False


def _sync_file_range() -> Any:
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL(None, use_errno=True)
            fn = lib.sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    return _libc


def _kick(paths: list[str]) -> None:
    global _kick_busy
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # already renamed or removed: nothing left to hurry
            try:
                _libc(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
            finally:
                os.close(fd)
    finally:
        with _kick_lock:
            _kick_busy = False


def start_writeback(*paths: str) -> None:
    """Ask the kernel to start writing these files' dirty pages to disk, without waiting.

    The fsync before the final rename then finds most of the file already on
    disk: the disk works while we go on converting, instead of all at the end.
    ``sync_file_range`` itself blocks while the disk's queue is full (over 1 s
    of a 1.6 GB export on the benchmark VM), so it runs on a helper thread, one
    call at a time: a kick asked for while one is running is dropped, since the
    next one covers the same pages.  Linux only; elsewhere, and on any error, it
    does nothing.
    """
    global _kick_busy
    if not _sync_file_range():
        return
    with _kick_lock:
        if _kick_busy:
            return
        _kick_busy = True
    try:
        Job(_kick, list(paths), name="ckptbridge-writeback")  # a daemon: exit never waits for it
    except RuntimeError:  # the interpreter is shutting down
        with _kick_lock:
            _kick_busy = False


def fsync_files(paths: list[str]) -> None:
    """Make these files' contents durable (one ``fsync`` each)."""
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def current_umask() -> int:
    """The process's umask, for giving finished outputs the mode a plain ``open`` would.

    Read without changing it: ckptbridge may run inside a host application, and
    setting the umask even for an instant races with its threads (a file they
    create in that instant gets the wrong mode).  Linux reports the umask in
    ``/proc/self/status`` (since 4.7).  Elsewhere the fallback is the only portable
    way, ``os.umask``'s set-and-restore, which has that race; it sets 0o077 for the
    instant, never 0, so a file created meanwhile is too private rather than
    world-writable.
    """
    mask = _umask_from_proc()
    if mask is None:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _umask_from_proc() -> int | None:
    """The ``Umask:`` line of /proc/self/status, or None where there is none."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename into it) durable; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
