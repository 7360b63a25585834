"""Streaming one tensor in C-order blocks, so no whole tensor is ever in memory.

A source that can stream returns a :class:`BlockStream` from ``read_blocks``:
consecutive blocks of the tensor's values, each a hyperslab of the form
``(i0, ..., ik-1, a:b, :, ..., :)`` (contiguous in C order).  Byte-oriented
formats (the bundle's data files, ``.npz`` members) use the blocks' byte
ranges; HDF5 uses their selections.  The stream computes the crc32c of
everything it yields exactly once: the source compares it with its stored
checksum at the end, the sink records it, and the pipe compares it with the
read-back.  Blocks live in one reusable buffer: a block is valid only until
the next one is requested, so consumers write it out before asking for more.

Where a stream's bytes are also one byte range of an open file (its
``span``: a mapped bundle shard, a stored ``.npz`` member, a contiguous HDF5
dataset), :func:`write_stream` has the kernel copy them (``copy_file_range``)
instead of writing the mapped views: on the benchmark VM that is 2-2.5x faster
than ``pwrite`` of the same views.  The views are still read once, for the
crc32c that checks them.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
from collections.abc import Callable, Iterator

import numpy as np

from ..spec import TensorSpec
from . import checksum
from .threads import Job

#: Default block size: large enough that per-call overhead vanishes, small enough for any RSS budget.
CHUNK_BYTES = 16 << 20

#: a hyperslab: fixed indices followed by one slice (empty for 0-d tensors)
Selection = tuple[int | slice, ...]


def c_blocks(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> Iterator[tuple[int, int, Selection]]:
    """(first flat element, element count, selection) of consecutive C-order blocks.

    Each block holds at most ``max_bytes`` (but at least one element) and is a
    hyperslab: whole sub-arrays below one axis ``k``, a run ``a:b`` along ``k``,
    and fixed indices above it.  A 0-d tensor is one block with selection ``()``.
    """
    if not shape:
        yield 0, 1, ()
        return
    if math.prod(shape) == 0:
        return
    max_elems = max(1, max_bytes // max(itemsize, 1))
    inner = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    k = next(k for k in range(len(shape)) if inner[k] <= max_elems)
    step = max(1, max_elems // inner[k])
    for prefix in np.ndindex(*shape[:k]):
        base = sum(int(p) * inner[j] for j, p in enumerate(prefix))
        for a in range(0, shape[k], step):
            b = min(a + step, shape[k])
            yield base + a * inner[k], (b - a) * inner[k], tuple(int(p) for p in prefix) + (slice(a, b),)


def block_shape(shape: tuple[int, ...], sel: Selection) -> tuple[int, ...]:
    """The shape of the hyperslab ``sel`` of an array of ``shape`` (fixed indices dropped)."""
    if not sel:
        return ()
    s = sel[-1]
    if not isinstance(s, slice):
        raise TypeError(f"a selection ends with a slice, not {s!r}")
    return (s.stop - s.start,) + tuple(shape[len(sel):])


#: The piece of a block every check of it reads before the next piece (fits a core's L2 cache): the
#: stream's crc32c and a consumer's own checksum (the zip CRC-32) read each block from memory once.
SLICE_BYTES = 256 << 10


class BlockStream:
    """One tensor's values as consecutive C-order blocks, with the crc32c of all yielded bytes.

    ``blocks`` yields ``(selection, array)`` with C-contiguous arrays in the
    exchange dtype; ``check`` (if given) is called with the final crc32c and
    raises if it does not match what the source stored.  :attr:`crc` is set
    once the stream has been consumed to the end.

    ``stored`` is the crc32c the source stores for exactly the bytes of ``span`` (given only where it
    checks them).  With it, a span, and :attr:`checked_later` (set by the pipe when it will read the
    output back and compare it with :attr:`crc`), a consumer may move the bytes without reading them
    from the source (:func:`write_stream`): :attr:`crc` is then ``stored`` and :attr:`unread` is true,
    and the pipe's read-back of the output is the source's check too.
    """

    def __init__(self, spec: TensorSpec, blocks: Iterator[tuple[Selection, np.ndarray]], check: Callable[[int], None] | None = None,
                 span: tuple[int, int] | None = None, stored: int | None = None) -> None:
        self.spec = spec
        self._blocks = blocks
        self._check = check
        self.crc: int | None = None
        #: (file descriptor, offset): the yielded bytes are, in order, the bytes of
        #: that file from that offset on; None when they are not stored that way.
        self.span = span
        self.stored = stored
        self.checked_later = False
        self.unread = False
        #: called with every piece of at most SLICE_BYTES right after the stream's own crc32c of it
        self.also: Callable[[memoryview], object] | None = None

    def __iter__(self) -> Iterator[tuple[Selection, np.ndarray]]:
        c = 0
        also = self.also
        for sel, arr in self._blocks:
            if arr.nbytes:
                view = arr.reshape(-1).view(np.uint8).data
                if also is None:
                    c = checksum.crc32c(view, value=c)
                else:  # both checks over one piece while it is in cache
                    for i in range(0, view.nbytes, SLICE_BYTES):
                        piece = view[i:i + SLICE_BYTES]
                        c = checksum.crc32c(piece, value=c)
                        also(piece)
            yield sel, arr
        if self._check is not None:
            self._check(c)
        self.crc = c

    def movable(self) -> tuple[int, int] | None:
        """The span, where the bytes may be moved unread (see the class docstring); else None."""
        if self.span is None or self.stored is None or not self.checked_later or self.crc is not None or self.spec.nbytes == 0:
            return None
        return self.span

    def moved(self) -> None:
        """The consumer moved the bytes unread: the stream's crc32c is the source's stored one."""
        assert self.stored is not None
        self.crc = self.stored
        self.unread = True

    def drain(self) -> int:
        """Read to the end (checking the stored crc) and return the crc32c."""
        for _ in self:
            pass
        assert self.crc is not None
        return self.crc


def mmap_blocks(buf: mmap.mmap | bytes, offset: int, spec: TensorSpec, dtype: np.dtype,
                chunk_bytes: int) -> Iterator[tuple[Selection, np.ndarray]]:
    """Blocks of a tensor stored as raw C-order bytes at ``offset`` of the read-only map ``buf``
    (or of bytes: a local file's buffer is ``b""`` where the file is empty, as it cannot be mapped).

    Each block is a view of the page cache (no copy at all); once the consumer
    asks for the next block, the previous block's pages are dropped from the
    mapping with ``MADV_DONTNEED``, so the process's RSS never holds more than
    about one block of the file however large the tensor.  (The data stays in
    the page cache; a view touched again simply faults it back in.)  The caller
    has checked that ``offset`` plus the tensor's size lies inside the map.
    """
    total = math.prod(spec.shape)
    if total == 0:
        return
    page = mmap.PAGESIZE
    for start, n, sel in c_blocks(spec.shape, dtype.itemsize, chunk_bytes):
        pos = offset + start * dtype.itemsize
        want = n * dtype.itemsize
        yield sel, np.frombuffer(buf, dtype=np.uint8, count=want, offset=pos).view(dtype)
        lo = pos - pos % page
        hi = min(pos + want, len(buf))
        hi = hi + (-hi % page) if hi == len(buf) else hi - hi % page
        if hi > lo and isinstance(buf, mmap.mmap):
            buf.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(buf) + (-len(buf) % page)) - lo)


# copy_file_range / sendfile errors that mean "not here" (another file system, an old kernel,
# a closed source): the bytes are then written from the mapped views instead.
_NO_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ENOTSUP}
#: the most one kernel copy call moves, so a signal is seen between calls of a multi-GB tensor
_COPY_CALL = 64 << 20


def write_stream(stream: BlockStream, fd: int, pos: int, each: Callable[[memoryview], object] | None = None) -> int:
    """Write all of ``stream``'s bytes to ``fd`` from offset ``pos`` on; return how many.

    ``each`` sees every block's bytes in pieces, each right after the stream's crc32c of it (a
    format's own checksum, from the same read).  Where the stream allows it (:meth:`BlockStream.movable`:
    a span of a file with a stored crc32c and a read-back to come) and ``each`` needs no bytes, the
    kernel copies the whole tensor (``copy_file_range``, else ``sendfile``) and nothing here reads it:
    the read-back of the output is its one read.  Otherwise, with a ``span`` the kernel copies each
    block from the source file on a helper thread while this one checksums the next block (both
    release the GIL); where the kernel cannot copy, the mapped view is written instead.  Without a
    span each block's view is written here.  The stream's crc32c (and so its source's check)
    covers the views read here; the caller's read-back of the output covers what the kernel copied.
    """
    # A consumer's own checksum needs the bytes (and the zip's CRC-32 must be in place before the
    # read-back, which reads the finished file): then the source is read, once for both checks.
    span = stream.movable() if each is None else None
    if span is not None:
        n = stream.spec.nbytes
        if kernel_copy(span[0], span[1], fd, pos, n) == n:
            stream.moved()
            return n
        # Not copied whole (no kernel copy here, or the source ended early): the usual way, from the start.
    span = stream.span
    stream.also = each
    done = 0
    pending: Job | None = None
    try:
        for _, arr in stream:
            view = arr.reshape(-1).view(np.uint8).data
            n = view.nbytes
            if span is None:
                _pwrite_all(fd, view, pos + done)
            else:
                if pending is not None:
                    pending.wait()
                # A span's views stay valid (they map the file), so the job may write one.
                pending = Job(_copy_or_write, span[0], span[1] + done, fd, pos + done, view, name="ckptbridge-copy")
            done += n
    except BaseException:
        if pending is not None:  # let the copy in flight finish; the error that stopped us is the one to report
            try:
                pending.wait()
            except BaseException:  # noqa: BLE001
                pass
        raise
    finally:
        stream.also = None
    if pending is not None:
        pending.wait()
    return done


def kernel_copy(src: int, src_pos: int, dst: int, dst_pos: int, n: int) -> int:
    """Have the kernel copy ``n`` bytes of file ``src`` from ``src_pos`` to ``dst`` at ``dst_pos``
    (``copy_file_range``; ``sendfile`` where that is not supported, across file systems on some
    kernels).  Returns how many were copied: fewer where neither call works here or ``src`` ends early."""
    k = 0
    if hasattr(os, "copy_file_range"):
        try:
            while k < n:
                got = os.copy_file_range(src, dst, min(n - k, _COPY_CALL), src_pos + k, dst_pos + k)
                if got <= 0:
                    return k  # the source ended early
                k += got
            return k
        except OSError as e:
            if e.errno not in _NO_COPY:
                raise
    if k < n and hasattr(os, "sendfile"):
        # sendfile writes at dst's file position: set it, and put it back for whoever else uses dst.
        try:
            here = os.lseek(dst, 0, os.SEEK_CUR)
            os.lseek(dst, dst_pos + k, os.SEEK_SET)
            try:
                while k < n:
                    got = os.sendfile(dst, src, src_pos + k, min(n - k, _COPY_CALL))
                    if got <= 0:
                        break
                    k += got
            finally:
                os.lseek(dst, here, os.SEEK_SET)
        except OSError as e:
            if e.errno not in _NO_COPY:
                raise
    return k


def _copy_or_write(src: int, src_pos: int, dst: int, dst_pos: int, view: memoryview) -> None:
    k = kernel_copy(src, src_pos, dst, dst_pos, view.nbytes)
    _pwrite_all(dst, view[k:], dst_pos + k)  # the rest from the view, which has the bytes


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    k = 0
    while k < view.nbytes:
        k += os.pwrite(fd, view[k:], pos + k)
