"""Where the bytes are: files read by byte ranges, and the places that hold them.

The checkpoint readers read through :class:`RangedFile` (``pread(offset, n)``
and ``size``) and find a checkpoint's files through :class:`Place`, so a local
file, a member of a tar or zip archive and a remote object are all the same to
them.  Memory mapping stays the fast path for local files: :meth:`RangedFile.buffer`
hands out the whole file zero-copy where that is cheap, and readers fall back to
ranged reads where it is not.

Relative paths inside a place always use ``/``.  This module is pure Python and
imports nothing heavy: remote places (fsspec) and archive places live above it.
"""

from __future__ import annotations

import abc
import mmap
import os
import stat
from collections.abc import Generator, Iterable
from types import TracebackType
from typing import Any

from .. import errors

__all__ = ["RangedFile", "Place", "LocalFile", "LocalPlace", "SliceableFile", "read_exact", "where"]


class RangedFile(abc.ABC):
    """A read-only file read by ranges: a local file, a tar/zip member, a remote object."""

    #: What messages show; never holds credentials (URLs without userinfo or query).
    name: str
    #: Size in bytes.
    size: int

    @abc.abstractmethod
    def pread(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``.

        Fewer bytes exist only past the end of the file, and then this raises
        :class:`errors.FormatError` saying the file is truncated.
        """

    def buffer(self) -> mmap.mmap | bytes | None:
        """A zero-copy buffer of the whole file where that is cheap (local files: mmap); else None."""
        return None

    def block_hint(self) -> int | None:
        """The size of the pieces :meth:`stream` reads best (a remote file's requests), or None: any size."""
        return None

    def stream(self, ranges: Iterable[tuple[int, int]]) -> Generator[bytes, None, None]:
        """The bytes of each ``(offset, n)`` of ``ranges`` in order, each as :meth:`pread` reads it.

        A file that can fetch ahead (a remote object) keeps the next ranges in flight while
        the caller uses the last one; here each range is read when its turn comes.
        """
        for offset, n in ranges:
            yield self.pread(offset, n)

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the file holds; safe to call twice."""

    def __enter__(self) -> RangedFile:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} size={self.size}>"


class Place(abc.ABC):
    """Where a checkpoint's files are: a local directory, a tar/zip of checkpoints, a remote prefix."""

    #: For messages, credential-free.
    name: str

    @abc.abstractmethod
    def open(self, relpath: str) -> RangedFile:
        """The file at ``relpath``; :class:`errors.NotFoundError` if it is missing."""

    @abc.abstractmethod
    def exists(self, relpath: str) -> bool:
        """Whether a file exists at ``relpath``."""

    @abc.abstractmethod
    def listdir(self, reldir: str = "") -> list[str] | None:
        """File names in ``reldir`` (not paths); None where the place cannot list (plain https)."""

    def local_dir(self) -> str | None:
        """A real local directory holding the files (TensorFlow's engine can read it in place), or None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the place holds; safe to call twice."""

    def __enter__(self) -> Place:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def read_exact(f: RangedFile, offset: int, n: int) -> bytes:
    """``f.pread(offset, n)`` checked against ``f.size`` first, for implementations to share.

    Raises :class:`errors.FormatError` ("truncated") when the range runs past
    the end, and ``ValueError`` for a negative offset or length.
    """
    if offset < 0 or n < 0:
        raise ValueError(f"bad range ({offset}, {n}) of {f.name}")
    if offset + n > f.size:
        raise errors.FormatError(f"{f.name} is truncated: needed bytes {offset}..{offset + n} of a {f.size}-byte file")
    return f.pread(offset, n)


def where(place: Place, relpath: str) -> str:
    """How messages name the file ``relpath`` of ``place`` (a local path for local places)."""
    if isinstance(place, LocalPlace):
        return os.path.join(place.name, *relpath.split("/")) if relpath else place.name
    return f"{place.name.rstrip('/')}/{relpath}" if relpath else place.name


class SliceableFile:
    """A :class:`RangedFile` seen as a read-only byte sequence: ``len()``, ``[i]`` and ``[a:b]``
    (step 1) read by range, so code written for bytes or a memoryview reads it unchanged."""

    def __init__(self, f: RangedFile) -> None:
        self.file = f

    def __len__(self) -> int:
        return self.file.size

    def __getitem__(self, key: int | slice) -> Any:
        size = self.file.size
        if isinstance(key, slice):
            start, stop, step = key.indices(size)
            if step != 1:
                raise ValueError("SliceableFile slices take no step")
            return self.file.pread(start, max(0, stop - start))
        i = key + size if key < 0 else key
        if not 0 <= i < size:
            raise IndexError(f"byte {key} is outside {self.file.name} ({size} bytes)")
        return self.file.pread(i, 1)[0]


class LocalFile(RangedFile):
    """A local file: ``os.pread`` for ranges, a shared read-only mmap as :meth:`buffer`."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = os.fspath(path)
        self.name = name if name is not None else self.path
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below (no effect on regular files).
            self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise errors.NotFoundError(f"{self.name} does not exist") from None
        except IsADirectoryError:
            raise errors.FormatError(f"{self.name} is a directory, not a file") from None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            self._fd = None
            raise errors.FormatError(f"{self.name} is not a regular file")
        self.size = st.st_size
        self._map: mmap.mmap | bytes | None = None

    def fileno(self) -> int:
        """The open file descriptor (for ``copy_file_range`` fast paths)."""
        if self._fd is None:
            raise ValueError(f"{self.name} is closed")
        return self._fd

    def pread(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise ValueError(f"bad range ({offset}, {n}) of {self.name}")
        fd = self.fileno()
        parts: list[bytes] = []
        got = 0
        while got < n:
            b = os.pread(fd, n - got, offset + got)
            if not b:
                raise errors.FormatError(f"{self.name} is truncated: needed bytes {offset}..{offset + n}, the file ends at {offset + got}")
            parts.append(b)
            got += len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def buffer(self) -> mmap.mmap | bytes:
        if self._map is None:
            # An empty file cannot be mapped; b"" is the same thing for readers.
            self._map = mmap.mmap(self.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        return self._map

    def close(self) -> None:
        # Views handed out keep the mmap alive (NumPy holds a reference); we only drop ours.
        self._map = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _check_relpath(relpath: str, where: str) -> str:
    """``relpath`` if it is a plain relative "/" path that stays inside its place."""
    parts = relpath.split("/")
    # A backslash is an ordinary character of a POSIX file name (TensorFlow writes prefixes with
    # them) and of an object key; only where the OS takes it as a separator could it leave the place.
    # Archive members are checked more strictly, where they are listed (_containers).
    native_seps = [sep for sep in (os.sep, os.altsep) if sep and sep != "/"]
    if relpath.startswith("/") or any(sep in relpath for sep in native_seps) or ".." in parts:
        raise errors.FormatError(f"{relpath!r} is not a relative path inside {where}")
    return "/".join(p for p in parts if p not in ("", "."))


class LocalPlace(Place):
    """A local directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.name = self.directory

    def _path(self, relpath: str) -> str:
        rel = _check_relpath(relpath, self.name)
        return os.path.join(self.directory, *rel.split("/")) if rel else self.directory

    def open(self, relpath: str) -> LocalFile:
        path = self._path(relpath)
        return LocalFile(path)

    def exists(self, relpath: str) -> bool:
        return os.path.isfile(self._path(relpath))

    def listdir(self, reldir: str = "") -> list[str]:
        path = self._path(reldir)
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_file())
        except FileNotFoundError:
            raise errors.NotFoundError(f"{path} does not exist") from None
        except NotADirectoryError:
            raise errors.NotFoundError(f"{path} is not a directory") from None

    def local_dir(self) -> str:
        return self.directory
