"""A minimal zip writer for ``.npz``: members written in place, their bytes possibly
copied by the kernel.

``zipfile`` can only take a member's bytes through ``write``, which computes the
zip's CRC-32 with ``zlib.crc32`` (about 2 GB/s here, the largest single cost of
an export) and forces a trip through user space.  This writer takes the bytes
from :func:`_chunks.write_stream` (a kernel copy where the source is a file),
computes the CRC-32 with ISA-L where ``isal`` is installed (about twice zlib's speed: benchmarks/micro.py) and
otherwise with zlib, then patches the local header.  Every member is written as
zip64 (like ``zipfile``'s ``force_zip64``) so its size need not be known up
front; the archive is the format ``zipfile``, ``numpy.load`` and ``unzip`` read.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

from ..io.chunks import write_stream

try:  # ISA-L's CRC-32: same polynomial and results as zlib's, several times faster
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal has wheels for x86-64 and arm64 only
    _crc32 = zlib.crc32

crc32: Callable[..., int] = _crc32

_LOCAL = struct.Struct("<IHHHHHIIIHH")           # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")    # 46 bytes
_ZIP64_LOCAL = struct.Struct("<HHQQ")             # 20 bytes: sizes
_ZIP64_CENTRAL = struct.Struct("<HHQQQ")          # 28 bytes: sizes and header offset
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")         # 56 bytes
_ZIP64_LOCATOR = struct.Struct("<IIQI")           # 20 bytes
_END = struct.Struct("<IHHHHIIH")                 # 22 bytes
_VERSION = 45                                     # zip64
_UTF8 = 0x800
_STORED, _DEFLATED = 0, 8
_FF32 = 0xFFFFFFFF


def _dos_time(t: float) -> tuple[int, int]:
    lt = time.localtime(t)
    year = max(lt.tm_year, 1980)
    return (lt.tm_hour << 11) | (lt.tm_min << 5) | (lt.tm_sec // 2), ((year - 1980) << 9) | (lt.tm_mon << 5) | lt.tm_mday


class ZipWriter:
    """Writes members one after another to the open file descriptor ``fd`` (from offset 0)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self._central: list[bytes] = []
        self._names: set[str] = set()
        self._time, self._date = _dos_time(time.time())
        self._open: Member | None = None

    def _write(self, data: bytes | memoryview, at: int | None = None) -> None:
        at = self.pos if at is None else at
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], at + done)
        if at == self.pos:
            self.pos += len(view)

    def member(self, name: str, *, compress: bool = False) -> Member:
        """Start member ``name``; write its bytes through the returned object, then close it."""
        if self._open is not None:
            raise RuntimeError("a zip member is still open")
        if name in self._names:
            raise ValueError(f"duplicate zip member {name!r}")
        self._names.add(name)
        self._open = Member(self, name, compress)
        return self._open

    def _closed(self, m: Member) -> None:
        method = _DEFLATED if m.compress else _STORED
        flags = _UTF8 if not m.raw_name.isascii() else 0
        # The local header now gets its CRC and sizes (in its zip64 field).
        self._write(struct.pack("<I", m.crc), at=m.header_at + 14)
        self._write(_ZIP64_LOCAL.pack(1, 16, m.size, m.compressed), at=m.header_at + _LOCAL.size + len(m.name_bytes))
        self._central.append(
            _CENTRAL.pack(0x02014B50, (3 << 8) | _VERSION, _VERSION, flags, method, self._time, self._date, m.crc, _FF32, _FF32,
                          len(m.name_bytes), _ZIP64_CENTRAL.size, 0, 0, 0, (0o100644 << 16), _FF32)
            + m.name_bytes + _ZIP64_CENTRAL.pack(1, 24, m.size, m.compressed, m.header_at)
        )
        self._open = None

    def close(self) -> None:
        """Write the central directory and the (zip64) end records."""
        if self._open is not None:
            raise RuntimeError("a zip member is still open")
        start = self.pos
        self._write(b"".join(self._central))
        size = self.pos - start
        n = len(self._central)
        end64 = self.pos
        self._write(_ZIP64_END.pack(0x06064B50, 44, (3 << 8) | _VERSION, _VERSION, 0, 0, n, n, size, start))
        self._write(_ZIP64_LOCATOR.pack(0x07064B50, 0, end64, 1))
        self._write(_END.pack(0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(size, _FF32), min(start, _FF32), 0))


class Member:
    """One member being written: :meth:`write` bytes, or :meth:`write_stream` a tensor's blocks."""

    def __init__(self, z: ZipWriter, name: str, compress: bool) -> None:
        self.z, self.raw_name, self.compress = z, name, compress
        self.name_bytes = name.encode("utf-8")
        self.header_at = z.pos
        self.crc = 0
        self.size = 0
        self.compressed = 0
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15) if compress else None
        flags = _UTF8 if not name.isascii() else 0
        z._write(_LOCAL.pack(0x04034B50, _VERSION, flags, _DEFLATED if compress else _STORED, z._time, z._date, 0, _FF32, _FF32,
                             len(self.name_bytes), _ZIP64_LOCAL.size) + self.name_bytes + _ZIP64_LOCAL.pack(1, 16, 0, 0))

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = crc32(view, self.crc)
        self.size += len(view)
        out = self._deflate.compress(view) if self._deflate is not None else view
        self.compressed += len(out)
        self.z._write(out)
        return len(view)

    def write_stream(self, stream: Any) -> None:
        """A tensor's blocks (a ``_chunks.BlockStream``): copied by the kernel where it can."""
        if self._deflate is not None:
            for _, arr in stream:
                self.write(arr.reshape(-1).view("u1"))
            return

        def each(view: memoryview) -> None:
            self.crc = crc32(view, self.crc)

        n = write_stream(stream, self.z.fd, self.z.pos, each)
        self.size += n
        self.compressed += n
        self.z.pos += n

    def close(self) -> None:
        if self._deflate is not None:
            tail = self._deflate.flush()
            self.compressed += len(tail)
            self.z._write(tail)
        self.z._closed(self)

    def __enter__(self) -> Member:
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            self.close()
