"""Writing through a C library that cannot survive a failed write (HDF5).

:class:`GuardedFile` keeps a failed write from reaching HDF5 and
:func:`checks_writes` raises it once the sink's method returns.  The HDF5 sink
is the one user; the atomic output it writes through (:class:`AtomicFile`) only
knows the file as one it commits or closes.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, Protocol, TypeVar

from ..io.atomic import AtomicFile
from ..io.signals import raise_signals_after, signalled

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class _WritesThrough(Protocol):
    """A sink that writes through an :class:`AtomicFile` held as ``_out``."""

    @property
    def _out(self) -> AtomicFile: ...


_S = TypeVar("_S", bound=_WritesThrough)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def checks_writes(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Decorate a sink method so a write failure recorded by its ``self._out`` (an AtomicFile), or a signal, is raised when it returns.

    The recorded failure (no space, file too large, an interrupt) replaces
    whatever error the writing library raised afterwards, since that one is
    only a consequence.
    """

    @functools.wraps(method)
    def run(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            # A KeyboardInterrupt raised in the middle of h5py's calls into HDF5 leaves
            # HDF5 half-way through an operation (and the process segfaults at exit):
            # signals are raised once the method is done.
            with raise_signals_after():
                return method(self, *args, **kwargs)
        finally:
            self._out.check_writes()

    return run


def open_guarded(out: AtomicFile) -> GuardedFile:
    """``out``'s temporary file as a :class:`GuardedFile`, attached to ``out`` so that its
    commit raises the first failed write and its abort closes the file."""
    f = GuardedFile(out.tmp)
    out.attach(f)
    return f


class GuardedFile(io.FileIO):
    """A read/write file that never lets a failed write reach the library writing through it.

    HDF5 (through h5py) cannot recover from a failed write: closing the file
    afterwards crashes the process (h5py issue #914).  Handed to ``h5py.File``
    as a file object, this records the first failure (ENOSPC, EFBIG, EIO, or a
    signal's exception raised inside the write) and from then on pretends every
    write, truncate and flush succeeds, so HDF5 closes cleanly.  The caller
    then calls :meth:`check`, which raises the recorded failure; the file's
    contents are garbage by then and must be discarded.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, "r+")
        self.error: BaseException | None = None

    def write(self, b: ReadableBuffer, /) -> int:
        n = memoryview(b).nbytes
        if self.error is None and signalled() is not None:
            self.error = signalled()
        if self.error is None:
            try:
                done = 0
                while done < n:
                    # FileIO.write may write fewer bytes; HDF5's file-object driver does not retry.
                    w = super().write(memoryview(b).cast("B")[done:])
                    done += w or 0
                    if not w:
                        raise OSError(5, "short write")
            except BaseException as e:  # noqa: BLE001 - re-raised by check()
                self.error = e
        return n

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except BaseException as e:  # noqa: BLE001
                self.error = e
        return size if size is not None else 0

    def flush(self) -> None:
        if self.error is None and not self.closed:
            try:
                super().flush()
            except BaseException as e:  # noqa: BLE001
                self.error = e

    def check(self) -> None:
        """Raise the first write failure, if there was one."""
        e = self.error
        if e is not None:
            if isinstance(e, OSError) and e.filename is None:
                e.filename = self.name
            raise e
