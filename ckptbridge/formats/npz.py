"""``.npz``: a zip of ``.npy`` members, one per tensor, keyed by checkpoint name.

Written member by member straight into the zip (never the whole model in
memory); read lazily, memory-mapping members that are stored uncompressed.
Pickle is never used in either direction.
"""

from __future__ import annotations

import ast
import functools
import mmap
import os
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from .. import _dtypes
from .._source import OBJECT_GRAPH, ArchiveSink, ArchiveSource, Encoded
from ..errors import CkptBridgeError, CorruptError, FormatError, UnsafeArchiveError, option
from ..io.atomic import AtomicFile
from ..io.chunks import BlockStream, mmap_blocks
from ..spec import STRING, TensorSpec, as_exchange_array, dtype_name, numpy_dtype
from . import meta
from ._zip import ZipWriter

META_MEMBER = "__ckptbridge__.npy"
OBJECT_GRAPH_MEMBER = "__ckptbridge_object_graph__.npy"
RESERVED = {META_MEMBER[:-4], OBJECT_GRAPH_MEMBER[:-4]}

# Deflate cannot expand data by more than about 1032:1; a member claiming more is lying.
_MAX_DEFLATE_RATIO = 1100
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def check_name(name: str, path: str) -> None:
    """Refuse names that cannot be stored, or would be unsafe to hand to an unzip tool."""
    meta.check_name_to_write(name, path)  # empty, NUL and control characters, not UTF-8, too long
    if name in RESERVED:
        raise FormatError(f"tensor name {name!r} is reserved by ckptbridge's .npz format; rename it ({option('rename')})")


class NpzSink(ArchiveSink):
    """Writes an ``.npz`` member by member into a temporary file; commit renames it."""

    streams = True

    def __init__(self, path: str, *, compress: bool = False, force: bool = False, source: str | None = None) -> None:
        super().__init__(path, AtomicFile(path, force=force))
        try:
            self._fd: int | None = os.open(self._out.tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except BaseException:
            self._out.abort()
            raise
        self._zip = ZipWriter(self._fd)
        self._compress = compress
        self._source = source

    def begin(self, specs: list[TensorSpec]) -> None:
        for s in specs:  # every name refused before the first member is written
            check_name(s.name, self.path)

    def check_name(self, name: str) -> None:
        check_name(name, self.path)

    def put(self, tensor: Encoded) -> None:
        self._write_member(tensor.name + ".npy", tensor.stored)

    def put_blocks(self, name: str, stream: BlockStream) -> None:
        """Stream a numeric tensor into its member block by block (never whole in memory)."""
        spec = stream.spec
        storage = _dtypes.lookup(spec.dtype).storage
        if storage is None:  # a dtype ckptbridge does not carry is refused before any sink sees it
            raise FormatError(f"{self.path}: tensor {name!r} has dtype {spec.dtype}, which ckptbridge does not carry")
        header = {"descr": np.lib.format.dtype_to_descr(storage), "fortran_order": False, "shape": tuple(spec.shape)}
        with self._zip.member(name + ".npy", compress=self._compress) as f:
            try:
                np.lib.format.write_array_header_1_0(f, header)
            except ValueError:  # header over 64 KiB: what np.save does too
                np.lib.format.write_array_header_2_0(f, header)
            f.write_stream(stream)

    def write_extra(self, key: str, payload: bytes) -> None:
        if key == OBJECT_GRAPH:
            self._write_member(OBJECT_GRAPH_MEMBER, np.frombuffer(payload, dtype=np.uint8))

    def _write_member(self, member: str, arr: np.ndarray) -> None:
        with self._zip.member(member, compress=self._compress) as f:
            np.lib.format.write_array(f, arr, allow_pickle=False)

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        doc = meta.provenance(self._source, metadata)
        doc["tensors"] = self._records
        self._write_member(META_MEMBER, np.frombuffer(meta.dumps(doc), dtype=np.uint8))
        self._zip.close()
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def abort(self) -> None:
        self._close_fd()
        self._out.abort()


class _Member:
    __slots__ = ("info", "dtype", "shape", "fortran", "data_offset")

    def __init__(self, info: zipfile.ZipInfo, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, data_offset: int | None) -> None:
        self.info, self.dtype, self.shape, self.fortran, self.data_offset = info, dtype, shape, fortran, data_offset


def _parse_npy_header(f: Any, where: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """dtype, shape, fortran order and header length of an ``.npy`` stream; no pickle, no eval."""
    magic = f.read(8)
    if len(magic) != 8 or magic[:6] != b"\x93NUMPY":
        raise CorruptError(f"{where}: not an .npy member (bad magic); the archive is damaged")
    major = magic[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", f.read(2))
        pre = 10
    elif major in (2, 3):
        (hlen,) = struct.unpack("<I", f.read(4))
        pre = 12
    else:
        raise CorruptError(f"{where}: unsupported .npy version {major}; the archive is damaged")
    if hlen > 1 << 20:
        raise CorruptError(f"{where}: .npy header claims {hlen} bytes; the archive is damaged")
    raw = f.read(hlen)
    if len(raw) != hlen:
        raise CorruptError(f"{where}: .npy header is truncated; the archive is damaged")
    try:  # a long header (a shape of many dimensions) is parsed as it comes: the cache holds short ones
        dtype, shape, fortran = _npy_fields(raw) if hlen <= _CACHED_HEADER else _npy_fields.__wrapped__(raw)
    except _HeaderProblem as e:
        raise e.error(f"{where}: {e.tail}") from None
    return dtype, shape, fortran, pre + hlen


class _HeaderProblem(Exception):
    """What is wrong with an ``.npy`` header's text: the error to raise, and its message after the member's name."""

    def __init__(self, error: type[CkptBridgeError], tail: str) -> None:
        super().__init__(tail)
        self.error, self.tail = error, tail


_CACHED_HEADER = 1024


@functools.lru_cache(maxsize=4096)
def _npy_fields(raw: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran order) of an ``.npy`` header's dict, parsed once per distinct text: an
    archive of many tensors repeats a few headers, and ``literal_eval`` costs more than the rest of a member."""
    try:
        d = ast.literal_eval(raw.decode("latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise _HeaderProblem(CorruptError, ".npy header is not readable; the archive is damaged") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise _HeaderProblem(CorruptError, ".npy header has unexpected keys; the archive is damaged")
    shape = d["shape"]
    if not isinstance(shape, tuple):
        raise _HeaderProblem(CorruptError, ".npy header has an invalid shape; the archive is damaged")
    try:
        shape = meta.check_shape(shape, ".npy header")
    except CorruptError as e:
        raise _HeaderProblem(CorruptError, str(e)) from None
    if not isinstance(d["fortran_order"], bool):
        raise _HeaderProblem(CorruptError, ".npy header has an invalid fortran_order; the archive is damaged")
    try:
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except Exception:
        raise _HeaderProblem(CorruptError, f".npy header has an invalid dtype {str(d['descr'])[:80]!r}; the archive is damaged") from None
    if dtype.hasobject:
        raise _HeaderProblem(UnsafeArchiveError, "member holds pickled Python objects; ckptbridge never unpickles archives. "
                                                 "Re-save it with numeric arrays (np.savez without object arrays)")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise _HeaderProblem(FormatError, f"structured dtype {dtype} is not a tensor; ckptbridge reads plain numeric arrays")
    if dtype.itemsize == 0:
        # |S0, |V0, <U0: any number of elements in no bytes would pass every byte count.
        raise _HeaderProblem(UnsafeArchiveError, f".npy header has dtype {dtype.str}, whose elements take no bytes; "
                                                 "refusing it (the archive is damaged or crafted)")

    return dtype, shape, d["fortran_order"]


def _entries_claimed(f: Any) -> int | None:
    """The number of members a zip's end-of-central-directory record (zip64's, where used) claims."""
    try:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # the stdlib's own parser of that record
    except (OSError, struct.error, ValueError):
        return None
    return None if not end else int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _check_member_entry(path: str, info: zipfile.ZipInfo, fsize: int) -> None:
    """Refuse, from its directory entry alone, a member that is not an ``.npy`` ckptbridge reads."""
    if not info.filename.endswith(".npy"):
        raise FormatError(f"{path}: member {info.filename!r} is not an .npy array; this is not an .npz that ckptbridge reads")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise FormatError(f"{path}: member {info.filename!r} uses an unsupported compression; re-save with np.savez or np.savez_compressed")
    if info.header_offset + info.compress_size > fsize:
        raise CorruptError(f"{path}: member {info.filename!r} extends past the end of the file; the archive is truncated")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 4096:
        raise UnsafeArchiveError(f"{path}: member {info.filename!r} claims {info.file_size} bytes from {info.compress_size} compressed; "
                                 "refusing an impossible compression ratio")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise CorruptError(f"{path}: member {info.filename!r} has inconsistent sizes; the archive is damaged")


class NpzSource(ArchiveSource):
    """A lazy view of an ``.npz``: headers are read up front, values on demand."""

    kind = "npz"

    def __init__(self, path: str, *, verify: bool = True, max_tensor_bytes: int | None = None) -> None:
        self.path = path
        self._verify = verify
        self._map: mmap.mmap | None = None
        try:
            self._file = open(path, "rb")
        except IsADirectoryError:
            raise FormatError(f"{path} is a directory, not an .npz archive") from None
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, struct.error, UnicodeDecodeError, zlib.error) as e:
            # NotImplementedError: a damaged "version needed to extract" field ("zip file version 25.5").
            self._file.close()
            raise CorruptError(f"{path} is not a readable .npz archive ({e}); check that the file is complete") from None
        try:
            self._load(max_tensor_bytes)
        except CkptBridgeError:
            self.close()
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError, RuntimeError, zlib.error) as e:
            self.close()
            raise CorruptError(f"{path}: damaged .npz archive ({e}); check that the file is complete") from None

    def _load(self, max_tensor_bytes: int | None) -> None:
        path = self.path
        self._meta: dict[str, Any] = {}
        self._extras: dict[str, bytes] = {}
        seen: set[str] = set()
        members: dict[str, _Member] = {}
        fsize = os.fstat(self._file.fileno()).st_size
        widest: tuple[int, int, str] | None = None  # of the members so far, the one reaching furthest
        # zipfile stops reading the central directory where an entry's lengths carry it past the
        # directory's end, and returns the entries before it: a damaged comment length would hide
        # the rest (ckptbridge's own record among them) and make a damaged archive look like a
        # smaller plain one.  The end record says how many entries there are.
        claimed = _entries_claimed(self._file)
        if claimed is not None and claimed != len(self._zip.infolist()):
            raise CorruptError(f"{path}: the zip directory lists {claimed} members but {len(self._zip.infolist())} can be read; "
                               "the archive is damaged")
        # what the metadata may describe: the tensor members, each backed by its zip headers
        tensors = sum(1 for i in self._zip.infolist() if i.filename not in (META_MEMBER, OBJECT_GRAPH_MEMBER) and not i.is_dir())
        # In file order, whatever order the directory lists them in: a member's bytes then overlap
        # another's exactly when it starts before the furthest end so far (one sort, not a search
        # per member), found before the member is opened.
        for info in sorted(self._zip.infolist(), key=lambda i: i.header_offset):
            if info.filename in seen:
                raise CorruptError(f"{path}: member {info.filename!r} appears twice; refusing an ambiguous archive")
            seen.add(info.filename)
            if info.is_dir():
                continue
            _check_member_entry(path, info, fsize)
            name = info.filename[:-4]
            where = f"{path}: member {name!r}"
            if info.filename not in (META_MEMBER, OBJECT_GRAPH_MEMBER):
                meta.check_tensor_name(name, path)
            start = self._data_start(info, where, fsize)
            # Members whose bytes overlap (one compressed stream named many times) are a
            # zip bomb's trick; a zip written by NumPy or ckptbridge never does it.
            span = (info.header_offset, start + info.compress_size, info.filename)
            if widest is not None and span[0] < widest[1]:  # members come in file order: see the loop
                raise UnsafeArchiveError(f"{path}: members {widest[2]!r} and {info.filename!r} share bytes in the file; "
                                         "refusing an overlapping (crafted) archive")
            if widest is None or span[1] > widest[1]:
                widest = span
            members[name] = self._read_member_header(info, where, start, tensors, max_tensor_bytes)
        if META_MEMBER[:-4] in members:
            raw = self._read_raw(members.pop(META_MEMBER[:-4]))
            self._meta = meta.loads(raw.tobytes(), path, tensors=len(members))  # each member backed by its zip headers
        if OBJECT_GRAPH_MEMBER[:-4] in members:
            self._extras[OBJECT_GRAPH] = self._read_raw(members.pop(OBJECT_GRAPH_MEMBER[:-4])).tobytes()
        self._members = members
        self._specs = self._member_specs(members, max_tensor_bytes)

    def _data_start(self, info: zipfile.ZipInfo, where: str, fsize: int) -> int:
        """Where a member's data starts in the file, from its local header (checked to lie inside the file)."""
        self._file.seek(info.header_offset)
        lh = _LOCAL_HEADER.unpack(self._file.read(_LOCAL_HEADER.size))
        if lh[0] != b"PK\x03\x04":
            raise CorruptError(f"{where}: bad local header; the archive is damaged")
        start: int = info.header_offset + _LOCAL_HEADER.size + lh[9] + lh[10]
        if start + info.compress_size > fsize:
            raise CorruptError(f"{where}: data extends past the end of the file; the archive is truncated")
        return start

    def _read_member_header(self, info: zipfile.ZipInfo, where: str, start: int, tensors: int, max_tensor_bytes: int | None) -> _Member:
        """A member's ``.npy`` header, read and checked against the zip's sizes and the limits."""
        with self._zip.open(info) as f:
            # Only the header is wanted here.  zipfile checks a member's CRC-32 when a read
            # reaches its end, which for a small member is already this read: a damaged
            # tensor would then make the whole archive unreadable instead of failing (and
            # being named by verify) when that tensor is read.
            if hasattr(f, "_expected_crc"):
                f._expected_crc = None
            dtype, shape, fortran, hlen = _parse_npy_header(f, where)
        count = int(np.prod(shape, dtype=object)) if shape else 1
        need = count * dtype.itemsize
        if hlen + need != info.file_size:
            raise CorruptError(f"{where}: header claims {list(shape)} {dtype} ({need} bytes) but the member holds {info.file_size - hlen}; "
                               "the archive is damaged or crafted")
        if max_tensor_bytes is not None and need > max_tensor_bytes:
            raise UnsafeArchiveError(f"{where}: tensor of {need} bytes exceeds the limit of {max_tensor_bytes} bytes; "
                                     f"raise {option('max_tensor_bytes')} if it is genuine")
        if dtype.kind == "S":  # read as one bytes object per element
            meta.check_in_memory(count, need, info.compress_size, where, max_tensor_bytes, strings=True)
        if info.filename in (META_MEMBER, OBJECT_GRAPH_MEMBER):
            meta.check_metadata_size(need, where, "ckptbridge metadata" if info.filename == META_MEMBER else "the stored TF2 object graph",
                                     objects=tensors if info.filename == META_MEMBER else 0)
        offset = start + hlen if info.compress_type == zipfile.ZIP_STORED else None
        return _Member(info, dtype, shape, fortran, offset)

    def _member_specs(self, members: dict[str, _Member], max_tensor_bytes: int | None) -> dict[str, TensorSpec]:
        """Each tensor's spec: from the metadata's record where there is one, else from its ``.npy`` header."""
        path = self.path
        records = self._meta.get("tensors", {})
        if self._meta:
            missing = sorted(set(records) - set(members))
            if missing:
                raise CorruptError(f"{path}: metadata lists tensors that are not in the archive: {', '.join(missing[:5])}; "
                                   "the archive is incomplete")
        specs = {}
        for name in sorted(members):
            m = members[name]
            rec = records.get(name)
            if rec is not None:
                dtype, shape = meta.record_spec(name, rec, m.dtype, m.shape, f"{path}: tensor {name!r}")
                specs[name] = TensorSpec(name, dtype, shape, stored_nbytes=int(m.shape[0]) if dtype == STRING else None)
                if dtype == STRING:  # n lengths then the bytes, read as n bytes objects
                    n = specs[name].size
                    meta.check_in_memory(n, m.info.file_size - 8 * n, m.info.compress_size, f"{path}: tensor {name!r}", max_tensor_bytes,
                                         strings=True)
            else:
                try:
                    specs[name] = TensorSpec(name, dtype_name(m.dtype), tuple(m.shape))
                except FormatError as e:
                    raise FormatError(f"{path}: member {name!r}: {e}") from None
        return specs

    def _read_raw(self, m: _Member) -> np.ndarray:
        where = f"{self.path}: member {m.info.filename[:-4]!r}"
        count = int(np.prod(m.shape)) if m.shape else 1
        if m.data_offset is not None:
            if count == 0:
                arr = np.empty(m.shape, dtype=m.dtype)
            else:
                arr = np.memmap(self._file, dtype=m.dtype, mode="r", offset=m.data_offset, shape=m.shape or (1,), order="F" if m.fortran else "C")
                if not m.shape:
                    arr = arr.reshape(())
        else:
            arr = np.empty(m.shape, dtype=m.dtype, order="F" if m.fortran else "C")
            with self._zip.open(m.info) as f:
                f.seek(0)
                _parse_npy_header(f, where)
                buf = arr.reshape(-1, order="A").view(np.uint8).data if arr.size else memoryview(b"")
                got = f.readinto(buf) if arr.nbytes else 0  # type: ignore[attr-defined]  # typeshed types ZipFile.open as IO[bytes]; it is a ZipExtFile (io.BufferedIOBase)

                if got != arr.nbytes:
                    raise CorruptError(f"{where}: member is truncated; the archive is damaged")
        return arr

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        """Stream a numeric member stored uncompressed (C order) as views of the mapped file,
        released block by block (see ``_chunks.mmap_blocks``); its crc32c record is
        checked at the end.  None where :meth:`read` must do it."""
        spec = self._specs.get(name)
        if spec is None or spec.dtype == STRING or self._file is None:
            return None
        m = self._members[name]
        if m.data_offset is None or m.fortran or tuple(m.shape) != spec.shape:
            return None
        want = numpy_dtype(spec.dtype)
        rec = self._meta.get("tensors", {}).get(name)
        if rec is None:
            if m.dtype != want:
                return None
        else:
            d = _dtypes.lookup(spec.dtype)
            if rec.get("encoding", meta.ENC_RAW) != d.encoding or m.dtype != d.storage:
                return None
        where = f"{self.path}: tensor {name!r}"
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        blocks = mmap_blocks(self._map, m.data_offset, spec, want, chunk_bytes)
        check = None
        if rec is not None and self._verify:
            stored_crc = int(rec["crc32c"])

            def check(c: int) -> None:
                if c != stored_crc:
                    raise CorruptError(f"{where}: checksum mismatch (crc32c), the stored bytes are damaged; restore the archive from a good copy")
        return BlockStream(spec, blocks, check, span=(self._file.fileno(), m.data_offset),
                           stored=int(rec["crc32c"]) if check is not None and rec is not None else None)

    def read(self, name: str) -> np.ndarray:
        spec = self.spec(name)
        m = self._members[name]
        where = f"{self.path}: tensor {name!r}"
        try:
            raw = self._read_raw(m)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, zlib.error) as e:
            raise CorruptError(f"{where}: cannot read ({e}); the archive is damaged") from None
        rec = self._meta.get("tensors", {}).get(name)
        if rec is None:
            return as_exchange_array(np.require(raw, requirements="C"))
        if self._verify and meta.checksum(raw) != int(rec["crc32c"]):
            raise CorruptError(f"{where}: checksum mismatch (crc32c), the stored bytes are damaged; restore the archive from a good copy")
        return meta.decode(np.require(raw, requirements="C"), spec.dtype, spec.shape, rec.get("encoding", meta.ENC_RAW), where)

    def close(self) -> None:
        self._map = None  # views handed out keep the map alive; we drop our reference
        z = getattr(self, "_zip", None)
        if z is not None:
            z.close()
            self._zip = None  # type: ignore[assignment]  # closed: nothing reads it after close()
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()
            self._file = None  # type: ignore[assignment]  # closed: nothing reads it after close()


NpzSink.source_class = NpzSource
