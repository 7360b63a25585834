"""Read TensorFlow V2 checkpoints (tensor bundles) without TensorFlow.

The whole ``.index`` is parsed and checked when the reader opens: every entry's
shard, offset and size must lie inside its data file and agree with its dtype
and shape, and every partitioned tensor's slices must tile it exactly.  Values
are read on demand from memory-mapped data shards.

The files are read through a :class:`~ckptbridge.io.ranged.Place` (a local
directory, a tar or zip archive, a remote prefix): the index is read whole, a
tensor's bytes by range when it is read, in blocks when it is streamed, so a
remote or archived checkpoint costs what the tensors asked for, never the whole
data file.  Local files are memory-mapped, the fast path.

Memory: numeric tensors of a little-endian local bundle come back as **read-only
views of the memory map** (no copy); elsewhere as read-only arrays over the bytes read.  A view keeps its mapping alive by itself
(NumPy holds a reference to the mmap), so it stays valid after :meth:`close`;
closing only drops the reader's own references.  The one hazard of any
memory-mapped reader remains: if another program truncates or rewrites a data
file in place while a view is alive, touching the view may crash the process
(SIGBUS).  TensorFlow and ckptbridge both replace checkpoints by renaming, which
leaves the mapped file intact.  Pass ``copy=True`` to :meth:`BundleReader.read`
for a private, writable array.  Strings, big-endian bundles and partitioned
tensors are always copied.
"""

from __future__ import annotations

import math
import mmap
import os
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from .. import _dtypes
from .._dtypes import uncarried_error
from .._source import OBJECT_GRAPH, OBJECT_GRAPH_KEY, Source
from ..errors import CkptBridgeError, CorruptError, FormatError, NotFoundError
from ..io.chunks import BlockStream, c_blocks, mmap_blocks
from ..io.ckptfiles import data_path, index_path
from ..io.ranged import LocalFile, LocalPlace, Place, RangedFile, where
from ..io.wire import _Bad, crc, get_varint, mask, unmask
from ..spec import STRING, TensorSpec, numpy_dtype
from . import _table
from ._entries import BIG, DTYPE_BY_ENUM, HEADER_KEY, LITTLE, TENSOR_BUNDLE_VERSION, Entry, parse_entry, parse_header, slice_key
from ._table import MAX_KEY_BYTES, KeysTooLarge, KeyTooLong, SnappyBlock, has_magic, read_table

ENGINE_NAME = "native"
MAX_SHARDS = 1 << 20
MAX_RANK = 254          # TensorShape's limit
KEEP_OPEN = 64          # data shards kept open after opening checks their sizes; more are reopened when read


def is_bundle(prefix: str) -> bool:
    """Whether ``prefix.index`` exists and ends with the table magic number (cheap; reads 8 bytes)."""
    return _table.is_table_file(index_path(prefix))


def _key_name(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


class BundleReader(Source):
    """A lazy :class:`Source` over the V2 checkpoint at ``prefix`` (the path without ``.index``).

    ``verify`` checks each tensor's crc32c when it is read, as TensorFlow does.
    With ``place``, ``prefix`` is the checkpoint's name inside it (``model.ckpt-100``)
    and the reader owns the place: :meth:`close` closes it.
    """

    kind = "checkpoint"
    engine = ENGINE_NAME

    def __init__(self, prefix: str, *, verify: bool = True, place: Place | None = None) -> None:
        prefix = os.fspath(prefix)
        if place is None:
            self._place: Place = LocalPlace(os.path.dirname(prefix) or ".")
            self._rel = os.path.basename(prefix)
            self.path = self.prefix = prefix
        else:
            self._place, self._rel = place, prefix
            self.path = self.prefix = where(place, prefix)
        self.verify = verify
        self._index_file = index_path(self.prefix)
        self._maps: dict[int, mmap.mmap | bytes | None] = {}
        self._files: dict[int, RangedFile] = {}  # the used data shards, opened once their sizes are checked
        self._verified: set[bytes] = set()
        self._closed = False
        try:
            data = self._read_index()
            self._parse(data)
        except BaseException:
            self.close()
            raise

    # --- opening ------------------------------------------------------------

    def _corrupt(self, what: str, file: str | None = None, tensor: str | None = None) -> CorruptError:
        where = file or self._index_file
        about = f" (tensor {tensor!r})" if tensor is not None else ""
        return CorruptError(f"{where}{about}: {what}; the checkpoint is damaged; restore it from a good copy or re-save it")

    def _read_index(self) -> bytes:
        try:
            with self._place.open(index_path(self._rel)) as f:
                return f.pread(0, f.size)
        except NotFoundError:
            raise NotFoundError(f"no checkpoint at {self.prefix}: {self._index_file} does not exist") from None
        except FormatError:
            if os.path.isdir(self._index_file) and self._place.local_dir() is not None:
                raise FormatError(f"{self._index_file} is a directory, not a checkpoint index") from None
            raise
        except OSError as e:
            raise CkptBridgeError(f"cannot read {self._index_file}: {e.strerror or e}; check that the file is readable (permissions, disk)") from None

    def _parse(self, data: bytes) -> None:
        if not has_magic(data):
            raise self._corrupt("it does not end with the table magic number (truncated, or not a TensorFlow V2 checkpoint index)")
        entries: dict[bytes, Entry] = {}
        header = None
        key = b""
        try:
            for key, value in read_table(data):
                if header is None:
                    if key != HEADER_KEY:
                        raise self._corrupt("the first entry is not the bundle header")
                    header = parse_header(value)
                    continue
                entries[key] = parse_entry(value)
        except SnappyBlock:
            raise FormatError(f"{self._index_file} has snappy-compressed table blocks, which the native engine does not read; "
                              "use the TensorFlow engine for this checkpoint") from None
        except KeyTooLong as e:
            head = _key_name(e.head)
            raise FormatError(f"{self._index_file} (tensor {head!r}...): its name is {e.length} bytes long, more than the "
                              f"{MAX_KEY_BYTES} bytes the native engine reads (real tensor names take a few hundred); "
                              "if the checkpoint is genuine, rename the tensor in TensorFlow or use the TensorFlow engine") from None
        except KeysTooLarge as e:
            raise self._corrupt(str(e)) from None
        except _Bad as e:
            tensor = _key_name(key) if key else None
            raise self._corrupt(str(e), tensor=tensor) from None
        if header is None:
            raise self._corrupt("the index holds no header entry")
        if header.min_consumer > TENSOR_BUNDLE_VERSION or TENSOR_BUNDLE_VERSION in header.bad_consumers:
            raise FormatError(f"{self._index_file} needs a newer tensor-bundle reader (min_consumer {header.min_consumer}); "
                              "use the TensorFlow engine")
        if header.endianness not in (LITTLE, BIG):
            raise self._corrupt(f"unknown endianness {header.endianness} in the header")
        if not 1 <= header.num_shards <= MAX_SHARDS:
            raise self._corrupt(f"the header claims {header.num_shards} data shards")
        self._header = header
        self._big = header.endianness == BIG
        self._entries = entries
        self._check_shards()
        self._check_entries()

    def _check_shards(self) -> None:
        used = sorted({e.shard_id for e in self._entries.values() if not e.slices})
        self._shard_sizes: dict[int, int] = {}
        for shard in used:
            if not 0 <= shard < self._header.num_shards:
                names = [_key_name(k) for k, e in self._entries.items() if e.shard_id == shard and not e.slices][:1]
                raise self._corrupt(f"an entry names data shard {shard} but the header says there are {self._header.num_shards}",
                                    tensor=names[0] if names else None)
            path = data_path(self.prefix, shard, self._header.num_shards)
            try:
                f = self._place.open(data_path(self._rel, shard, self._header.num_shards))
                self._shard_sizes[shard] = f.size
                if len(self._files) < KEEP_OPEN:
                    self._files[shard] = f
                else:
                    f.close()   # reopened when read: thousands of shards must not hold thousands of descriptors
            except (FileNotFoundError, NotFoundError):
                raise CorruptError(f"data file {path} of checkpoint {self.prefix} is missing; "
                                   "the checkpoint is incomplete; copy all its .data-* files along with the .index") from None
            except OSError as e:
                raise CkptBridgeError(f"cannot read {path}: {e.strerror or e}; check that the file is readable (permissions, disk)") from None

    def _check_stored(self, e: Entry, name: str, d: _dtypes.DType) -> None:
        """A stored (non-partitioned) entry: its bytes lie inside its shard and fit its dtype and shape."""
        count = self._check_shape(e.shape, name)
        if e.offset < 0 or e.size < 0 or e.offset + e.size > self._shard_sizes[e.shard_id]:
            path = data_path(self.prefix, e.shard_id, self._header.num_shards)
            raise self._corrupt(f"its bytes [{e.offset}, {e.offset + e.size}) lie outside {path} "
                                f"({self._shard_sizes[e.shard_id]} bytes)", tensor=name)
        if not d.carried:
            return  # not carried: only its place in the shard can be checked
        if d.name == STRING:
            if e.size and e.size < count + 4:
                raise self._corrupt(f"{e.size} bytes cannot hold {count} strings", tensor=name)
        elif e.size != count * d.itemsize:  # the table's width: no ml_dtypes to list bfloat16
            raise self._corrupt(f"{e.size} stored bytes do not match its {d.name}{list(e.shape)} shape", tensor=name)

    def _check_exclusive(self) -> None:
        """No two stored entries (tensors or slices) share a byte of a data file.

        TensorFlow appends every entry to its shard, padded at most to an
        alignment, so stored ranges never overlap.  Requiring that ties the bytes
        all tensors claim together, partitioned ones included, to the size of the
        data files: slices cannot all point at the same bytes to make a small
        checkpoint expand without bound."""
        stored = [(e.shard_id, e.offset, e.size, key) for key, e in self._entries.items() if not e.slices and e.size > 0]
        if len(stored) < 2:
            return
        shard = np.array([t[0] for t in stored], dtype=np.int64)
        start = np.array([t[1] for t in stored], dtype=np.int64)
        end = start + np.array([t[2] for t in stored], dtype=np.int64)   # inside the shard: checked, no overflow
        order = np.lexsort((start, shard))
        shard, start, end = shard[order], start[order], end[order]
        cuts = np.flatnonzero(shard[1:] != shard[:-1]) + 1
        for lo, hi in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(order)])).tolist()):
            bad = np.flatnonzero(start[lo + 1:hi] < np.maximum.accumulate(end[lo:hi - 1]))
            if len(bad):
                break
        else:
            return
        i = lo + int(bad[0]) + 1
        j = lo + int(np.flatnonzero(end[lo:i] > start[i])[0])
        first, second = stored[int(order[j])], stored[int(order[i])]
        path = data_path(self.prefix, second[0], self._header.num_shards)
        name, what = self._describe(second[3])
        other_name, other = self._describe(first[3])
        raise self._corrupt(f"its {what}bytes [{second[1]}, {second[1] + second[2]}) overlap bytes [{first[1]}, {first[1] + first[2]}) "
                            f"of {other + 'of ' if other else ''}tensor {other_name!r}; every stored tensor and slice has bytes of its own",
                            file=path, tensor=name)

    def _describe(self, key: bytes) -> tuple[str, str]:
        """The name of the tensor an entry holds, and "slice [...] " if the entry is one of its slices."""
        for name, parts in self._slices.items():
            for starts, lengths, skey in parts:
                if skey == key:
                    return name, f"slice {list(zip(starts, lengths))} "
        return _key_name(key), ""

    def _check_shape(self, shape: tuple[int, ...], name: str) -> int:
        """The shape's element count, once it is checked to be one NumPy can represent (even a zero-size one)."""
        count = math.prod(shape)
        if len(shape) > MAX_RANK or (shape and min(shape) < 0) or (count or math.prod(d for d in shape if d)) >= 1 << 58:
            raise self._corrupt(f"invalid shape {list(shape)}", tensor=name)
        return count

    def _check_slices(self, key: bytes, e: Entry, name: str, claimed: set[bytes]) -> list[tuple[tuple[int, ...], tuple[int, ...], bytes]]:
        """A partitioned tensor's slices, each (starts, lengths, its key), once they are checked to tile its shape
        exactly; their keys are added to ``claimed``."""
        self._check_shape(e.shape, name)
        parts = []
        total = 0
        for starts, lengths in e.slices:
            if len(starts) != len(e.shape):
                raise self._corrupt(f"a slice of rank {len(starts)} does not match the rank-{len(e.shape)} tensor", tensor=name)
            skey = slice_key(key, starts, lengths)
            full_starts = tuple(0 if n < 0 else s for s, n in zip(starts, lengths))
            full_lengths = tuple(d if n < 0 else n for n, d in zip(lengths, e.shape))
            if any(s < 0 or s + n > d for s, n, d in zip(full_starts, full_lengths, e.shape)):
                raise self._corrupt(f"slice {list(zip(full_starts, full_lengths))} lies outside shape {list(e.shape)}", tensor=name)
            part = self._entries.get(skey)
            if part is None or part.slices or part.dtype != e.dtype or part.shape != full_lengths:
                raise self._corrupt(f"the data of slice {list(zip(full_starts, full_lengths))} is missing or inconsistent",
                                    tensor=name)
            claimed.add(skey)
            parts.append((full_starts, full_lengths, skey))
            total += math.prod(full_lengths)
        if total != math.prod(e.shape):
            raise self._corrupt("its slices do not tile the full tensor exactly", tensor=name)
        overlap = _overlap(parts, e.shape)
        if overlap is None:
            raise FormatError(f"{self._index_file} (tensor {name!r}): its {len(parts)} slices are cut too irregularly for "
                              "the native engine to check that they do not overlap (TensorFlow's partitioners cut one "
                              "axis); use the TensorFlow engine for this checkpoint")
        if overlap:
            raise self._corrupt("its slices do not tile the full tensor exactly (two of them overlap)", tensor=name)
        return parts

    def _check_entries(self) -> None:
        specs: dict[str, TensorSpec] = {}
        uncarried: dict[str, TensorSpec] = {}
        claimed: set[bytes] = set()
        self._slices: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], bytes]]] = {}
        self._keys: dict[str, bytes] = {}
        kinds = {enum: _dtypes.by_enum(enum) for enum in {e.dtype for e in self._entries.values()}}  # a few dtypes, many entries
        for key, e in self._entries.items():
            if kinds[e.dtype] is None:
                raise self._corrupt(f"unknown dtype enum {e.dtype}", tensor=_key_name(key))
            if e.slices:
                name = _key_name(key)
                self._slices[name] = self._check_slices(key, e, name, claimed)
        self._orphans = 0
        object_graph = None
        keys = self._keys
        for key, e in self._entries.items():
            name = _key_name(key)
            d = kinds[e.dtype]
            assert d is not None
            if not e.slices:
                self._check_stored(e, name, d)
            if key in claimed:
                continue
            if key.startswith(b"\x00"):
                self._orphans += 1
                continue
            if name == OBJECT_GRAPH_KEY:
                object_graph = key
                continue
            stored = None
            if not e.slices and (d.name == STRING or not d.carried):
                stored = e.size
            spec = TensorSpec(name, d.name, e.shape, stored_nbytes=stored)
            (specs if d.carried else uncarried)[name] = spec
            keys[name] = key
        self._check_exclusive()
        self._object_graph_key = object_graph
        # Already in TensorFlow's key order (bytes of the UTF-8 name): read_table yields strictly increasing keys,
        # and a name is its key decoded with surrogateescape, which encodes back to the same bytes.
        self._specs = specs
        self._uncarried = uncarried

    # --- Source -------------------------------------------------------------

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "format": "tensorflow-v2-checkpoint",
            "engine": ENGINE_NAME,
            "num_shards": self._header.num_shards,
            "endianness": "big" if self._big else "little",
            "bundle_version": self._header.producer,
        }
        if self._uncarried:
            meta["uncarried"] = {n: s.dtype for n, s in self._uncarried.items()}
        if self._orphans:
            meta["orphan_slices"] = self._orphans
        return meta

    def extras(self) -> dict[str, bytes]:
        if self._object_graph_key is None:
            return {}
        e = self._entries[self._object_graph_key]
        if e.dtype != 7 or e.shape != ():
            raise self._corrupt("the object graph entry is not a scalar string", tensor=OBJECT_GRAPH_KEY)
        return {OBJECT_GRAPH: bytes(self._read_stored(self._object_graph_key, e, OBJECT_GRAPH_KEY, copy=True)[()])}

    def uncarried(self) -> Mapping[str, TensorSpec]:
        return self._uncarried

    def read_raw(self, name: str) -> bytes | None:
        """The stored bytes of a tensor whose dtype is not carried, after checking its crc32c
        (None for a partitioned one)."""
        if self._closed:
            raise CkptBridgeError(f"checkpoint reader for {self.prefix} is closed")
        if name not in self._uncarried:
            raise NotFoundError(f"no tensor of a dtype ckptbridge does not carry named {name!r} in {self.prefix}")
        key = self._keys[name]
        e = self._entries[key]
        if e.slices:
            return None
        region = self._region(e)
        if self.verify:
            if e.dtype == _dtypes.BY_NAME[_dtypes.VARIANT].tf_enum:
                try:
                    actual = _variant_crc(region, math.prod(e.shape), self._big)
                except _Bad as err:
                    path = data_path(self.prefix, e.shard_id, self._header.num_shards)
                    raise self._corrupt(f"bad variant elements: {err}", file=path, tensor=name) from None
            else:
                actual = crc(region)
            self._check_crc(key, e, name, actual)
        return bytes(region)

    def checksum(self, name: str) -> int | None:
        """The crc32c TensorFlow stored for ``name`` (unmasked); None for partitioned tensors."""
        self.spec(name)
        e = self._entries[self._keys[name]]
        return None if e.slices else unmask(e.crc32c)

    def read(self, name: str, *, copy: bool = False) -> np.ndarray:
        """The tensor in the exchange form; see the module docstring about views vs copies."""
        if self._closed:
            raise CkptBridgeError(f"checkpoint reader for {self.prefix} is closed")
        if name not in self._specs:
            if name in self._uncarried:
                raise uncarried_error(self.prefix, {name: self._uncarried[name].dtype})
            raise NotFoundError(f"no tensor named {name!r} in {self.prefix}")
        key = self._keys[name]
        e = self._entries[key]
        if not e.slices:
            return self._read_stored(key, e, name, copy=copy)
        dtype = numpy_dtype(DTYPE_BY_ENUM[e.dtype])
        out = np.empty(e.shape, dtype=dtype)
        for starts, lengths, skey in self._slices[name]:
            part = self._read_stored(skey, self._entries[skey], name, copy=False)
            out[tuple(slice(s, s + n) for s, n in zip(starts, lengths))] = part
        return out

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        """Stream a stored numeric tensor in blocks: views of the mapped shard whose pages are
        released as the stream moves on, so a tensor of any size costs about one block of
        RSS and no copy; its crc32c is checked at the end.
        None for strings, partitioned tensors and big-endian bundles: :meth:`read` those."""
        if self._closed:
            raise CkptBridgeError(f"checkpoint reader for {self.prefix} is closed")
        if name not in self._specs:
            return None
        key = self._keys[name]
        e = self._entries[key]
        dtype_name = DTYPE_BY_ENUM[e.dtype]
        if e.slices or dtype_name == STRING:
            return None
        dtype = numpy_dtype(dtype_name)
        if self._big and dtype.itemsize > 1:
            return None
        buf = self._buffer(e.shard_id)
        check = (lambda c: self._check_crc(key, e, name, c)) if self.verify else None
        if buf is None:  # not mapped (an archive member, a remote object): read block by block
            f = self._file(e.shard_id)
            return BlockStream(self._specs[name], _pread_blocks(f, e.offset, self._specs[name], dtype, chunk_bytes), check)
        blocks = mmap_blocks(buf, e.offset, self._specs[name], dtype, chunk_bytes)
        local = self._files.get(e.shard_id)
        span = (local.fileno(), e.offset) if isinstance(local, LocalFile) else None
        # The entry's crc32c covers exactly these bytes: a consumer may move them unread and let a read-back check them.
        return BlockStream(self._specs[name], blocks, check, span=span, stored=unmask(e.crc32c) if check is not None else None)

    def close(self) -> None:
        # Views handed out keep their mmap alive; we only drop our references.
        self._maps.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._closed = True
        self._place.close()

    # --- values -------------------------------------------------------------

    def _file(self, shard: int) -> RangedFile:
        """The shard's open file (opened again if it was closed after its size was checked)."""
        f = self._files.get(shard)
        if f is None:
            path = data_path(self.prefix, shard, self._header.num_shards)
            try:
                f = self._place.open(data_path(self._rel, shard, self._header.num_shards))
            except (OSError, NotFoundError) as e:
                raise CkptBridgeError(f"cannot read {path}: {e}; check that the file is readable") from None
            if f.size != self._shard_sizes[shard]:
                f.close()
                raise CorruptError(f"data file {path} changed size while the checkpoint was open")
            self._files[shard] = f
        return f

    def _buffer(self, shard: int) -> mmap.mmap | bytes | None:
        """The shard's whole-file buffer (a local file's map), or None: read it by range."""
        if shard in self._maps:
            return self._maps[shard]
        path = data_path(self.prefix, shard, self._header.num_shards)
        f = self._file(shard)
        try:
            buf = f.buffer()
        except OSError as e:
            raise CkptBridgeError(f"cannot read {path}: {e.strerror or e}; check that the file is readable (permissions, disk)") from None
        if buf is not None and len(buf) != self._shard_sizes[shard]:
            raise CorruptError(f"data file {path} changed size while the checkpoint was open")
        self._maps[shard] = buf
        return buf

    def _region(self, e: Entry) -> memoryview:
        """An entry's stored bytes: a view of the mapped shard, or read by range."""
        buf = self._buffer(e.shard_id)
        if buf is not None:
            return memoryview(buf)[e.offset:e.offset + e.size]
        try:
            return memoryview(self._file(e.shard_id).pread(e.offset, e.size))
        except OSError as err:
            path = data_path(self.prefix, e.shard_id, self._header.num_shards)
            raise CkptBridgeError(f"cannot read {path}: {err.strerror or err}; check that the file is readable") from None

    def _read_stored(self, key: bytes, e: Entry, name: str, *, copy: bool) -> np.ndarray:
        region = self._region(e)
        dtype_name = DTYPE_BY_ENUM[e.dtype]
        if dtype_name == STRING:
            return self._read_strings(key, e, name, region)
        if self.verify and key not in self._verified:
            self._check_crc(key, e, name, crc(region))
        dtype = numpy_dtype(dtype_name)
        arr = np.frombuffer(region, dtype=np.uint8).view(dtype).reshape(e.shape)
        if self._big and dtype.itemsize > 1:
            unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
            return arr.view(f"u{unit}").byteswap().view(dtype)
        return arr.copy() if copy else arr

    def _check_crc(self, key: bytes, e: Entry, name: str, actual: int) -> None:
        if actual != unmask(e.crc32c):
            path = data_path(self.prefix, e.shard_id, self._header.num_shards)
            raise self._corrupt(f"checksum mismatch (stored crc32c {unmask(e.crc32c):08x}, "
                                f"computed {actual:08x} over bytes [{e.offset}, {e.offset + e.size}))", file=path, tensor=name)
        self._verified.add(key)

    def _read_strings(self, key: bytes, e: Entry, name: str, region: memoryview) -> np.ndarray:
        count = math.prod(e.shape)
        out = np.empty(e.shape, dtype=object)
        path = data_path(self.prefix, e.shard_id, self._header.num_shards)
        if e.size == 0:
            if count:
                raise self._corrupt("string tensor has no stored bytes", file=path, tensor=name)
            if self.verify:
                self._check_crc(key, e, name, 0)
            return out
        raw = np.frombuffer(region, dtype=np.uint8)
        try:
            lengths, used = _decode_varints(raw, count)
        except _Bad as err:
            raise self._corrupt(f"bad string lengths: {err}", file=path, tensor=name) from None
        order = ">" if self._big else "<"
        if used + 4 > e.size or int(lengths.sum(dtype=object)) > e.size - used - 4:
            raise self._corrupt("string lengths run past the tensor's stored bytes", file=path, tensor=name)
        if self.verify:
            if count and int(lengths.max()) > 0xFFFFFFFF:
                c = 0
                for n in lengths.tolist():
                    c = crc(int(n).to_bytes(4 if n <= 0xFFFFFFFF else 8, "big" if self._big else "little"), c)
            else:
                c = crc(lengths.astype(order + "u4").tobytes())
            stored_len_crc = int.from_bytes(region[used:used + 4], "big" if self._big else "little")
            if unmask(stored_len_crc) != c:
                raise self._corrupt("the checksum of its string lengths does not match", file=path, tensor=name)
        pos = used + 4
        flat = out.reshape(-1)
        for i, n in enumerate(lengths.tolist()):
            flat[i] = bytes(region[pos:pos + n])
            pos += n
        if self.verify:
            # The entry crc continues over the stored length checksum and the string bytes.
            self._check_crc(key, e, name, crc(region[used:pos], c))
        return out


def _pread_blocks(f: RangedFile, offset: int, spec: TensorSpec, dtype: np.dtype, chunk_bytes: int) -> Iterator[tuple[Any, np.ndarray]]:
    """Blocks of a tensor stored as raw C-order bytes at ``offset`` of ``f``, read by ``f.stream``:
    a remote file fetches the next blocks while this one is used, in its own bounded window, so
    a streamed remote tensor of any size costs a few blocks of memory."""
    if math.prod(spec.shape) == 0:
        return
    hint = f.block_hint()
    if hint is not None:
        chunk_bytes = min(chunk_bytes, hint)  # a remote file's requests: each block one, none joined
    sels: deque[Any] = deque()  # the selections of the ranges the stream has asked for and not yielded yet

    def ranges() -> Iterator[tuple[int, int]]:
        for start, n, sel in c_blocks(spec.shape, dtype.itemsize, chunk_bytes):
            sels.append(sel)
            yield offset + start * dtype.itemsize, n * dtype.itemsize

    stream = f.stream(ranges())
    try:
        for data in stream:
            yield sels.popleft(), np.frombuffer(data, dtype=np.uint8).view(dtype)
    finally:
        stream.close()


def _variant_crc(region: memoryview, count: int, big: bool) -> int:
    """The crc32c TensorFlow computes over a variant tensor's stored elements, each checked on the way.

    Each element is a varint64 length, that many bytes of a serialized
    VariantTensorDataProto and the masked crc32c so far; the running crc covers
    each length as a uint64, the bytes and each stored checksum (tensor_bundle.cc,
    WriteVariantTensor).
    """
    order: Literal["big", "little"] = "big" if big else "little"
    c = 0
    pos = 0
    end = len(region)
    for _ in range(count):
        n, pos = get_varint(region, pos, end)
        if n > end - pos - 4:
            raise _Bad("an element runs past the tensor's stored bytes")
        c = crc(n.to_bytes(8, order), c)
        c = crc(region[pos:pos + n], c)
        pos += n
        stored = region[pos:pos + 4]
        if int.from_bytes(stored, order) != mask(c):
            raise _Bad("an element's checksum does not match")
        c = crc(stored, c)
        pos += 4
    if pos != end:
        raise _Bad(f"{end - pos} bytes follow the last of its {count} elements")
    return c


def _decode_varints(raw: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Decode ``count`` little-endian base-128 varints from the start of ``raw``, vectorised."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64), 0
    window = raw[:min(len(raw), 10 * count)]
    ends = np.flatnonzero(window < 0x80)[:count]
    if len(ends) < count:
        raise _Bad("truncated varint")
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    widths = ends - starts + 1
    if int(widths.max()) > 10:
        raise _Bad("overlong varint")
    values = np.zeros(count, dtype=np.uint64)
    for k in range(int(widths.max())):
        has = widths > k
        byte = window[starts[has] + k].astype(np.uint64)
        if k == 9 and bool((byte > 1).any()):
            raise _Bad("varint out of 64-bit range")
        values[has] |= (byte & np.uint64(0x7F)) << np.uint64(7 * k)
    return values, int(ends[-1]) + 1


# Bounds of the slice overlap check for one tensor.  The corner count costs 2**rank
# points per slice, rank coordinates each (500k slices of rank 2, 2000 of rank 8);
# the sweep, which takes what is left, a microsecond or so per comparison.  Real
# partitions (one axis cut, sorted without either) stay far below both; past them
# the check gives up with a message.
MAX_CORNER_VALUES = 1 << 22
MAX_SWEEP_WORK = 1 << 21


def _overlap(parts: list[tuple[tuple[int, ...], tuple[int, ...], bytes]], shape: tuple[int, ...]) -> bool | None:
    """Whether two of the slices share an element, given that they lie inside ``shape`` and
    their sizes add up to its size; None if telling would cost more than the bounds above.

    Exact for any boxes, near-linear in the number of slices."""
    boxes = [(s, n) for s, n, _ in parts if all(n)]     # an empty slice holds no element
    if len(boxes) < 2:
        return False
    rank = len(shape)
    if rank == 0:
        return True
    starts = np.array([b[0] for b in boxes], dtype=np.int64).reshape(len(boxes), rank)
    ends = starts + np.array([b[1] for b in boxes], dtype=np.int64).reshape(len(boxes), rank)
    # An axis on which no two slices meet: TensorFlow's partitioners cut one axis.
    for a in range(rank):
        order = np.argsort(starts[:, a], kind="stable")
        if bool((np.maximum.accumulate(ends[order[:-1], a]) <= starts[order[1:], a]).all()):
            return False
    if (len(boxes) << rank) * rank <= MAX_CORNER_VALUES:
        return not _corners_match(starts, ends, shape)
    return _sweep_overlap(starts, ends)


def _corners_match(starts: np.ndarray, ends: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether the boxes cover each element of ``shape`` exactly once.

    How many boxes cover an element is the running sum, along every axis, of
    their corners counted with a sign (+ for an even number of end coordinates,
    - for odd).  So the boxes cover the tensor exactly once if and only if those
    signed counts, summed over all boxes, leave just the tensor's own corners."""
    n, rank = starts.shape
    pick = (np.arange(1 << rank)[:, None] >> np.arange(rank)) & 1          # corner k takes the end on axis j
    signs = 1 - 2 * (pick.sum(axis=1) & 1)
    points = np.where(pick[None] == 1, ends[:, None, :], starts[:, None, :]).reshape(-1, rank)
    corners = pick * np.array(shape, dtype=np.int64)
    if math.prod(d + 1 for d in shape) < 1 << 63:
        # One integer per point (mixed radix, axis 0 most significant): a much faster unique.
        radix = np.array([math.prod(d + 1 for d in shape[j + 1:]) for j in range(rank)], dtype=np.int64)
        points, corners = points @ radix, corners @ radix
        uniq, inverse = np.unique(points, return_inverse=True)
    else:
        uniq, inverse = np.unique(points, axis=0, return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), weights=np.tile(signs, n), minlength=len(uniq))
    left = counts != 0
    want = np.lexsort(corners.reshape(len(corners), -1).T[::-1])           # np.unique's order
    return bool(left.sum() == 1 << rank and (uniq[left] == corners[want]).all() and (counts[left] == signs[want]).all())


def _sweep_overlap(starts: np.ndarray, ends: np.ndarray) -> bool | None:
    """Sweep along the axis with the most distinct starts, comparing each box with the
    boxes still open there: every overlapping pair is met.  None past MAX_SWEEP_WORK."""
    n, rank = starts.shape
    a = max(range(rank), key=lambda k: len(np.unique(starts[:, k])))
    order = np.argsort(starts[:, a], kind="stable")
    starts, ends = starts[order], ends[order]
    sweep_start, sweep_end = starts[:, a].tolist(), ends[:, a].tolist()
    work = MAX_SWEEP_WORK
    active: list[int] = []
    for i in range(n):
        active = [j for j in active if sweep_end[j] > sweep_start[i]]
        work -= 16 + len(active)
        if work < 0:
            return None
        if active and bool(((starts[active] < ends[i]) & (starts[i] < ends[active])).all(axis=1).any()):
            return True
        active.append(i)
    return False
