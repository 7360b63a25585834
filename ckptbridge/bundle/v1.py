"""Read TensorFlow V1 checkpoints (``TensorSliceWriter``'s format) without TensorFlow.

A V1 checkpoint is one file (``vgg_16.ckpt``), or the shards
``PREFIX-SSSSS-of-NNNNN`` of one (found by :mod:`.v1_shards`), each a table in
the same SSTable layout as a V2 ``.index`` (``_table``).  Every value is a
serialized ``SavedTensorSlices`` (tensorflow/core/util/saved_tensor_slice.proto):

- key ``""`` (the first entry): field 1 ``meta``, a ``SavedTensorSliceMeta``:
  repeated 1 ``tensor`` (``SavedSliceMeta``: 1 name, 2 shape, 3 dtype,
  repeated 4 slice) and 2 ``versions`` (a ``VersionDef``);
- one entry per (tensor, slice), keyed by TensorFlow's ``EncodeTensorNameSlice``
  (``_entries.slice_key``: OrderedCode of 0, the name, the rank, then each
  dimension's start and length, -1 for a full extent): field 2 ``data``, a
  ``SavedSlice``: 1 name, 2 slice, 3 ``TensorProto`` holding the slice's values.

TensorFlow's writer fills the TensorProto's typed ``*_val`` field for the dtype
(``float_val``, ``int_val`` for int8/16/32, uint8/16 and the quantized types,
``half_val`` for float16, ``bool_val``, ``string_val``, ``scomplex_val`` ...);
``tensor_content`` is read too.  The values of the slices a file's metadata lists
must tile each tensor exactly; a tensor is assembled from them when it is read.

Opening reads each file's table index and metadata only; a tensor's table block
is read, its crc32c checked, when the tensor is read.  Every allocation follows
what the file backs: a slice's values must decode to exactly the number of
elements the slice covers before the tensor's array is allocated.

Streaming (:meth:`V1Reader.read_blocks`).  TensorFlow's table writer gives an entry
larger than its 256 KiB block size a block of its own (vgg_16's fc6: one 411 MB
block), so reading such a tensor the way :meth:`V1Reader.read` does (map or read
the whole block, check its crc32c, then decode) holds the whole block in memory.
A tensor in one slice whose values are one raw little-endian run (``tensor_content``,
or a packed fixed-width field: ``float_val``, ``double_val``, ``scomplex_val``,
``dcomplex_val``) is streamed instead: the block entry, then the SavedTensorSlices,
SavedSlice and TensorProto field headers are parsed from small reads
(:func:`ckptbridge.io.wire.fields_at`) to find the values' byte range in the
file, and the block is then read once in file order,
its crc32c computed over the bytes before the values, each block of values as it
is yielded, and the bytes after; a mismatch raises at the end of the stream (the
sinks are atomic: nothing is published).  Snappy-compressed blocks cannot be read
in part: they take the whole-block path.
"""

from __future__ import annotations

import bisect
import math
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from .. import _dtypes
from .._dtypes import uncarried_error
from .._source import OBJECT_GRAPH, OBJECT_GRAPH_KEY, Source
from ..errors import CkptBridgeError, CorruptError, FormatError, NotFoundError
from ..io.chunks import CHUNK_BYTES, BlockStream, c_blocks
from ..io.ranged import LocalFile, LocalPlace, Place, RangedFile, SliceableFile, where
from ..io.wire import Window, _Bad, as_bytes, as_range, as_varint, as_varints, crc, fields_at, iter_fields, mask, to_int32
from ..spec import STRING, TensorSpec, numpy_dtype
from ._entries import _parse_shape, _parse_slice, slice_key
from ._table import FOOTER_SIZE, MAX_KEY_BYTES, NO_COMPRESSION, TRAILER_SIZE, KeysTooLarge, KeyTooLong, Table, _KeyBudget, has_magic, is_table_file
from .reader import MAX_RANK, _overlap
from .v1_shards import v1_files

ENGINE_NAME = "native"
#: TensorFlow's TF_CHECKPOINT_VERSION: what its V1 writer records as the producer, and the newest reader it asks for
CHECKPOINT_VERSION = 1

# TensorProto fields (tensorflow/core/framework/tensor.proto).
_TP_DTYPE = 1
_TP_CONTENT = 4
_FLOAT, _DOUBLE, _INT, _STRING, _SCOMPLEX, _INT64, _BOOL, _DCOMPLEX, _HALF = 5, 6, 7, 8, 9, 10, 11, 12, 13
_UINT32, _UINT64, _FLOAT8 = 16, 17, 18

# dtype -> (the typed field TensorFlow fills, how its values are stored): "f4"/"f8" fixed-width floats
# (complex: two per element), "varint" with the range an element must lie in, "bytes" one byte per element.
_VARINT_FIELDS: dict[str, tuple[int, int, int]] = {
    # name: (field, lowest, highest).  int_val is an int32 field whatever the dtype; half_val holds the 16 bits.
    "int32": (_INT, -(1 << 31), (1 << 31) - 1), "int16": (_INT, -(1 << 15), (1 << 15) - 1), "int8": (_INT, -128, 127),
    "uint8": (_INT, 0, 255), "uint16": (_INT, 0, 65535),
    "qint8": (_INT, -128, 127), "quint8": (_INT, 0, 255), "qint16": (_INT, -(1 << 15), (1 << 15) - 1),
    "quint16": (_INT, 0, 65535), "qint32": (_INT, -(1 << 31), (1 << 31) - 1),
    "int4": (_INT, -8, 7), "uint4": (_INT, 0, 15), "int2": (_INT, -2, 1), "uint2": (_INT, 0, 3),
    "int64": (_INT64, -(1 << 63), (1 << 63) - 1), "uint32": (_UINT32, 0, (1 << 32) - 1), "uint64": (_UINT64, 0, (1 << 64) - 1),
    "float16": (_HALF, 0, 65535), "bfloat16": (_HALF, 0, 65535), "bool": (_BOOL, 0, (1 << 64) - 1),
}
_FIXED_FIELDS: dict[str, tuple[int, str, int]] = {
    # name: (field, little-endian element type, values per element)
    "float32": (_FLOAT, "<f4", 1), "float64": (_DOUBLE, "<f8", 1), "complex64": (_SCOMPLEX, "<f4", 2), "complex128": (_DCOMPLEX, "<f8", 2),
}
_BYTE_FIELDS = {"float8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2fnuz"}
#: The TensorProto fields that hold values.
_VALUE_FIELDS = (_TP_CONTENT, _FLOAT, _DOUBLE, _INT, _STRING, _SCOMPLEX, _INT64, _BOOL, _DCOMPLEX, _HALF, _UINT32, _UINT64, _FLOAT8)

Slice = tuple[tuple[int, ...], tuple[int, ...]]


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def is_v1(path: str) -> bool:
    """Whether ``path`` is a file that ends with the table magic number (cheap; reads 8 bytes)."""
    return is_table_file(path)


class _Tensor:
    """What the files' metadata say of one tensor."""

    def __init__(self, name: str, raw: bytes, dtype: int, shape: tuple[int, ...]) -> None:
        self.name = name
        self.raw = raw
        self.dtype = dtype
        self.shape = shape
        # (file index, the slice as stored (lengths -1 for full extents), its starts, its lengths)
        self.slices: list[tuple[int, Slice, tuple[int, ...], tuple[int, ...]]] = []


class V1Reader(Source):
    """A lazy :class:`Source` over the V1 checkpoint at ``prefix`` (one file, or a sharded one's prefix).

    ``verify`` checks the crc32c of each table block a tensor is read from, as
    TensorFlow does (the index and metadata blocks are always checked).
    Tensors come back as fresh arrays, except float32, float64 and complex tensors
    stored in one slice, which are read-only views of the memory-mapped file (as
    :class:`~ckptbridge.bundle.reader.BundleReader` gives).  With ``place``,
    ``prefix`` is the checkpoint's name inside it and the reader owns the place;
    files that are not local are read by range, a tensor's table block when it is read.
    :meth:`read_blocks` streams a tensor without holding its whole block (see the
    module docstring).
    """

    kind = "checkpoint"
    engine = ENGINE_NAME

    def __init__(self, prefix: str, *, verify: bool = True, place: Place | None = None) -> None:
        prefix = os.fspath(prefix)
        self.verify = verify
        self._closed = False
        self._maps: list[Any] = []
        self._opened: list[RangedFile] = []
        self._tables: list[Table] = []
        try:
            if place is None:
                self.path = self.prefix = prefix
                self.files = v1_files(self.prefix)
                directory = os.path.dirname(prefix) or "."
                self._place: Place = LocalPlace(directory)
                rels = [os.path.relpath(p, directory).replace(os.sep, "/") for p in self.files]
            else:
                self._place = place
                self.path = self.prefix = where(place, prefix)
                rels = v1_files(prefix, place)
                self.files = [where(place, r) for r in rels]
            for rel, path in zip(rels, self.files):
                self._open(rel, path)
            self._tensors: dict[str, _Tensor] = {}
            self._producer = CHECKPOINT_VERSION
            for i, table in enumerate(self._tables):
                self._read_meta(i, table)
            self._check_tiling()
        except BaseException:
            self.close()
            raise
        specs: dict[str, TensorSpec] = {}
        uncarried: dict[str, TensorSpec] = {}
        for name, t in sorted(self._tensors.items(), key=lambda kv: kv[1].raw):
            if name == OBJECT_GRAPH_KEY:
                continue
            d = _dtypes.by_enum(t.dtype)
            assert d is not None
            (specs if d.carried else uncarried)[name] = TensorSpec(name, d.name, t.shape)
        self._specs = specs
        self._uncarried = uncarried

    # --- opening ------------------------------------------------------------

    def _corrupt(self, what: str, file: str | None = None, tensor: str | None = None) -> CorruptError:
        about = f" (tensor {tensor!r})" if tensor is not None else ""
        return CorruptError(f"{file or self.prefix}{about}: {what}; the checkpoint is damaged; restore it from a good copy or re-save it")

    def _open(self, rel: str, path: str) -> None:
        if os.path.isdir(path) and self._place.local_dir() is not None:
            raise FormatError(f"{path} is a directory, not a V1 checkpoint file")
        try:
            f = self._place.open(rel)
            self._opened.append(f)
            size = f.size
            if size < FOOTER_SIZE:
                raise self._corrupt(f"it is {size} bytes, shorter than any table (truncated, or not a TensorFlow checkpoint)", path)
            mapped = f.buffer()
            data: Any = memoryview(mapped) if mapped is not None else SliceableFile(f)
            tail = data[size - 8:]
        except OSError as e:
            raise CkptBridgeError(f"cannot read {path}: {e.strerror or e}; check that the file is readable (permissions, disk)") from None
        self._maps.append(mapped)
        if not has_magic(tail):
            raise self._corrupt("it does not end with the table magic number (truncated, or not a TensorFlow checkpoint)", path)
        with self._bad(path):
            self._tables.append(Table(data, verify=self.verify))

    def _bad(self, path: str, tensor: str | None = None) -> _Translate:
        return _Translate(self, path, tensor)

    def _read_meta(self, index: int, table: Table) -> None:
        path = self.files[index]
        with self._bad(path):
            first = self._first(index, table)
            if first is None or first[0] != b"":
                raise self._corrupt("its first entry is not the checkpoint's metadata", path)
            meta = b""
            for number, wire, value in iter_fields(first[1]):
                if number == 1:
                    meta += as_bytes(wire, value)    # repeated occurrences merge
            versions = b""
            tensors: list[bytes] = []
            for number, wire, value in iter_fields(meta):
                if number == 1:
                    tensors.append(bytes(as_bytes(wire, value)))
                elif number == 2:
                    versions += as_bytes(wire, value)
            self._check_versions(versions, path)
            for raw in tensors:
                self._add_tensor(index, raw, path)

    def _check_versions(self, versions: bytes, path: str) -> None:
        producer, min_consumer, bad = 0, 0, []
        for number, wire, value in iter_fields(versions):
            if number == 1:
                producer = to_int32(as_varint(wire, value))
            elif number == 2:
                min_consumer = to_int32(as_varint(wire, value))
            elif number == 3:
                bad += [to_int32(v) for v in as_varints(wire, value)]
        if min_consumer > CHECKPOINT_VERSION or CHECKPOINT_VERSION in bad:
            raise FormatError(f"{path} needs a newer checkpoint reader (min_consumer {min_consumer}); use the TensorFlow engine")
        if producer < 0:
            raise self._corrupt(f"its checkpoint version {producer} is negative", path)
        self._producer = producer

    def _add_tensor(self, index: int, raw: bytes, path: str) -> None:
        name_raw, dtype, shape_raw = b"", 0, b""
        slices: list[Slice] = []
        for number, wire, value in iter_fields(raw):
            if number == 1:
                name_raw = bytes(as_bytes(wire, value))
            elif number == 2:
                shape_raw += as_bytes(wire, value)
            elif number == 3:
                dtype = to_int32(as_varint(wire, value))
            elif number == 4:
                slices.append(_parse_slice(bytes(as_bytes(wire, value))))
        name = _name(name_raw)
        if len(name_raw) > MAX_KEY_BYTES:
            raise FormatError(f"{path} (tensor {name[:64]!r}...): its name is {len(name_raw)} bytes long, more than the "
                              f"{MAX_KEY_BYTES} bytes the native engine reads; use the TensorFlow engine")
        try:
            shape = _parse_shape(shape_raw)
        except _Bad as e:
            raise self._corrupt(str(e), path, name) from None
        if len(shape) > MAX_RANK or any(d < 0 for d in shape) or math.prod(d for d in shape if d) >= 1 << 58:
            raise self._corrupt(f"invalid shape {list(shape)}", path, name)
        if _dtypes.by_enum(dtype) is None:
            raise self._corrupt(f"unknown dtype enum {dtype}", path, name)
        t = self._tensors.get(name)
        if t is None:
            t = self._tensors[name] = _Tensor(name, name_raw, dtype, shape)
        elif t.dtype != dtype or t.shape != shape:
            raise self._corrupt(f"its files disagree on its dtype and shape ({_dtype_name(t.dtype)}{list(t.shape)} vs "
                                f"{_dtype_name(dtype)}{list(shape)})", path, name)
        for starts, lengths in slices:
            if len(starts) != len(shape):
                raise self._corrupt(f"a slice of rank {len(starts)} does not match the rank-{len(shape)} tensor", path, name)
            full_starts = tuple(0 if n < 0 else s for s, n in zip(starts, lengths))
            full_lengths = tuple(d if n < 0 else n for n, d in zip(lengths, shape))
            if any(s < 0 or s > d or n > d - s for s, n, d in zip(full_starts, full_lengths, shape)):
                raise self._corrupt(f"slice {list(zip(full_starts, full_lengths))} lies outside shape {list(shape)}", path, name)
            t.slices.append((index, (starts, lengths), full_starts, full_lengths))

    def _check_tiling(self) -> None:
        for name, t in self._tensors.items():
            total = sum(math.prod(n) for _, _, _, n in t.slices)
            if total != math.prod(t.shape):
                raise self._corrupt(f"its slices hold {total} of its {math.prod(t.shape)} elements: they do not tile it exactly",
                                    tensor=name)
            parts = [(s, n, b"") for _, _, s, n in t.slices]
            overlap = _overlap(parts, t.shape)
            if overlap is None:
                raise FormatError(f"{self.prefix} (tensor {name!r}): its {len(parts)} slices are cut too irregularly for "
                                  "the native engine to check that they do not overlap (TensorFlow's partitioners cut one "
                                  "axis); use the TensorFlow engine for this checkpoint")
            if overlap:
                raise self._corrupt("its slices do not tile it exactly (two of them overlap)", tensor=name)

    # --- Source -------------------------------------------------------------

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def uncarried(self) -> Mapping[str, TensorSpec]:
        return self._uncarried

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"format": "tensorflow-v1-checkpoint", "engine": ENGINE_NAME, "files": len(self.files),
                                "checkpoint_version": self._producer}
        if self._uncarried:
            meta["uncarried"] = {n: s.dtype for n, s in self._uncarried.items()}
        return meta

    def extras(self) -> dict[str, bytes]:
        t = self._tensors.get(OBJECT_GRAPH_KEY)
        if t is None:
            return {}
        if t.dtype != _dtypes.BY_NAME[STRING].tf_enum or t.shape != ():
            raise self._corrupt("the object graph entry is not a scalar string", tensor=OBJECT_GRAPH_KEY)
        return {OBJECT_GRAPH: bytes(self._assemble(t, STRING)[()])}

    def read(self, name: str) -> np.ndarray:
        """The tensor in the exchange form (see the class docstring about views)."""
        if self._closed:
            raise CkptBridgeError(f"checkpoint reader for {self.prefix} is closed")
        if name not in self._specs:
            if name in self._uncarried:
                raise uncarried_error(self.prefix, {name: self._uncarried[name].dtype})
            raise NotFoundError(f"no tensor named {name!r} in {self.prefix}")
        return self._assemble(self._tensors[name], self._specs[name].dtype)

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        """Stream a numeric tensor held in one slice in C-order blocks of at most ``chunk_bytes``,
        so a tensor of any size costs about one block of memory (see the module docstring).

        A table block larger than ``chunk_bytes`` whose entry holds the values as one raw
        little-endian run is streamed from the file (mapped pages are released as the stream
        moves on; a file that is not mapped is read block by block), its crc32c checked at
        the end.  A smaller block of a mapped file is read as :meth:`read` reads it, and its
        pages are released once the stream ends.  None (then :meth:`read` the tensor whole)
        for strings, partitioned and empty tensors, compressed blocks, values stored as
        varints (``int_val``, ``half_val``, ``bool_val`` ...) or in an unusual layout (where
        :meth:`read` says what is wrong), and small blocks of files that are not mapped
        (reading such a block whole costs no more than one block of the stream).
        """
        if self._closed:
            raise CkptBridgeError(f"checkpoint reader for {self.prefix} is closed")
        spec = self._specs.get(name)
        if spec is None or spec.dtype == STRING:
            return None
        t = self._tensors[name]
        if len(t.slices) != 1 or t.slices[0][3] != t.shape or math.prod(t.shape) == 0:
            return None
        index, stored, _, _ = t.slices[0]
        table = self._tables[index]
        key = slice_key(t.raw, *stored)
        i = bisect.bisect_left(table.keys, key)
        if i == len(table.keys):
            return None                                  # read() says the slice's data is missing
        off, size = table.handles[i]
        buf = self._maps[index]
        if size + TRAILER_SIZE <= chunk_bytes:
            if not isinstance(buf, mmap.mmap):
                return None
            return BlockStream(spec, self._small_block(t, spec, buf, off, off + size + TRAILER_SIZE, chunk_bytes))
        with self._bad(self.files[index], name):
            plan = self._locate(index, i, key, t, stored, spec, chunk_bytes)
        if plan is None:
            return None
        f = self._opened[index]
        span = (f.fileno(), plan.start) if isinstance(f, LocalFile) and isinstance(buf, mmap.mmap) else None
        return BlockStream(spec, self._stream(plan, spec, chunk_bytes), span=span)

    def close(self) -> None:
        # Views handed out keep their mmap alive; we only drop our references.
        self._tables.clear()
        self._maps.clear()
        for f in self._opened:
            f.close()
        self._opened.clear()
        self._closed = True
        place = getattr(self, "_place", None)
        if place is not None:
            place.close()

    # --- values -------------------------------------------------------------

    def _assemble(self, t: _Tensor, dtype: str) -> np.ndarray:
        # First every slice's values are found and counted against the elements it covers,
        # then the tensor is allocated: a file cannot make us allocate what it does not hold.
        found = []
        for index, stored, starts, lengths in t.slices:
            path = self.files[index]
            with self._bad(path, t.name):
                values = self._slice_values(index, t, stored)
                found.append((starts, lengths, _Values(values, dtype, math.prod(lengths))))
        if len(found) == 1 and found[0][1] == t.shape:
            with self._bad(self.files[t.slices[0][0]], t.name):
                return found[0][2].decode().reshape(t.shape)
        out = np.empty(t.shape, dtype=numpy_dtype(dtype))
        for (starts, lengths, values), (index, _, _, _) in zip(found, t.slices):
            with self._bad(self.files[index], t.name):
                out[tuple(slice(s, s + n) for s, n in zip(starts, lengths))] = values.decode().reshape(lengths)
        return out

    def _slice_values(self, index: int, t: _Tensor, stored: Slice) -> Any:
        """The TensorProto of one slice, checked to be the slice it says it is."""
        key = slice_key(t.raw, *stored)
        value = self._tables[index].get(key)
        where = list(zip(*stored)) if stored[0] else "[]"
        if value is None:
            raise _Bad(f"the data of its slice {where} is missing from the table")
        data = None
        for number, wire, field in iter_fields(value):
            if number == 2:
                if data is not None:
                    raise _Bad(f"the entry of its slice {where} holds two data records")
                data = as_bytes(wire, field)
        if data is None:
            raise _Bad(f"the entry of its slice {where} holds no data record")
        proto = None
        for number, wire, field in iter_fields(data):
            if number == 1 and bytes(as_bytes(wire, field)) != t.raw:
                raise _Bad(f"the entry of its slice {where} names another tensor")
            if number == 2:
                got = _parse_slice(bytes(as_bytes(wire, field)))
                if _full(got, t.shape) != _full(stored, t.shape):
                    raise _Bad(f"the entry of its slice {where} holds slice {list(zip(*got))}")
            elif number == 3:
                if proto is not None:
                    raise _Bad(f"the entry of its slice {where} holds two tensors")
                proto = as_bytes(wire, field)
        return b"" if proto is None else proto


    # --- streaming ----------------------------------------------------------

    def _ranges(self, index: int) -> Callable[[int, int], Any]:
        """``read(offset, n)`` for file ``index``: a view of its map, or a ranged read."""
        buf = self._maps[index]
        if buf is not None:
            view = memoryview(buf)
            return lambda off, n: view[off:off + n]
        return self._opened[index].pread

    def _crc_span(self, index: int, lo: int, hi: int, c: int, chunk_bytes: int) -> int:
        """The crc32c of bytes [lo, hi) of file ``index`` continued from ``c``, read a chunk at a
        time (mapped pages are released as it goes)."""
        buf = self._maps[index]
        read = self._ranges(index)
        pos = lo
        while pos < hi:
            n = min(chunk_bytes, hi - pos)
            c = crc(read(pos, n), c)
            _release(buf, pos, pos + n)
            pos += n
        return c

    def _small_block(self, t: _Tensor, spec: TensorSpec, buf: mmap.mmap, lo: int, hi: int,
                     chunk_bytes: int) -> Iterator[tuple[Any, np.ndarray]]:
        """A tensor of a block no larger than one chunk of a mapped file: read as read() does
        (the block checked and cached by the table), then its pages released, so a checkpoint
        of many such tensors does not leave the whole file resident."""
        flat = np.ascontiguousarray(self._assemble(t, spec.dtype)).reshape(-1)
        for first, n, sel in c_blocks(spec.shape, flat.itemsize, chunk_bytes):
            yield sel, flat[first:first + n]
        del flat
        _release(buf, lo, hi)

    def _locate(self, index: int, i: int, key: bytes, t: _Tensor, stored: Slice, spec: TensorSpec,
                chunk_bytes: int) -> _Plan | None:
        """Where the values of ``t``'s one slice lie in file ``index`` (its data block ``i``), from
        small reads of the block's entries and the value's field headers, checked as read() checks
        them; None where only read() can take them (a compressed block, an unusual layout).

        A malformed block whose crc32c (when verified) does not match is reported as that, as
        read() reports it: the crc tells damage from a writer's mistake."""
        off, size = self._tables[index].handles[i]
        read = self._ranges(index)
        if bytes(read(off + size, 1))[0] != NO_COMPRESSION:
            # Snappy: a compressed block can only be decoded whole (an unknown type: read() says so).
            return None
        try:
            return self._find(index, i, key, t, stored, spec)
        except _Bad:
            if self.verify:
                self._check_block(index, off, size, chunk_bytes)
            raise

    def _walk(self, index: int, i: int, w: Window, key: bytes) -> tuple[int, int] | None:
        """(file offset, length) of ``key``'s value in data block ``i`` of file ``index``, from small
        reads through ``w``: every entry is walked and checked as ``Table.block`` checks it (restart
        points, shared prefixes, key lengths and budget, order, the index key).  None if the key is
        not there, or the block has more restart points than any real one (then read it whole)."""
        table = self._tables[index]
        off, size = table.handles[i]
        if size < 4:
            raise _Bad(f"data block is too short ({size} bytes) to hold its restart count")
        num_restarts = int.from_bytes(w.get(off + size - 4, 4), "little")
        if num_restarts > (size - 4) // 4:
            raise _Bad(f"data block claims {num_restarts} restart points, more than fit in {size} bytes")
        if num_restarts > MAX_STREAM_RESTARTS:
            return None
        limit = size - 4 - 4 * num_restarts
        raw = bytes(w.get(off + limit, 4 * num_restarts))
        restarts = {int.from_bytes(raw[4 * k:4 * k + 4], "little") for k in range(num_restarts)}
        if any(r >= limit and not (r == 0 and limit == 0) for r in restarts):
            raise _Bad("data block has a restart point outside its entries")
        budget = _KeyBudget(size)
        last = table.keys[i - 1] if i else None
        prev = b""
        found: tuple[int, int] | None = None
        pos, end = off, off + limit
        while pos < end:
            start = pos
            shared, pos = w.varint(pos, end, bits=32)
            non_shared, pos = w.varint(pos, end, bits=32)
            value_len, pos = w.varint(pos, end, bits=32)
            if shared > len(prev):
                raise _Bad(f"data block entry shares {shared} key bytes but the previous key has {len(prev)}")
            if start - off in restarts and shared:
                raise _Bad("data block entry at a restart point shares key bytes")
            if non_shared > end - pos or value_len > end - pos - non_shared:
                raise _Bad("data block entry runs past the end of its block")
            budget.spend(prev, shared, non_shared, w.get(pos, min(non_shared, 64)), 0)
            prev = prev[:shared] + bytes(w.get(pos, non_shared))
            pos += non_shared
            if last is not None and prev <= last:
                raise _Bad("table keys are out of order or repeated")
            if prev > table.keys[i]:
                raise _Bad("a data block holds a key beyond its index entry")
            last = prev
            if prev == key:
                found = (pos, value_len)
            pos += value_len
        return found

    def _check_block(self, index: int, off: int, size: int, chunk_bytes: int) -> None:
        """The crc32c of the (uncompressed) block at ``off``, computed a chunk at a time; _Bad if it
        does not match its trailer, with read()'s words."""
        c = self._crc_span(index, off, off + size + 1, 0, chunk_bytes)
        if mask(c) != int.from_bytes(self._ranges(index)(off + size + 1, 4), "little"):
            raise _Bad(f"data block at offset {off} fails its crc32c check")

    def _first(self, index: int, table: Table) -> tuple[bytes, Any] | None:
        """The table's first entry, the metadata: ``Table.first``, except that a first block larger
        than WHOLE_BLOCK_BYTES (a big tensor right after the metadata) is not read whole: the entry
        is found from small reads and the block's crc32c computed a chunk at a time."""
        if not len(table):
            return table.first()
        off, size = table.handles[0]
        read = self._ranges(index)
        if size + TRAILER_SIZE <= WHOLE_BLOCK_BYTES or bytes(read(off + size, 1))[0] != NO_COMPRESSION:
            return table.first()
        w = Window(read, off + size)
        try:
            found = self._walk(index, 0, w, b"")
            value = None if found is None else bytes(w.get(*found))
        except _Bad:
            if self.verify:
                self._check_block(index, off, size, CHUNK_BYTES)
            raise
        if value is None:
            return table.first()
        if self.verify:
            self._check_block(index, off, size, CHUNK_BYTES)
        _release(self._maps[index], off, off + size + TRAILER_SIZE)
        return b"", value

    def _find(self, index: int, i: int, key: bytes, t: _Tensor, stored: Slice, spec: TensorSpec) -> _Plan | None:
        """:meth:`_locate` without the crc: the entry (:meth:`_walk`), then the SavedTensorSlices,
        SavedSlice and TensorProto fields."""
        w = Window(self._ranges(index), sum(self._tables[index].handles[i]))
        found = self._walk(index, i, w, key)
        if found is None:
            return None                                   # read() says the slice's data is missing
        where = list(zip(*stored)) if stored[0] else "[]"
        proto = _slice_tensor(w, _data_record(w, found, where), t, stored, where)
        if proto is None:
            return None
        values = _raw_values(w, proto, spec, math.prod(t.shape))
        if values is None:
            return None
        at, n, view = values
        off, size = self._tables[index].handles[i]
        return _Plan(index, off, size, at, n, view)

    def _stream(self, plan: _Plan, spec: TensorSpec, chunk_bytes: int) -> Iterator[tuple[Any, np.ndarray]]:
        """The blocks of a located tensor; the table block's crc32c computed in file order (the
        bytes before the values, each block as it is yielded, the bytes after and the trailer's
        type byte) and compared at the end."""
        buf = self._maps[plan.file]
        f = self._opened[plan.file]
        read = self._ranges(plan.file)
        trailer = plan.block + plan.size
        itemsize = plan.dtype.itemsize
        with self._bad(self.files[plan.file], spec.name):
            c = self._crc_span(plan.file, plan.block, plan.start, 0, chunk_bytes) if self.verify else 0
            for first, n, sel in c_blocks(spec.shape, itemsize, chunk_bytes):
                pos, want = plan.start + first * itemsize, n * itemsize
                if isinstance(buf, mmap.mmap):
                    arr = np.frombuffer(buf, dtype=np.uint8, count=want, offset=pos)
                else:
                    arr = np.frombuffer(f.pread(pos, want), dtype=np.uint8)
                if self.verify:
                    c = crc(arr.data, c)  # memoryview(arr); numpy's stubs give ndarray __buffer__ only for Python >= 3.12
                yield sel, arr.view(plan.dtype)
                _release(buf, pos, pos + want)
            if self.verify:
                c = self._crc_span(plan.file, plan.start + plan.nbytes, trailer + 1, c, chunk_bytes)
                stored = int.from_bytes(read(trailer + 1, 4), "little")
                if mask(c) != stored:
                    raise _Bad(f"data block at offset {plan.block} fails its crc32c check")
            _release(buf, plan.block, trailer + TRAILER_SIZE)



# --- the steps of V1Reader._find: one SavedTensorSlices entry, field by field, through a Window ----------

def _data_record(w: Window, entry: tuple[int, int], where: object) -> tuple[int, int]:
    """(offset, length) of the entry's one data record (its SavedSlice)."""
    data: tuple[int, int] | None = None
    for number, wire, value in fields_at(w, entry[0], entry[0] + entry[1]):
        if number == 2:
            if data is not None:
                raise _Bad(f"the entry of its slice {where} holds two data records")
            data = as_range(wire, value)
    if data is None:
        raise _Bad(f"the entry of its slice {where} holds no data record")
    return data


def _slice_tensor(w: Window, data: tuple[int, int], t: _Tensor, stored: Slice, where: object) -> tuple[int, int] | None:
    """(offset, length) of the SavedSlice's TensorProto, its name and slice checked against the
    metadata's; None when it has none, or its slice is too big to check here (read() takes those)."""
    proto: tuple[int, int] | None = None
    for number, wire, value in fields_at(w, data[0], data[0] + data[1]):
        if number == 1:
            at, n = as_range(wire, value)
            if n != len(t.raw) or bytes(w.get(at, n)) != t.raw:
                raise _Bad(f"the entry of its slice {where} names another tensor")
        if number == 2:
            at, n = as_range(wire, value)
            if n > MAX_SLICE_BYTES:
                return None
            got = _parse_slice(bytes(w.get(at, n)))
            if _full(got, t.shape) != _full(stored, t.shape):
                raise _Bad(f"the entry of its slice {where} holds slice {list(zip(*got))}")
        elif number == 3:
            if proto is not None:
                raise _Bad(f"the entry of its slice {where} holds two tensors")
            proto = as_range(wire, value)
    return proto


def _raw_values(w: Window, proto: tuple[int, int], spec: TensorSpec, count: int) -> tuple[int, int, np.dtype[Any]] | None:
    """(offset, length, little-endian dtype) of the TensorProto's values when they are one run of raw
    bytes (of ``count`` elements) this machine can view in place; None for the rest, which read() decodes (or reports)."""
    declared = 0
    values: list[tuple[int, int, Any]] = []
    for number, wire, value in fields_at(w, proto[0], proto[0] + proto[1]):
        if number == _TP_DTYPE:
            declared = to_int32(as_varint(wire, value))
        elif number in _VALUE_FIELDS:
            values.append((number, wire, value))
    if declared and declared != _dtypes.BY_NAME[spec.dtype].tf_enum:
        raise _Bad(f"its values are declared {_dtype_name(declared)}, the tensor is {spec.dtype}")
    raw_field = _FIXED_FIELDS[spec.dtype][0] if spec.dtype in _FIXED_FIELDS else _FLOAT8 if spec.dtype in _BYTE_FIELDS else None
    if len(values) != 1 or values[0][1] != 2 or values[0][0] not in (_TP_CONTENT, raw_field):
        return None                                   # varints, pieces, several fields: read() takes them
    at, n = values[0][2]
    out = numpy_dtype(spec.dtype)
    view = out.newbyteorder("<") if out.kind in "iufc" else out
    if view != out or n != count * out.itemsize:
        return None                                   # a big-endian machine; or a miscount, which read() reports
    return at, n, view

#: Bounds past which a block is left to the whole-block path (no real block comes near them):
#: restart points (TensorFlow writes one per 16 entries) and the bytes of a TensorSliceProto.
MAX_STREAM_RESTARTS = 1 << 16
MAX_SLICE_BYTES = 1 << 20
#: A first block up to this size is read whole when the metadata is read at opening (it is then
#: cached for the tensors in it); a larger one holds a big tensor, and only the metadata is read.
WHOLE_BLOCK_BYTES = 1 << 20


class _Plan(NamedTuple):
    """Where a streamed tensor's values lie: ``file`` (an index into the reader's files), its table block (contents at
    ``block``, ``size`` bytes, then the trailer), the values' ``nbytes`` at ``start``, and
    the dtype to view them as."""

    file: int
    block: int
    size: int
    start: int
    nbytes: int
    dtype: np.dtype


def _release(buf: Any, lo: int, hi: int) -> None:
    """Drop the pages of bytes [lo, hi) of a mapped file from this process (MADV_DONTNEED), so
    what was streamed does not stay in its RSS; they stay in the page cache, and a view touched
    again faults them back.  Nothing for a file that is not mapped."""
    if not isinstance(buf, mmap.mmap) or hi <= lo:
        return
    page = mmap.PAGESIZE
    lo -= lo % page
    hi = min(hi + (-hi % page), len(buf) + (-len(buf) % page))
    if hi > lo:
        buf.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class _Translate:
    """``with reader._bad(path, tensor):`` turns the wire and table errors into ckptbridge errors."""

    def __init__(self, reader: V1Reader, path: str, tensor: str | None) -> None:
        self.reader, self.path, self.tensor = reader, path, tensor

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if isinstance(ev, KeyTooLong):
            raise FormatError(f"{self.path} (tensor {_name(ev.head)!r}...): its key is {ev.length} bytes long, more than the "
                              f"{MAX_KEY_BYTES} bytes the native engine reads; use the TensorFlow engine") from None
        if isinstance(ev, (KeysTooLarge, _Bad)):
            raise self.reader._corrupt(str(ev), self.path, self.tensor) from None


class _Values:
    """One slice's values in its TensorProto, counted on creation, decoded on demand."""

    def __init__(self, proto: Any, dtype: str, count: int) -> None:
        self.dtype = dtype
        self.count = count
        self.fields: dict[int, list[tuple[int, Any]]] = {}
        declared = 0
        for number, wire, value in iter_fields(proto):
            if number == _TP_DTYPE:
                declared = to_int32(as_varint(wire, value))
            elif number in _VALUE_FIELDS:
                self.fields.setdefault(number, []).append((wire, value))
        want = _dtypes.BY_NAME[dtype].tf_enum
        if declared and declared != want:
            raise _Bad(f"its values are declared {_dtype_name(declared)}, the tensor is {dtype}")
        content = b"".join(bytes(as_bytes(w, v)) for w, v in self.fields.pop(_TP_CONTENT, [])) if _TP_CONTENT in self.fields else None
        self.content = content or None
        self.field = self._typed_field()
        others = [n for n in self.fields if n != self.field]
        if others or (self.content is not None and self.field in self.fields):
            raise _Bad(f"its {dtype} values are stored in TensorProto fields {sorted(others + ([_TP_CONTENT] if self.content else []))}, "
                       "not the one TensorFlow uses for them")
        stored = self._count()
        if stored != count:
            raise _Bad(f"a slice of {count} elements holds {stored} values")

    def _typed_field(self) -> int | None:
        d = self.dtype
        if d == STRING:
            return _STRING
        if d in _VARINT_FIELDS:
            return _VARINT_FIELDS[d][0]
        if d in _FIXED_FIELDS:
            return _FIXED_FIELDS[d][0]
        if d in _BYTE_FIELDS:
            return _FLOAT8
        return None

    def _count(self) -> int:
        itemsize = _dtypes.BY_NAME[self.dtype].itemsize
        if self.content is not None:
            if self.dtype == STRING or len(self.content) % itemsize:
                raise _Bad(f"its tensor_content of {len(self.content)} bytes does not hold whole {self.dtype} elements")
            return len(self.content) // itemsize
        chunks = self.fields.get(self.field, []) if self.field is not None else []
        if self.dtype == STRING:
            if any(w != 2 for w, _ in chunks):
                raise _Bad("a string value is not length-delimited")
            return len(chunks)
        if self.dtype in _BYTE_FIELDS:
            return sum(len(as_bytes(w, v)) for w, v in chunks)
        if self.dtype in _FIXED_FIELDS:
            return self._count_fixed(chunks)
        return _count_varints(chunks)

    def _count_fixed(self, chunks: list[tuple[int, Any]]) -> int:
        """The elements in a fixed-width field's values, packed or not (complex: two per element)."""
        _, code, per = _FIXED_FIELDS[self.dtype]
        width = int(code[-1])
        n = 0
        for w, v in chunks:
            if w == 2:
                if len(v) % width:
                    raise _Bad(f"a packed field of {len(v)} bytes does not hold whole {width}-byte values")
                n += len(v) // width
            elif w == (5 if width == 4 else 1):
                n += 1
            else:
                raise _Bad("a float field has the wrong wire type")
        if n % per:
            raise _Bad(f"{n} values cannot be the real and imaginary parts of {self.dtype} elements")
        return n // per

    def decode(self) -> np.ndarray:
        """The values as a flat array of the tensor's exchange dtype (count elements)."""
        out_dtype = numpy_dtype(self.dtype)
        if self.content is not None:
            stored = out_dtype.newbyteorder("<") if out_dtype.kind in "iufc" else out_dtype
            return np.frombuffer(self.content, dtype=stored).astype(out_dtype, copy=True)
        chunks = self.fields.get(self.field, []) if self.field is not None else []
        if self.dtype == STRING:
            arr = np.empty(self.count, dtype=object)
            for i, (_, v) in enumerate(chunks):
                arr[i] = bytes(v)
            return arr
        if self.count == 0:
            return np.empty(0, dtype=out_dtype)
        if self.dtype in _BYTE_FIELDS:
            return np.frombuffer(b"".join(bytes(v) for _, v in chunks), dtype=np.uint8).view(out_dtype)
        if self.dtype in _FIXED_FIELDS:
            _, code, _ = _FIXED_FIELDS[self.dtype]
            if len(chunks) == 1 and chunks[0][0] == 2:
                flat = np.frombuffer(chunks[0][1], dtype=code)     # a read-only view of the mapped file
            else:
                flat = np.concatenate([np.frombuffer(v, dtype=code) if w == 2 else
                                       np.array([v], dtype=np.uint32 if code == "<f4" else np.uint64).view(code) for w, v in chunks])
            little = flat.view(out_dtype.newbyteorder("<"))          # complex: (real, imaginary) pairs
            return little if little.dtype == out_dtype else little.astype(out_dtype)
        _, low, high = _VARINT_FIELDS[self.dtype]
        parts = [_packed_varints(v) if w == 2 else np.array([v], dtype=np.uint64) for w, v in chunks]
        values = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.dtype == "bool":
            return np.not_equal(values, 0)
        signed = values.view(np.int64) if low < 0 else values
        if self.dtype not in ("int64", "uint64"):
            if bool((signed < low).any()) or bool((signed > high).any()):
                raise _Bad(f"a {self.dtype} value lies outside [{low}, {high}]")
        if self.dtype in ("float16", "bfloat16"):
            return values.astype(np.uint16).view(out_dtype)
        if out_dtype.names:                                      # quantized types: TensorFlow's structured form
            storage = _dtypes.BY_NAME[self.dtype].storage
            assert storage is not None
            return signed.astype(storage).view(out_dtype)
        return signed.astype(out_dtype)


def _count_varints(chunks: list[tuple[int, Any]]) -> int:
    """The values in a varint field, packed or not: a packed run holds one per byte below 0x80."""
    n = 0
    for w, v in chunks:
        if w == 2:
            raw = np.frombuffer(v, dtype=np.uint8)
            if len(raw) and raw[-1] >= 0x80:
                raise _Bad("a packed field ends inside a varint")
            n += int(np.count_nonzero(raw < 0x80))
        elif w == 0:
            n += 1
        else:
            raise _Bad("an integer field has the wrong wire type")
    return n


def _packed_varints(buf: Any) -> np.ndarray:
    """Every varint of a packed field (already checked to end on a varint's last byte), vectorised."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if not len(raw):
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(raw < 0x80)
    starts = np.empty(len(ends), dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    widths = ends - starts + 1
    widest = int(widths.max())
    if widest > 10:
        raise _Bad("overlong varint")
    values = np.zeros(len(ends), dtype=np.uint64)
    for k in range(widest):
        has = widths > k
        byte = raw[starts[has] + k].astype(np.uint64)
        if k == 9 and bool((byte > 1).any()):
            raise _Bad("varint out of 64-bit range")
        values[has] |= (byte & np.uint64(0x7F)) << np.uint64(7 * k)
    return values


def _full(s: Slice, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    starts, lengths = s
    return tuple((0, d) if n < 0 else (st, n) for st, n, d in zip(starts, lengths, shape))


def _dtype_name(enum: int) -> str:
    d = _dtypes.by_enum(enum)
    return d.name if d is not None else f"DataType {enum}"
