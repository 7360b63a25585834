"""``.safetensors``: the format PyTorch, JAX and Hugging Face load directly.

A file is an 8-byte little-endian header length, a JSON header (per tensor:
``dtype``, ``shape``, ``data_offsets`` into the byte buffer that follows; plus
``__metadata__``, a str -> str map), then the tensors' raw little-endian bytes.

Writing streams: the sink learns every spec in :meth:`SafetensorsSink.begin`,
lays out the byte buffer then, and writes each tensor at its offset as it
arrives (the package's ``save_file`` would need the whole model in memory).
The header, which carries ckptbridge's metadata (provenance, crc32c, original
names, layout transforms) as JSON under ``__metadata__["ckptbridge"]``, is
written last into space reserved for it.  Reading goes through the
``safetensors`` package's ``safe_open``, which validates the header and reads
one tensor at a time.

bfloat16 and four float8 types are stored natively (``BF16``, ``F8_E4M3``,
``F8_E5M2``, ``F8_E4M3FNUZ``, ``F8_E5M2FNUZ``).  Strings, complex128, the quantized types
and the other float8/int4 variants have no safetensors dtype and are refused,
naming the tensor.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import sys
from json.encoder import encode_basestring_ascii
from typing import Any, BinaryIO

import numpy as np

from .. import _dtypes
from .._source import OBJECT_GRAPH, ArchiveSink, ArchiveSource, Encoded
from ..errors import CkptBridgeError, CorruptError, FormatError, MismatchError, UnsafeArchiveError, option
from ..io.atomic import AtomicFile
from ..io.chunks import BlockStream, mmap_blocks, write_stream
from ..spec import BFLOAT16, STRING, TensorSpec, as_exchange_array, numpy_dtype
from . import meta

#: canonical dtype -> safetensors dtype, for every carried dtype safetensors has an exact code for
ST_DTYPES = {d.name: d.safetensors for d in _dtypes.BY_NAME.values() if d.carried and d.safetensors}
FROM_ST = {v: k for k, v in ST_DTYPES.items()}
#: dtypes read from their byte range: the safetensors package has no NumPy type for them
_RAW_READ = {d for d, code in ST_DTYPES.items() if code.startswith("F8_")}
#: the header size the safetensors package itself accepts at most
_MAX_HEADER = 100_000_000
META_KEY = "ckptbridge"
OBJECT_GRAPH_KEY = "ckptbridge_object_graph"
RESERVED_NAME = "__metadata__"
# Room left in the header for metadata not known when the data is laid out
# (dropped names, renames, layout records...); past it the data is moved once.
_SLACK = 64 << 10
_COPY_CHUNK = 16 << 20


def _problem(spec: TensorSpec) -> str | None:
    if spec.dtype == STRING:
        return f"{spec.name!r} is a string tensor"
    if spec.dtype not in ST_DTYPES:
        return f"{spec.name!r} has dtype {spec.dtype}"
    return None


def check_specs(specs: list[TensorSpec] | Any, path: str) -> None:
    """Refuse, before anything is written, every tensor .safetensors cannot hold, naming them all."""
    specs = list(specs)
    for s in specs:
        if not s.name or s.name == RESERVED_NAME:
            raise FormatError(f"tensor name {s.name!r} cannot be stored in {path}; rename it ({option('rename')})")
        meta.check_name_to_write(s.name, path)  # what every reader refuses, refused before writing
    bad = [p for p in (_problem(s) for s in specs) if p]
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise FormatError(
            f"{len(bad)} tensor(s) cannot be stored in .safetensors, which has no type for them: {shown}. "
            f"Leave them out ({option('exclude')}) or export to .npz / .h5, which keep every dtype"
        )


def _refuse(spec: TensorSpec, path: str) -> None:
    check_specs([spec], path)


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _shape_json(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


class SafetensorsSink(ArchiveSink):
    """Streams tensors into a temporary ``.safetensors`` file; the header is written last.

    Per tensor it keeps only its data offset and crc32c: the header's JSON (hundreds of
    thousands of entries for some checkpoints) is rendered once, at :meth:`finish`, a batch of
    entries at a time, never as a dict of dicts."""

    def __init__(self, path: str, *, force: bool = False, source: str | None = None) -> None:
        super().__init__(path, AtomicFile(path, force=force))
        try:
            self._f = open(self._out.tmp, "r+b")
        except BaseException:
            self._out.abort()  # the temporary exists from here on: never left behind, as no sink leaves one
            raise
        self._source = source
        self._begun = False
        self._specs: dict[str, TensorSpec] = {}
        self._starts: dict[str, int] = {}  # name -> offset in the byte buffer, in layout order
        self._crcs: dict[str, int] = {}
        self._extras: dict[str, str] = {}
        self._reserve = 0
        self._data_len = 0

    def begin(self, specs: list[TensorSpec]) -> None:
        check_specs(specs, self.path)
        for s in specs:
            if s.name in self._specs:
                raise MismatchError(f"tensor {s.name!r} appears twice in what is written to {self.path}")
            self._specs[s.name] = s
        # Widest items first, as safetensors itself lays them out, so every tensor
        # starts aligned to its item size in the buffer.
        order = sorted(specs, key=lambda s: (-_dtypes.lookup(s.dtype).itemsize, s.name))
        pos = 0
        for s in order:
            self._starts[s.name] = pos
            pos += s.nbytes
        self._data_len = pos
        self._begun = True
        # Room for the header: exact but for the crc32c values (taken at their widest) and for
        # metadata only known at the end (the slack; past it the data is moved once).
        need = sum(map(len, self._header({}, widest_crc=True)))
        if need > _MAX_HEADER:
            raise FormatError(f"{self.path}: the header for {len(specs)} tensors would take {need} bytes, over the {_MAX_HEADER} "
                              f"the safetensors package reads; export to .npz or .h5, or leave tensors out ({option('exclude')})")
        self._reserve = _round8(need + _SLACK)
        self._f.truncate(8 + self._reserve + self._data_len)

    def _header(self, metadata: dict[str, Any] | None, *, widest_crc: bool = False) -> list[bytes]:
        """The header's JSON in pieces: ``__metadata__`` (ckptbridge's document as one escaped
        string: provenance, ``metadata``, the per-tensor records), then each tensor's entry."""
        esc = encode_basestring_ascii
        doc = meta.provenance(self._source, metadata)
        doc.pop("tensors", None)
        head = meta.dumps(doc).decode("ascii")[:-1]  # the records go last, rendered a batch at a time
        text = [head + ("," if len(head) > 1 else "") + '"tensors":{']
        pieces = ['{"__metadata__":{"format":"' + ("pt" if (metadata or {}).get("layout") else "tf") + '","' + META_KEY + '":"']
        batch: list[str] = []
        first = True
        for name in sorted(self._specs):
            s = self._specs[name]
            crc = 0xFFFFFFFF if widest_crc else self._crcs[name]
            batch.append(f'{"" if first else ","}{esc(name)}:{{"crc32c":{crc},"dtype":"{s.dtype}",'
                         f'"encoding":"{meta.ENC_RAW}","shape":{_shape_json(s.shape)}}}')
            first = False
            if len(batch) >= 4096:
                text.append("".join(batch))
                batch = []
        text.append("".join(batch) + "}}")
        # JSON escapes character by character, so the document can be escaped piece by piece.
        pieces.extend(esc(t)[1:-1] for t in text)
        del text, batch
        pieces.append('"' + "".join(f",{esc(k)}:{esc(v)}" for k, v in self._extras.items()) + "}")
        batch = []
        for name, start in self._starts.items():
            s = self._specs[name]
            batch.append(f',{esc(name)}:{{"dtype":"{ST_DTYPES[s.dtype]}","shape":{_shape_json(s.shape)},'
                         f'"data_offsets":[{start},{start + s.nbytes}]}}')
            if len(batch) >= 4096:
                pieces.append("".join(batch))
                batch = []
        pieces.append("".join(batch) + "}")
        return [p.encode("ascii") for p in pieces]

    def _announced(self, name: str) -> TensorSpec:
        if not self._begun:
            raise CkptBridgeError(f"internal error: {self.path} was written before begin() announced the tensors")
        spec = self._specs.get(name)
        if spec is None:
            raise MismatchError(f"tensor {name!r} was not announced for {self.path}")
        return spec

    def put(self, tensor: Encoded) -> None:
        spec = self._announced(tensor.name)
        name = tensor.name
        if tensor.dtype != spec.dtype or tensor.shape != spec.shape:
            _refuse(TensorSpec(name, tensor.dtype, tensor.shape), self.path)
            raise MismatchError(f"tensor {name!r}: announced {spec.describe()} but got {tensor.dtype}{list(tensor.shape)}")
        stored = tensor.stored
        if sys.byteorder != "little" and stored.dtype.itemsize > 1:
            stored = stored.astype(stored.dtype.newbyteorder("<"))
        start = self._starts[name]
        if stored.nbytes != spec.nbytes:
            raise MismatchError(f"tensor {name!r}: {stored.nbytes} bytes, expected {spec.nbytes}")
        if stored.nbytes:
            self._f.seek(8 + self._reserve + start)
            self._f.write(stored.reshape(-1).view(np.uint8).data)

    #: takes numeric tensors block by block (see ``io.chunks.BlockStream``)
    streams = True

    def put_blocks(self, name: str, stream: Any) -> None:
        """Write a numeric tensor at its offset block by block; never whole in memory."""
        spec = self._announced(name)
        if stream.spec.dtype != spec.dtype or tuple(stream.spec.shape) != spec.shape:
            raise MismatchError(f"tensor {name!r}: announced {spec.describe()} but got {stream.spec.describe()}")
        start = self._starts[name]
        pos = 8 + self._reserve + start
        if sys.byteorder == "little":  # the stream's bytes are the file's: copied by the kernel where it can
            self._f.flush()
            pos += write_stream(stream, self._f.fileno(), pos)
        else:
            for _, arr in stream:
                if arr.dtype.itemsize > 1:
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
                self._f.seek(pos)
                self._f.write(raw)
                pos += raw.nbytes
        if pos != 8 + self._reserve + start + spec.nbytes:
            raise MismatchError(f"tensor {name!r}: streamed {pos - 8 - self._reserve - start} bytes, expected {spec.nbytes}")

    def wrote(self, name: str, dtype: str, shape: tuple[int, ...], encoding: str, crc: int) -> None:
        # Only the crc32c is kept per tensor (safetensors holds bfloat16 as itself, so every record is
        # raw); the records are rendered with the header at finish(), not kept as dicts.
        self._crcs[name] = crc

    def write_extra(self, key: str, payload: bytes) -> None:
        if key == OBJECT_GRAPH:
            self._extras[OBJECT_GRAPH_KEY] = base64.b64encode(payload).decode("ascii")

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        if not self._begun:
            self.begin([])
        unwritten = sorted(set(self._specs) - set(self._crcs))
        if unwritten:
            raise MismatchError(f"{self.path}: {len(unwritten)} announced tensors were never written ({', '.join(unwritten[:5])}); output discarded")
        pieces = self._header(metadata)
        size = sum(map(len, pieces))
        if size > _MAX_HEADER:
            raise FormatError(f"{self.path}: its header would take {size} bytes, over the {_MAX_HEADER} the safetensors package reads; "
                              "export to .npz or .h5, which have no such limit")
        if size > self._reserve:
            self._move_data(_round8(size))
        self._f.seek(0)
        self._f.write(self._reserve.to_bytes(8, "little"))
        for piece in pieces:
            self._f.write(piece)
        self._f.write(b" " * (self._reserve - size))
        self._f.flush()
        self._f.close()
        # Read back next: what only the header needed is let go first.
        self._specs, self._starts, self._crcs = {}, {}, {}

    def _move_data(self, reserve: int) -> None:
        """Make the header room bigger by moving the data buffer towards the end, last chunk first."""
        shift = reserve - self._reserve
        fd = self._f.fileno()
        self._f.flush()
        old = 8 + self._reserve
        os.ftruncate(fd, 8 + reserve + self._data_len)
        end = self._data_len
        while end > 0:
            start = max(0, end - _COPY_CHUNK)
            chunk = os.pread(fd, end - start, old + start)
            os.pwrite(fd, chunk, old + start + shift)
            end = start
        self._reserve = reserve

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass
        self._out.abort()


class SafetensorsSource(ArchiveSource):
    """A lazy view of a ``.safetensors`` file through ``safetensors.safe_open``."""

    kind = "safetensors"

    def __init__(self, path: str, *, verify: bool = True, max_tensor_bytes: int | None = None) -> None:
        import safetensors as st  # a core dependency, imported when a .safetensors file is first read

        self.path = path
        self._verify = verify
        self._meta: dict[str, Any] = {}
        self._extras: dict[str, bytes] = {}
        self._ranges: dict[str, tuple[int, int]] | None = None
        self._file: BinaryIO | None = None  # the file mapped for read_blocks, and the span the kernel copies from
        self._map: mmap.mmap | None = None
        if os.path.isdir(path):
            raise FormatError(f"{path} is a directory, not a .safetensors file")
        try:
            self._f: Any = st.safe_open(path, framework="numpy")
        except (st.SafetensorError, OSError, ValueError) as e:
            raise CorruptError(f"{path} is not a readable .safetensors file ({e}); check that the file is complete") from None
        try:
            self._load(max_tensor_bytes)
        except BaseException:
            self.close()
            raise

    def _load(self, max_tensor_bytes: int | None) -> None:
        path = self.path
        header_meta = self._f.metadata() or {}
        names = sorted(self._f.keys())
        # Every tensor the header declares takes some 50 bytes of it (under the package's 100 MB):
        # the metadata may describe each of them.
        if META_KEY in header_meta:
            self._meta = meta.loads(header_meta[META_KEY], path, tensors=len(names))
        if OBJECT_GRAPH_KEY in header_meta:
            meta.check_metadata_size(len(header_meta[OBJECT_GRAPH_KEY]) * 3 // 4, path, "the stored TF2 object graph")
            try:
                self._extras[OBJECT_GRAPH] = base64.b64decode(header_meta[OBJECT_GRAPH_KEY], validate=True)
            except ValueError:
                raise CorruptError(f"{path}: the stored TF2 object graph is not valid base64; the archive is damaged") from None
        records = self._meta.get("tensors", {})
        specs: dict[str, TensorSpec] = {}
        for name in names:
            meta.check_tensor_name(name, path)
            sl = self._f.get_slice(name)
            st_dtype = str(sl.get_dtype())
            dtype = FROM_ST.get(st_dtype)
            if dtype is None:
                raise FormatError(f"{path}: tensor {name!r} has dtype {st_dtype}, which ckptbridge does not carry "
                                  f"(it carries {', '.join(sorted(FROM_ST))})")
            shape = tuple(int(x) for x in sl.get_shape())
            spec = TensorSpec(name, dtype, shape)
            if max_tensor_bytes is not None and spec.nbytes > max_tensor_bytes:
                raise UnsafeArchiveError(f"{path}: tensor {name!r} claims {spec.nbytes} bytes, over the limit of {max_tensor_bytes}; "
                                         f"raise {option('max_tensor_bytes')} if it is genuine")
            rec = records.get(name)
            if rec is not None and (not isinstance(rec, dict) or type(rec.get("crc32c")) is not int):
                raise CorruptError(f"{path}: tensor {name!r}: metadata record is malformed; the archive is damaged")
            if rec is not None and (rec.get("dtype") != dtype or meta.check_shape(rec.get("shape", ()), f"{path}: tensor {name!r}") != shape):
                raise CorruptError(f"{path}: tensor {name!r} is {dtype}{list(shape)} "
                                   f"but the metadata says {rec.get('dtype')}{rec.get('shape')}; the archive is damaged")

            specs[name] = spec
        missing = sorted(set(records) - set(specs))
        if missing:
            raise CorruptError(f"{path}: metadata lists tensors that are not in the archive: {', '.join(missing[:5])}; the archive is incomplete")
        self._specs = specs

    def read(self, name: str) -> np.ndarray:
        spec = self.spec(name)
        where = f"{self.path}: tensor {name!r}"
        want = numpy_dtype(spec.dtype)  # first, so NumPy (and safe_open) know "bfloat16": it imports ml_dtypes for such a tensor
        try:
            if spec.dtype in _RAW_READ:
                arr = self._read_raw(name, spec)
            else:
                arr = np.asarray(self._f.get_tensor(name))
        except CkptBridgeError:
            raise
        except Exception as e:  # the package raises its own error types and OSError
            raise CorruptError(f"{where}: cannot read ({e}); the archive is damaged") from None
        if arr.dtype != want:
            if arr.dtype.itemsize != want.itemsize:
                raise CorruptError(f"{where}: read as {arr.dtype}, expected {spec.dtype}")
            arr = arr.view(want)  # e.g. bfloat16 handed back as raw 2-byte values
        if tuple(arr.shape) != spec.shape:
            raise CorruptError(f"{where}: read with shape {list(arr.shape)}, expected {list(spec.shape)}")
        arr = np.require(as_exchange_array(arr), requirements="C")
        rec = self._meta.get("tensors", {}).get(name)
        if rec is not None and self._verify and meta.checksum(arr.view(np.uint16) if spec.dtype == BFLOAT16 else arr) != int(rec["crc32c"]):
            raise CorruptError(f"{where}: checksum mismatch (crc32c), the stored bytes are damaged; restore the archive from a good copy")
        return arr

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        """Stream a tensor as views of the mapped file, released block by block (``io.chunks.mmap_blocks``).

        The format stores every tensor as little-endian C-order bytes at the offsets its header gives, so
        where the archive records the tensor's crc32c the stream may be moved unread (its ``span``: the
        kernel copies it, and the read-back is its check).  Before this, every tensor was read whole
        through ``safe_open`` and checksummed there, again by the sink and by the read-back: three reads
        and the whole tensor in memory.  None where :meth:`read` must do it (a big-endian machine, an
        empty tensor, a range the header does not give as exactly the tensor's bytes)."""
        spec = self._specs.get(name)
        if spec is None or sys.byteorder != "little" or spec.nbytes == 0:
            return None
        found = self._byte_ranges().get(name)
        mapped = self._mapped()
        if found is None or mapped is None or self._file is None or found[1] > len(mapped):
            return None
        begin = found[0]
        blocks = mmap_blocks(mapped, begin, spec, numpy_dtype(spec.dtype), chunk_bytes)
        rec = self._meta.get("tensors", {}).get(name)
        if rec is None or not self._verify:
            return BlockStream(spec, blocks, span=(self._file.fileno(), begin))
        stored_crc = int(rec["crc32c"])  # the record of the stored bytes (bfloat16: its bits), which these are
        where = f"{self.path}: tensor {name!r}"

        def check(c: int) -> None:
            if c != stored_crc:
                raise CorruptError(f"{where}: checksum mismatch (crc32c), the stored bytes are damaged; restore the archive from a good copy")

        return BlockStream(spec, blocks, check, span=(self._file.fileno(), begin), stored=stored_crc)

    def _mapped(self) -> mmap.mmap | None:
        if self._map is None:
            try:
                self._file = open(self.path, "rb")
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # ValueError: an empty file cannot be mapped (nor is it a .safetensors)
                return None
        return self._map

    def _read_raw(self, name: str, spec: TensorSpec) -> np.ndarray:
        """A tensor of a dtype the safetensors package cannot hand to NumPy (float8), read from its byte range."""
        where = f"{self.path}: tensor {name!r}"
        begin, end = self._byte_ranges().get(name, (0, -1))
        if end - begin != spec.nbytes or begin < 0:
            raise CorruptError(f"{where}: its byte range does not match its {spec.describe()}; the archive is damaged")
        with open(self.path, "rb") as f:
            f.seek(begin)
            raw = f.read(end - begin)
        if len(raw) != spec.nbytes:
            raise CorruptError(f"{where}: the file ends inside its bytes; the archive is truncated")
        return np.frombuffer(raw, dtype=numpy_dtype(spec.dtype)).reshape(spec.shape)

    def _byte_ranges(self) -> dict[str, tuple[int, int]]:
        """(first byte, end) in the file of every tensor whose header entry gives exactly its spec's bytes: the
        header parsed once (it may hold 100 MB of entries), not once per tensor.  ``safe_open`` checked it already;
        a tensor left out here is read by :meth:`read`, whose errors name the damage."""
        if self._ranges is not None:
            return self._ranges
        import struct

        self._ranges = {}
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n)) if n <= _MAX_HEADER else {}
        except (OSError, ValueError, struct.error):
            return self._ranges
        if not isinstance(header, dict):
            return self._ranges
        for name, spec in self._specs.items():
            entry = header.get(name)
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets) and 0 <= offsets[0]
                    and offsets[1] - offsets[0] == spec.nbytes):
                self._ranges[name] = (8 + n + offsets[0], 8 + n + offsets[1])
        return self._ranges

    def close(self) -> None:
        self._map = None  # views handed out keep the map alive; we drop our reference
        mapped_file = getattr(self, "_file", None)
        if mapped_file is not None:
            self._file = None
            mapped_file.close()
        f = getattr(self, "_f", None)
        if f is not None:
            self._f = None
            try:
                f.__exit__(None, None, None)
            except Exception:
                pass


SafetensorsSink.source_class = SafetensorsSource
