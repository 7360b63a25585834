"""Write TensorFlow V2 checkpoints (tensor bundles) without TensorFlow.

Each tensor's bytes are streamed straight into the current data shard while
their crc32c is computed; only the small index entries stay in memory until
:meth:`BundleWriter.commit` writes the ``.index`` in sorted key order.  Like
TensorFlow's own writer, tensors are packed back to back with no alignment
padding (TensorFlow's ``data_alignment`` option defaults to 1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import numpy as np

from .. import _dtypes
from .._source import OBJECT_GRAPH, OBJECT_GRAPH_KEY, Encoded, Sink, Source
from ..errors import CkptBridgeError, FormatError, MismatchError
from ..io.chunks import BlockStream, write_stream
from ..io.ckptfiles import data_path, index_path
from ..io.wire import crc, mask, put_varint
from ..spec import STRING
from ._entries import ENUM_BY_DTYPE, encode_entry, encode_header
from ._table import BLOCK_SIZE, TableBuilder

CHUNK_BYTES = 16 << 20
_PART_SUFFIX = ".ckptbridge-part"



def key_problem(name: object) -> str | None:
    """Why ``name`` cannot be a tensor's key in a checkpoint, or None.

    Any string TensorFlow can store is a key, but an empty one is the bundle's header,
    one starting with a NUL byte reads as a slice of a partitioned tensor (so it would
    vanish on reading), and ``_CHECKPOINTABLE_OBJECT_GRAPH`` is the TF2 object graph's.
    """
    if not isinstance(name, str) or not name:
        return f"tensor names must be non-empty strings, got {name!r}"
    if name.encode("utf-8", "surrogateescape").startswith(b"\x00"):
        return f"tensor name {name!r} starts with a NUL byte, which TensorFlow reserves for the slices of partitioned tensors"
    if name == OBJECT_GRAPH_KEY:
        return f"{OBJECT_GRAPH_KEY} is the key of the TF2 object graph, not a tensor's"
    return None


def check_keys(names: list[str], prefix: str) -> None:
    """Refuse, before anything is written, every name that cannot be a key of checkpoint ``prefix``."""
    bad = [p for p in (key_problem(n) for n in names) if p is not None]
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise FormatError(f"{len(bad)} tensor name(s) cannot be written to checkpoint {prefix}: {'; '.join(bad[:5])}{more}; "
                          "rename them")


class BundleWriter(Sink):
    """A :class:`Sink` writing a V2 checkpoint at exactly ``prefix``.

    The caller owns atomic publication (see ``_atomic.AtomicCheckpoint``):
    :meth:`commit` only finishes the files, :meth:`abort` removes them.
    With ``max_shard_bytes`` a new data shard starts whenever the next tensor
    would push the current one past that size (a tensor never spans shards,
    so a single larger tensor gets a shard of its own).
    """

    engine = "native"
    streams = True

    def __init__(self, prefix: str, *, max_shard_bytes: int | None = None, _block_size: int = BLOCK_SIZE) -> None:
        super().__init__(os.fspath(prefix))
        self.prefix = self.path
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise FormatError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.max_shard_bytes = max_shard_bytes
        self._block_size = _block_size
        self._entries: dict[bytes, bytes] = {}
        self._parts: list[str] = []           # temporary shard files, in shard order
        self._final: list[str] = []           # files placed under their final names
        self._file: BinaryIO | None = None
        self._size = 0
        self._state = "open"
        self._new_shard()

    # --- shards ---------------------------------------------------------------

    def _new_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        part = f"{self.prefix}.data-{len(self._parts):05d}{_PART_SUFFIX}"
        try:
            self._file = open(part, "wb")
        except OSError as e:
            raise CkptBridgeError(f"cannot write {part}: {e.strerror or e}") from None
        self._parts.append(part)
        self._size = 0

    def _make_room(self, nbytes: int) -> None:
        if self.max_shard_bytes is not None and self._size > 0 and self._size + nbytes > self.max_shard_bytes:
            self._new_shard()

    # --- Sink -----------------------------------------------------------------

    def _key(self, name: str) -> bytes:
        if self._state != "open":
            raise CkptBridgeError(f"checkpoint writer for {self.prefix} is already {self._state}")
        problem = key_problem(name)
        if problem is not None:
            raise FormatError(problem)
        key = name.encode("utf-8", "surrogateescape")
        if key in self._entries:
            raise MismatchError(f"tensor {name!r} was written twice to {self.prefix}; names must be unique")
        return key

    def check_name(self, name: str) -> None:
        problem = key_problem(name)
        if problem is not None:
            raise FormatError(problem)

    def put(self, tensor: Encoded) -> None:
        """Store one tensor checked and encoded by :meth:`write`: its bytes go straight to disk,
        and the crc32c :meth:`write` computed is the entry's (numeric bytes are stored as encoded)."""
        key = self._key(tensor.name)
        if tensor.dtype == STRING:
            self._write_strings(key, tensor.name, tensor.array)
            return
        stored = tensor.stored
        if stored.dtype.byteorder == ">" or (stored.dtype.byteorder == "=" and not _LITTLE):
            self._write_numeric(key, tensor.name, tensor.dtype, tensor.shape, _array_chunks(stored.astype(stored.dtype.newbyteorder("<"))))
            return

        def fill(f: BinaryIO, start: int, expected: int) -> tuple[int, int]:
            written = 0
            for piece in _array_chunks(stored):
                f.write(piece)
                written += len(piece)
            return written, tensor.crc

        self._place_numeric(key, tensor.name, tensor.dtype, tensor.shape, fill)

    def write_chunks(self, name: str, dtype: str, shape: tuple[int, ...], chunks: Iterable[Any], *, _claimed: bool = False) -> None:
        """Write one numeric tensor from consecutive pieces of its C-order bytes.

        ``chunks`` yields bytes-like objects or arrays (arrays are taken in C
        order, little-endian).  Their total size must equal the tensor's; if it
        does not, nothing of the tensor is kept and MismatchError is raised.
        """
        if not _claimed:
            self._claim(name)
        key = self._key(name)
        if dtype == STRING or dtype not in ENUM_BY_DTYPE:
            raise FormatError(f"tensor {name!r}: write_chunks takes a numeric dtype, got {dtype!r}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise FormatError(f"tensor {name!r}: invalid shape {list(shape)}")

        def pieces() -> Iterable[memoryview]:
            for chunk in chunks:
                if isinstance(chunk, np.ndarray):
                    if chunk.dtype.byteorder == ">":
                        chunk = chunk.astype(chunk.dtype.newbyteorder("<"))
                    yield from _array_chunks(chunk)
                else:
                    yield memoryview(chunk).cast("B")

        self._write_numeric(key, name, dtype, shape, pieces())

    def put_blocks(self, name: str, stream: BlockStream) -> None:
        """Write one numeric tensor from an ``io.chunks.BlockStream``, block by block.

        The stream's own crc32c is the entry's checksum, so the bytes are checksummed once; where the
        stream is a byte range of a file the kernel copies it (``io.chunks.write_stream``), and where
        the pipe reads the output back the bytes are not read here at all."""
        spec = stream.spec
        if not _LITTLE or spec.dtype == STRING or spec.dtype not in ENUM_BY_DTYPE:
            self.write_chunks(name, spec.dtype, spec.shape, (arr for _, arr in stream), _claimed=True)
            return
        key = self._key(name)

        def fill(f: BinaryIO, start: int, expected: int) -> tuple[int, int]:
            f.flush()
            written = write_stream(stream, f.fileno(), start)
            f.seek(start + written)
            if stream.crc is None:
                raise MismatchError(f"tensor {name!r}: the stream ended early")
            return written, stream.crc

        self._place_numeric(key, name, spec.dtype, spec.shape, fill)

    def _write_numeric(self, key: bytes, name: str, dtype: str, shape: tuple[int, ...], pieces: Iterable[memoryview]) -> None:
        def fill(f: BinaryIO, start: int, expected: int) -> tuple[int, int]:
            c = 0
            written = 0
            for piece in pieces:
                if written + len(piece) > expected:
                    raise MismatchError(f"tensor {name!r}: got more than the {expected} bytes of {dtype}{list(shape)}")
                f.write(piece)
                c = crc(piece, c)
                written += len(piece)
            return written, c

        self._place_numeric(key, name, dtype, shape, fill)

    def _place_numeric(self, key: bytes, name: str, dtype: str, shape: tuple[int, ...],
                       fill: Callable[[BinaryIO, int, int], tuple[int, int]]) -> None:
        """Append one numeric tensor to the current shard: ``fill(file, offset, size)`` writes its
        bytes and returns (bytes written, their crc32c); on any error the shard is cut back."""
        expected = math.prod(shape) * _dtypes.lookup(dtype).itemsize
        self._make_room(expected)
        f = self._file
        assert f is not None
        start = self._size
        try:
            written, c = fill(f, start, expected)
            if written != expected:
                raise MismatchError(f"tensor {name!r}: got {written} bytes, expected {expected} for {dtype}{list(shape)}")
        except BaseException:
            f.seek(start)
            f.truncate()
            raise
        self._size += written
        self._entries[key] = encode_entry(ENUM_BY_DTYPE[dtype], shape, len(self._parts) - 1, start, written, mask(c))

    def _write_strings(self, key: bytes, name: str, arr: np.ndarray) -> None:
        flat = arr.reshape(-1)
        values = []
        for v in flat:
            if isinstance(v, (bytes, np.bytes_)):
                values.append(bytes(v))
            else:
                raise FormatError(f"tensor {name!r}: string tensors hold bytes, found {type(v).__name__}; encode text first")
        lengths = b"".join(put_varint(len(v)) for v in values)
        c = crc(np.array([len(v) for v in values], dtype="<u4").tobytes()) if all(len(v) <= 0xFFFFFFFF for v in values) \
            else _crc_lengths_wide(values)
        length_crc = mask(c).to_bytes(4, "little")
        c = crc(length_crc, c)
        size = len(lengths) + 4 + sum(len(v) for v in values)
        self._make_room(size)
        f = self._file
        assert f is not None
        start = self._size
        f.write(lengths)
        f.write(length_crc)
        for v in values:
            f.write(v)
            c = crc(v, c)
        self._size += size
        self._entries[key] = encode_entry(ENUM_BY_DTYPE[STRING], arr.shape, len(self._parts) - 1, start, size, mask(c))

    def write_extra(self, key: str, payload: bytes) -> None:
        """Store the TF2 object graph (``"object_graph"``) so tf.train.Checkpoint can restore; other keys are dropped."""
        if key not in (OBJECT_GRAPH, OBJECT_GRAPH_KEY):
            return
        k = OBJECT_GRAPH_KEY.encode()
        if k in self._entries:
            raise MismatchError(f"the object graph was written twice to {self.prefix}")
        if self._state != "open":
            raise CkptBridgeError(f"checkpoint writer for {self.prefix} is already {self._state}")
        arr = np.empty((), dtype=object)
        arr[()] = bytes(payload)
        self._write_strings(k, OBJECT_GRAPH_KEY, arr)

    @property
    def readback_path(self) -> str:
        return self.prefix

    def open_readback(self) -> Source:
        from .reader import BundleReader

        return BundleReader(self.prefix, verify=True)

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        """Close the shards, give them their final names and write the ``.index`` last
        (:meth:`commit` is the same: the caller owns publication).

        ``metadata`` is not stored: the bundle format has no place for it that
        TensorFlow would ignore.
        """
        if self._state == "committed":
            return
        if self._state != "open":
            raise CkptBridgeError(f"checkpoint writer for {self.prefix} was aborted")
        try:
            assert self._file is not None
            self._file.close()
            self._file = None
            n = len(self._parts)
            for i, part in enumerate(self._parts):
                final = data_path(self.prefix, i, n)
                os.replace(part, final)
                self._final.append(final)
            table = TableBuilder(block_size=self._block_size)
            table.add(b"", encode_header(n))
            for key in sorted(self._entries):
                table.add(key, self._entries[key])
            tmp = index_path(self.prefix) + _PART_SUFFIX
            with open(tmp, "wb") as f:
                f.write(table.finish())
            self._final.append(tmp)
            os.replace(tmp, index_path(self.prefix))
            self._final[-1] = index_path(self.prefix)
        except OSError as e:
            self.abort()
            raise CkptBridgeError(f"cannot write checkpoint {self.prefix}: {e.strerror or e}") from None
        self._entries.clear()
        self._state = "committed"

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in self._parts + self._final:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                pass


_LITTLE = np.little_endian


def _crc_lengths_wide(values: list[bytes]) -> int:
    c = 0
    for v in values:
        n = len(v)
        c = crc(n.to_bytes(4 if n <= 0xFFFFFFFF else 8, "little"), c)
    return c


def _array_chunks(arr: np.ndarray) -> Iterable[memoryview]:
    """The array's C-order bytes in pieces of about CHUNK_BYTES, copying at most one piece at a time."""
    if arr.size == 0:
        return
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.flags.c_contiguous:
        raw = arr.reshape(-1).view(np.uint8).data  # the same view as memoryview(arr), typed as one
        for i in range(0, len(raw), CHUNK_BYTES):
            yield raw[i:i + CHUNK_BYTES]
        return
    # Non-contiguous: walk the leading axis in row blocks and copy each block.
    row_bytes = max(1, arr[0].nbytes)
    step = max(1, CHUNK_BYTES // row_bytes)
    for i in range(0, arr.shape[0], step):
        block = np.ascontiguousarray(arr[i:i + step])
        yield from _array_chunks(block)
