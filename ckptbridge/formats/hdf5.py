"""HDF5 (``.h5``, ``.hdf5``): one dataset per tensor at its checkpoint path.

``f["vgg_16/conv1/conv1_1/weights"]`` works in plain h5py.  HDF5 cannot hold
a dataset and a group at one path, so when a name is also the prefix of
another (``w`` and ``w/ExponentialMovingAverage``) the shorter one is stored at
``w/__value__``; names that are not valid HDF5 paths go under
``/.ckptbridge/escaped/``.  Every dataset carries its true name and dtype as
attributes, and readers go by those, never by the path.
"""

from __future__ import annotations

import io
import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _dtypes
from .._source import OBJECT_GRAPH, ArchiveSink, ArchiveSource, Encoded
from ..errors import CkptBridgeError, CorruptError, FormatError, UnsafeArchiveError, option
from ..io.atomic import AtomicFile
from ..io.chunks import BlockStream, Selection, block_shape, c_blocks, mmap_blocks, write_stream
from ..io.signals import raise_signals_after
from ..spec import STRING, TensorSpec, as_exchange_array, dtype_name, numpy_dtype
from . import meta
from ._guarded import checks_writes, open_guarded

META_GROUP = ".ckptbridge"
META_DATASET = META_GROUP + "/metadata"
OBJECT_GRAPH_DATASET = META_GROUP + "/object_graph"
ESCAPED_GROUP = META_GROUP + "/escaped"
SELF = "__value__"
ATTR_NAME = "ckptbridge_name"
ATTR_DTYPE = "ckptbridge_dtype"


def _natural_path(name: str) -> str | None:
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == META_GROUP or "\x00" in name:
        return None
    return name


def _raw_dcpl() -> Any:
    """Creation properties of a dataset whose bytes we place ourselves: contiguous,
    its file space allocated at creation, and no fill value ever written."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


class Hdf5Sink(ArchiveSink):
    """Writes one dataset per tensor into a temporary HDF5 file; commit renames it."""

    streams = True

    def __init__(self, path: str, *, compress: bool = False, force: bool = False, source: str | None = None) -> None:
        import h5py

        super().__init__(path, AtomicFile(path, force=force))
        # Through a guarded file object: HDF5 crashes on close after a failed write (see _guarded.GuardedFile).
        try:
            with raise_signals_after():  # HDF5 must not be interrupted half-way through creating the file
                self._f = h5py.File(open_guarded(self._out), "w")
        except BaseException:
            f = getattr(self, "_f", None)
            if f is not None:
                f.close()
            self._out.abort()
            raise
        self._compress = compress
        self._paths: dict[str, str] = {}
        self._placed: dict[str, str] = {}
        self._source = source
        self._escaped = 0

    def begin(self, specs: list[TensorSpec]) -> None:
        for s in specs:  # refused before the first dataset is created
            _check_writable(s.name, len(s.shape), self.path)
        names = {s.name for s in specs}
        prefixes = set()
        for n in names:
            parts = n.split("/")
            for i in range(1, len(parts)):
                prefixes.add("/".join(parts[:i]))
        for n in sorted(names):
            p = _natural_path(n)
            if p is not None and n in prefixes:
                p = n + "/" + SELF
            self._paths[n] = p if p is not None else ""

    def _place(self, name: str) -> str:
        p = self._paths.get(name)
        if p is None:
            p = _natural_path(name) or ""
        if p:
            # A path already taken by a group or dataset (or below a dataset) falls back to the escape area.
            parts = p.split("/")
            clash = p in self._f
            for i in range(1, len(parts)):
                head = "/".join(parts[:i])
                if head in self._f and not isinstance(self._f[head], self._group_type):
                    clash = True
                    break
            if not clash:
                return p
        self._escaped += 1
        return f"{ESCAPED_GROUP}/{self._escaped}"

    @property
    def _group_type(self) -> type:
        import h5py

        group: type = h5py.Group  # h5py has no stubs: its classes reach here as Any
        return group

    def record_extra(self, name: str) -> dict[str, Any]:
        return {"path": self._placed[name]}

    @checks_writes
    def put(self, tensor: Encoded) -> None:
        _check_writable(tensor.name, len(tensor.shape), self.path)
        stored = tensor.stored
        path = self._placed[tensor.name] = self._place(tensor.name)
        kwargs: dict[str, Any] = {}
        if self._compress and stored.size > 0 and stored.ndim > 0:
            kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True, "chunks": True}
        ds = self._f.create_dataset(path, data=stored, **kwargs)
        ds.attrs[ATTR_NAME] = tensor.name
        ds.attrs[ATTR_DTYPE] = tensor.dtype

    @checks_writes
    def put_blocks(self, name: str, stream: BlockStream) -> None:
        """Stream a numeric tensor into its dataset hyperslab by hyperslab (never whole in memory)."""
        spec = stream.spec
        _check_writable(name, len(spec.shape), self.path)
        stored = _dtypes.lookup(spec.dtype).storage
        if stored is None:  # a dtype ckptbridge does not carry is refused before any sink sees it
            raise FormatError(f"{self.path}: tensor {name!r} has dtype {spec.dtype}, which ckptbridge does not carry")
        path = self._placed[name] = self._place(name)
        kwargs: dict[str, Any] = {}
        if self._compress and spec.size > 0 and spec.shape:
            kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True, "chunks": True}
        if not kwargs and spec.shape and spec.size:
            # Allocated now and never filled: the bytes go straight to the dataset's place in
            # the file, copied by the kernel where the source is a file (see io.chunks.write_stream).
            # (h5py ignores these properties for scalars, which take the other path.)
            ds = self._f.create_dataset(path, shape=spec.shape, dtype=stored, dcpl=_raw_dcpl())
            offset = ds.id.get_offset()
            if offset is None:
                self._write_hyperslabs(ds, stream, stored)
            else:
                write_stream(stream, self._out.fileno(), offset)
        else:
            ds = self._f.create_dataset(path, shape=spec.shape, dtype=stored, **kwargs)
            self._write_hyperslabs(ds, stream, stored)
        ds.attrs[ATTR_NAME] = name
        ds.attrs[ATTR_DTYPE] = spec.dtype

    @staticmethod
    def _write_hyperslabs(ds: Any, stream: BlockStream, stored: np.dtype) -> None:
        spec = stream.spec
        for sel, arr in stream:
            block = arr.view(stored).reshape(block_shape(spec.shape, sel))
            if sel:
                ds.write_direct(block, dest_sel=sel)
            else:
                ds[()] = block

    @checks_writes
    def write_extra(self, key: str, payload: bytes) -> None:
        if key == OBJECT_GRAPH:
            self._f.create_dataset(OBJECT_GRAPH_DATASET, data=np.frombuffer(payload, dtype=np.uint8))

    @checks_writes
    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        doc = meta.provenance(self._source, metadata)
        doc["tensors"] = self._records
        self._f.create_dataset(META_DATASET, data=np.frombuffer(meta.dumps(doc), dtype=np.uint8))
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass
        self._out.abort()


class Hdf5Source(ArchiveSource):
    """A lazy view of an HDF5 file: datasets are listed up front, read on demand."""

    kind = "hdf5"
    _map: mmap.mmap | None = None  # mapped on the first stream that can use it (see _mapped)
    _map_file: io.BufferedReader | None = None

    def __init__(self, path: str, *, verify: bool = True, max_tensor_bytes: int | None = None, allow_internal_links: bool = True) -> None:

        import h5py

        self.path = path
        self._verify = verify
        try:
            self._f = h5py.File(path, "r")
        except (OSError, ValueError) as e:
            raise CorruptError(f"{path} is not a readable HDF5 file ({e}); check that the file is complete") from None
        try:
            self._load(max_tensor_bytes, allow_internal_links)
        except CkptBridgeError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            self.close()
            raise CorruptError(f"{path}: damaged HDF5 file ({e}); check that the file is complete") from None

    def _load(self, max_tensor_bytes: int | None, allow_internal_links: bool) -> None:
        import os

        import h5py

        path = self.path
        f = self._f
        self._meta: dict[str, Any] = {}
        self._extras: dict[str, bytes] = {}
        fsize = os.path.getsize(path)
        datasets: dict[str, str] = {}
        own: dict[str, Any] = {}  # ckptbridge's metadata / object graph datasets, checked like tensors
        seen: dict[int, str] = {}  # object address -> the one path it may be reached by
        spans: list[tuple[int, int, str]] = []  # file bytes each dataset's storage claims
        vlen: list[tuple[Any, str]] = []
        soft: list[tuple[str, str, Any]] = []

        def visit(group: Any, prefix: str) -> None:
            for key in group:
                full = f"{prefix}/{key}" if prefix else key
                link = group.get(key, getlink=True)
                if _is_soft_link(link, full, path, allow_internal_links):
                    soft.append((full, link.path, group))
                    continue  # the target is listed (and checked) under its own path
                if prefix == META_GROUP and full not in (ESCAPED_GROUP, META_DATASET, OBJECT_GRAPH_DATASET):
                    continue  # not ours to read
                try:
                    obj = group[key]
                except (OSError, ValueError, KeyError, RuntimeError) as e:
                    raise CorruptError(f"{path}: cannot open {full!r} ({e}); the archive is damaged or crafted") from None
                addr = h5py.h5o.get_info(obj.id).addr
                if addr in seen:
                    raise UnsafeArchiveError(f"{path}: {full!r} is a second name (hard link) for {seen[addr]!r}; "
                                             "refusing an archive that shows one object under two names")
                seen[addr] = full
                if isinstance(obj, h5py.Group):
                    visit(obj, full)
                elif isinstance(obj, h5py.Dataset):
                    self._check_dataset(obj, full, fsize, max_tensor_bytes, spans)
                    if h5py.check_vlen_dtype(obj.dtype) is not None:  # not object references: refused as no tensor
                        vlen.append((obj, full))
                    if full in (META_DATASET, OBJECT_GRAPH_DATASET):
                        own[full] = obj
                        continue
                    name = _tensor_name(obj, full, path)
                    if name in datasets:
                        raise CorruptError(f"{path}: two datasets ({datasets[name]!r}, {full!r}) both claim tensor name {name!r}; "
                                           "refusing an ambiguous archive")
                    datasets[name] = full

        visit(f, "")
        self._objects = len(seen)  # groups and datasets: what documents about the file may scale with
        _check_spans(spans, path)
        heap_refs = [self._check_vlen(ds, full, fsize, max_tensor_bytes) for ds, full in vlen]
        _check_heap_refs(heap_refs, path)
        for full, target, group in soft:
            _resolve_soft(f, group, target, full, path)
        self._read_own(own, len(datasets))
        self._datasets = datasets
        self._specs = self._dataset_specs(datasets, max_tensor_bytes)

    def _read_own(self, own: dict[str, Any], tensors: int) -> None:
        """ckptbridge's metadata and the stored object graph, checked as blobs and read."""
        path = self.path
        for key, obj in own.items():
            if obj.dtype != np.uint8 or obj.ndim != 1:
                raise CorruptError(f"{path}: {key!r} is {obj.dtype}{list(obj.shape)}, expected a 1-d uint8 blob; the archive is damaged")
            what = "ckptbridge metadata" if key == META_DATASET else "the stored TF2 object graph"
            meta.check_metadata_size(int(obj.shape[0]), f"{path}: {key!r}", what, objects=tensors if key == META_DATASET else 0)
            raw = np.asarray(obj[()]).tobytes()
            if key == META_DATASET:
                self._meta = meta.loads(raw, path, tensors=tensors)
            else:
                self._extras[OBJECT_GRAPH] = raw

    def _dataset_specs(self, datasets: dict[str, str], max_tensor_bytes: int | None) -> dict[str, TensorSpec]:
        """Each tensor's spec: from the metadata's record where there is one, else from its dataset."""
        path = self.path
        f = self._f
        records = self._meta.get("tensors", {})
        if self._meta:
            missing = sorted(set(records) - set(datasets))
            if missing:
                raise CorruptError(f"{path}: metadata lists tensors that are not in the archive: {', '.join(missing[:5])}; "
                                   "the archive is incomplete")
        specs = {}
        for name in sorted(datasets):
            ds = f[datasets[name]]
            rec = records.get(name)
            if rec is not None:
                dtype, shape = meta.record_spec(name, rec, ds.dtype, tuple(int(x) for x in ds.shape), f"{path}: tensor {name!r}")
                specs[name] = TensorSpec(name, dtype, shape, stored_nbytes=int(ds.shape[0]) if dtype == STRING else None)
                if dtype == STRING:  # n lengths then the bytes, read as n bytes objects
                    n = specs[name].size
                    meta.check_in_memory(n, int(ds.shape[0]) - 8 * n, ds.id.get_storage_size(), f"{path}: tensor {name!r}", max_tensor_bytes,
                                         strings=True)
            else:
                specs[name] = TensorSpec(name, _plain_dtype(ds, path, datasets[name]), tuple(int(x) for x in ds.shape))
        return specs


    def _check_dataset(self, ds: Any, full: str, fsize: int, max_tensor_bytes: int | None, spans: list[tuple[int, int, str]]) -> None:
        """Refuse, before any value is read, a dataset whose bytes live outside the
        archive or that would expand far beyond the bytes stored for it.  The file
        bytes its storage claims are added to ``spans`` (see :func:`_check_spans`)."""
        import h5py

        path = self.path
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            n = dcpl.get_virtual_count()
            srcs = [f"{_text(dcpl.get_virtual_filename(i))}:{_text(dcpl.get_virtual_dsetname(i))}" for i in range(min(n, 3))]
            more = f" and {n - 3} more" if n > 3 else ""
            raise UnsafeArchiveError(f"{path}: dataset {full!r} is a virtual dataset mapping {', '.join(srcs)}{more}; "
                                     "ckptbridge reads only data stored inside the archive")
        if dcpl.get_external_count() > 0:
            target = _text(dcpl.get_external(0)[0])
            raise UnsafeArchiveError(f"{path}: dataset {full!r} stores its data in external file {target!r}; "
                                     "ckptbridge reads only data stored inside the archive")
        for i in range(dcpl.get_nfilters()):
            code, _flags, _opts, fname = dcpl.get_filter(i)
            if code not in _FILTERS:
                what = f"HDF5 filter {_text(fname)!r}" if _text(fname) else "an unknown HDF5 filter"
                raise UnsafeArchiveError(f"{path}: dataset {full!r} uses {what} (id {code}), which ckptbridge does not read from archives; "
                                         "re-save it with gzip, lzf or no compression")
        if ds.shape is None:
            raise FormatError(f"{path}: dataset {full!r} has no shape (an empty dataspace); not a tensor")
        meta.check_shape(list(ds.shape), f"{path}: dataset {full!r}")
        need = int(np.prod(ds.shape, dtype=object)) * ds.dtype.itemsize if ds.shape else ds.dtype.itemsize
        if max_tensor_bytes is not None and need > max_tensor_bytes:
            raise UnsafeArchiveError(f"{path}: dataset {full!r} claims {need} bytes, over the limit of {max_tensor_bytes}; "
                                     f"raise {option('max_tensor_bytes')} if it is genuine")
        # The chunk index is untrusted: its entries are counted one by one against the file,
        # and entries sharing bytes are refused by _check_spans (get_storage_size() would
        # count one chunk once per entry that points at it).
        stored = _chunk_bytes(ds, full, fsize, path, spans) if layout == h5py.h5d.CHUNKED else ds.id.get_storage_size()
        offset = ds.id.get_offset() if layout == h5py.h5d.CONTIGUOUS else None
        # Variable-length strings store a heap reference per element (16 bytes, not
        # the 8 of a Python object pointer); their heap objects are checked by _check_vlen.
        vlen = ds.dtype.kind == "O" or h5py.check_vlen_dtype(ds.dtype) is not None
        if offset is not None:
            if (stored != need and not vlen) or offset + stored > fsize:
                raise CorruptError(f"{path}: dataset {full!r} claims {need} bytes at offset {offset} ({stored} stored) but the file has {fsize}; "
                                   "the archive is damaged or crafted")
            spans.append((offset, offset + stored, full))
        elif layout != h5py.h5d.COMPACT and need > _MAX_EXPANSION * stored + _EXPANSION_SLACK:
            # Unwritten storage reads as the fill value and gzip cannot expand more
            # than ~1032:1, so a small file claiming a huge dataset is a memory bomb.
            raise UnsafeArchiveError(f"{path}: dataset {full!r} claims {need} bytes but only {stored} are stored in the file "
                                     "(unwritten chunks or an impossible compression ratio); refusing what looks like a memory bomb")
        if ds.dtype.kind == "S":  # fixed-width strings: read as one bytes object per element
            meta.check_in_memory(need // ds.dtype.itemsize, need, need if layout == h5py.h5d.COMPACT else stored, f"{path}: dataset {full!r}",
                                 max_tensor_bytes, strings=True)

    def _check_vlen(self, ds: Any, full: str, fsize: int, max_tensor_bytes: int | None) -> np.ndarray:
        """Refuse a variable-length dataset whose elements, once read, would take more
        memory than the file holds: each element is a reference (length, heap
        collection, index) to a heap object, and references are read from the file
        without following them.  Returns the (collection, index) pairs of its non-empty
        elements, which must be distinct across the file (see :func:`_check_heap_refs`)."""
        import h5py

        path = self.path
        where = f"{path}: dataset {full!r}"
        n = int(np.prod(ds.shape, dtype=object)) if ds.shape else 1
        none = np.empty((0, 2), dtype=np.uint64)
        if n == 0:
            return none
        base = h5py.check_vlen_dtype(ds.dtype)
        unit = 1 if base in (None, bytes, str) else np.dtype(base).itemsize  # a vlen string's length is in bytes
        addr_size = ds.file.id.get_create_plist().get_sizes()[0]
        rec = np.dtype([("len", "<u4"), ("addr", f"<u{addr_size}"), ("idx", "<u4")]) if addr_size in (2, 4, 8) else None
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        codes = {dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())}
        if rec is None or layout == h5py.h5d.COMPACT or not codes <= _VLEN_FILTERS:
            # References we cannot read ourselves (compact: at most 64 KiB of them; lzf, szip):
            # the elements are read one at a time, and no further than the file's size.
            if n > _MAX_VLEN_ONE_BY_ONE:
                raise UnsafeArchiveError(f"{where}: {n} variable-length elements stored in a way ckptbridge reads only one by one "
                                         f"(at most {_MAX_VLEN_ONE_BY_ONE}); re-save it with gzip or no compression")
            total = 0
            for i in range(n):
                v = ds[np.unravel_index(i, ds.shape)] if ds.shape else ds[()]
                total += len(v) if isinstance(v, (bytes, str, np.ndarray)) else 0
                if total > fsize:
                    raise UnsafeArchiveError(f"{where}: its variable-length elements hold more bytes than the whole file ({fsize}); "
                                             "refusing a crafted archive whose elements share heap objects")
            meta.check_in_memory(n, total, fsize, where, max_tensor_bytes, strings=True)
            return none
        if layout == h5py.h5d.CONTIGUOUS:
            offset = ds.id.get_offset()
            if offset is None:
                return none  # never written: every element is the (empty) fill value
            with open(path, "rb") as fh:
                fh.seek(offset)
                raw = fh.read(n * rec.itemsize)
            refs = [np.frombuffer(raw, dtype=rec)] if len(raw) == n * rec.itemsize else None
            if refs is None:
                raise CorruptError(f"{where}: its {n} references are not all in the file; the archive is damaged or crafted")
        else:
            refs = list(_chunk_refs(ds, dcpl, rec, where))
        refs_all = np.concatenate(refs) if refs else np.empty(0, dtype=rec)
        used = refs_all[refs_all["len"] > 0]
        total = int(used["len"].astype(np.uint64).sum()) * unit
        pairs = np.stack([used["addr"].astype(np.uint64), used["idx"].astype(np.uint64)], axis=1)
        if total > fsize:
            raise UnsafeArchiveError(f"{where}: its variable-length elements claim {total} bytes, more than the whole file ({fsize}); "
                                     "refusing a crafted archive whose elements share heap objects")
        meta.check_in_memory(n, total, total + n * rec.itemsize, where, max_tensor_bytes, strings=True)
        return pairs

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        """Stream a numeric dataset hyperslab by hyperslab into one reusable buffer; its
        crc32c record is checked at the end.  None where :meth:`read` must do it."""
        spec = self._specs.get(name)
        if spec is None or spec.dtype == STRING or self._f is None:
            return None
        ds = self._f[self._datasets[name]]
        if ds.shape is None or tuple(ds.shape) != spec.shape:
            return None
        want = numpy_dtype(spec.dtype)
        stored = want
        rec = self._meta.get("tensors", {}).get(name)
        if rec is not None:
            d = _dtypes.lookup(spec.dtype)
            if rec.get("encoding", meta.ENC_RAW) != d.encoding or d.storage is None:
                return None
            stored = d.storage
        if ds.dtype != stored:
            return None
        where = f"{self.path}: tensor {name!r}"
        check = None
        if rec is not None and self._verify:
            stored_crc = int(rec["crc32c"])

            def check(c: int) -> None:
                if c != stored_crc:
                    raise CorruptError(f"{where}: checksum mismatch (crc32c), the stored bytes are damaged; restore the archive from a good copy")

        # A contiguous dataset is plain C-order bytes at one offset of the file: map it
        # instead of copying it through HDF5 (this is most of the read-back's time).
        offset = ds.id.get_offset() if ds.chunks is None and spec.size else None
        if offset is not None:
            mapped = self._mapped()
            mapped_file = self._map_file
            if mapped is not None and mapped_file is not None and offset + spec.size * stored.itemsize <= len(mapped):
                views = ((sel, a.view(want)) for sel, a in mmap_blocks(mapped, offset, spec, stored, chunk_bytes))
                return BlockStream(spec, views, check, span=(mapped_file.fileno(), offset),
                                   stored=int(rec["crc32c"]) if check is not None and rec is not None else None)

        def blocks() -> Iterator[tuple[Selection, np.ndarray]]:
            total = spec.size
            buf = np.empty(min(total, max(1, chunk_bytes // stored.itemsize)), dtype=stored)
            for _, n, sel in c_blocks(spec.shape, stored.itemsize, chunk_bytes):
                out = buf[:n].reshape(block_shape(spec.shape, sel))
                try:
                    if sel:
                        ds.read_direct(out, source_sel=sel)
                    else:
                        out[()] = ds[()]
                except (OSError, ValueError, RuntimeError) as e:
                    raise CorruptError(f"{where}: cannot read ({e}); the archive is damaged") from None
                yield sel, buf[:n].view(want)

        return BlockStream(spec, blocks(), check)

    def _mapped(self) -> mmap.mmap | None:
        if self._map is None:
            try:
                f = open(self.path, "rb")
            except OSError:
                return None
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                f.close()
                return None
            self._map_file = f  # kept open: streams copy from its descriptor
        return self._map

    def read(self, name: str) -> np.ndarray:
        spec = self.spec(name)
        where = f"{self.path}: tensor {name!r}"
        ds = self._f[self._datasets[name]]
        try:
            raw = ds[()]
        except (OSError, ValueError, RuntimeError) as e:
            raise CorruptError(f"{where}: cannot read ({e}); the archive is damaged") from None
        raw = np.asarray(raw) if not isinstance(raw, np.ndarray) else raw
        rec = self._meta.get("tensors", {}).get(name)
        if rec is None:
            return _plain_array(raw, ds)
        if self._verify and meta.checksum(raw) != int(rec["crc32c"]):
            raise CorruptError(f"{where}: checksum mismatch (crc32c), the stored bytes are damaged; restore the archive from a good copy")
        return meta.decode(raw, spec.dtype, spec.shape, rec.get("encoding", meta.ENC_RAW), where)

    def close(self) -> None:
        self._map = None  # views handed out keep the map alive
        mf = self._map_file
        if mf is not None:
            mf.close()
            self._map_file = None
        f = getattr(self, "_f", None)
        if f is not None:
            try:
                f.close()
            finally:
                self._f = None


# Filters every HDF5 build (or h5py itself, for lzf) provides, and whose expansion
# is bounded; anything else (plugins, codecs we do not know) is refused.
_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset", 32000: "lzf"}
# A dataset may claim at most this many times the bytes stored for it, plus a
# little: deflate's own limit is about 1032:1.
_MAX_EXPANSION = 1100
_EXPANSION_SLACK = 16 << 20
# HDF5 follows at most 16 soft links in a row; so do we.
_MAX_SOFT_HOPS = 16
# H5S_MAX_RANK: HDF5 cannot create a dataspace of more dimensions.
# Filters whose output _unfilter undoes, to read variable-length references itself.
_VLEN_FILTERS = {1, 2, 3}
# Past this, elements read one by one (see _check_vlen) would take more than a few seconds.
_MAX_VLEN_ONE_BY_ONE = 1 << 16
_MAX_RANK = 32


def _check_writable(name: str, ndim: int, path: str) -> None:
    """Refuse, before it is created, a dataset HDF5 (or our reader) cannot hold."""
    meta.check_name_to_write(name, path)
    if ndim > _MAX_RANK:
        raise FormatError(f"tensor {meta.shown_name(name)} has {ndim} dimensions but HDF5 stores at most {_MAX_RANK}, "
                          f"so it cannot be written to {path}; export it to .npz or .safetensors, or leave it out ({option('exclude')})")


def _chunk_infos(ds: Any) -> list[Any]:
    """What the chunk index says of each stored chunk (offset, filter mask, address, size)."""
    infos: list[Any] = []
    try:
        ds.id.chunk_iter(infos.append)
    except (AttributeError, NotImplementedError):  # HDF5 before 1.12.3: one lookup per chunk
        infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    return infos


def _chunk_bytes(ds: Any, full: str, fsize: int, path: str, spans: list[tuple[int, int, str]]) -> int:
    """Bytes the chunk index claims for a chunked dataset, each chunk checked to lie in the
    file and its span recorded (chunks sharing bytes are refused by :func:`_check_spans`)."""
    total = 0
    for info in _chunk_infos(ds):
        if info.byte_offset is None or info.size is None:
            continue
        if info.byte_offset + info.size > fsize:
            raise CorruptError(f"{path}: dataset {full!r} has a chunk at offset {info.byte_offset} ({info.size} bytes) past the end of the file "
                               f"({fsize}); the archive is damaged or crafted")
        spans.append((info.byte_offset, info.byte_offset + info.size, full))
        total += info.size
    return total


def _check_spans(spans: list[tuple[int, int, str]], path: str) -> None:
    """Refuse storage that two datasets, or two chunks of one, share: a file HDF5 writes
    stores every chunk once, and sharing is how a small file expands into a huge one."""
    spans.sort()
    prev: tuple[int, int, str] | None = None
    for span in spans:
        if span[0] == span[1]:
            continue
        if prev is not None and span[0] < prev[1]:
            if prev[2] == span[2]:
                raise UnsafeArchiveError(f"{path}: dataset {span[2]!r} names the same stored bytes (offset {span[0]}) for more than one chunk; "
                                         "refusing a crafted archive whose chunk index repeats its data")
            raise UnsafeArchiveError(f"{path}: datasets {prev[2]!r} and {span[2]!r} share stored bytes (offset {span[0]}); "
                                     "refusing a crafted archive")
        if prev is None or span[1] > prev[1]:
            prev = span


def _unfilter(data: bytes, filters: list[tuple[int, Any]], mask: int, size: int, where: str) -> bytes:
    """Undo a chunk's filters (the ones we can: gzip, shuffle, fletcher32), never producing more than ``size`` bytes."""
    import zlib

    for i in reversed(range(len(filters))):
        if mask & (1 << i):
            continue
        code, opts = filters[i]
        if code == 1:
            d = zlib.decompressobj()
            try:
                out = d.decompress(data, size)
            except zlib.error as e:
                raise CorruptError(f"{where}: a chunk does not decompress ({e}); the archive is damaged") from None
            if d.unconsumed_tail:
                raise UnsafeArchiveError(f"{where}: a chunk decompresses to more than its {size} bytes; the archive is damaged or crafted")
            data = out
        elif code == 2:
            es = int(opts[0]) if opts else 1
            k = len(data) // es if es > 0 else 0
            if es > 1 and k > 1:
                data = np.frombuffer(data[: k * es], np.uint8).reshape(es, k).T.tobytes() + data[k * es :]
        elif code == 3:
            data = data[:-4]
        else:
            name = _FILTERS.get(code, f"filter {code}")
            raise UnsafeArchiveError(f"{where}: variable-length data compressed with {name} is not read from archives; "
                                     "re-save it with gzip or no compression")
    return data


def _chunk_refs(ds: Any, dcpl: Any, rec: np.dtype, where: str) -> Any:
    """The heap references stored in each chunk of a chunked variable-length dataset."""
    filters = [(c, o) for c, _f, o, _n in (dcpl.get_filter(i) for i in range(dcpl.get_nfilters()))]
    size = int(np.prod(ds.chunks)) * rec.itemsize
    for info in _chunk_infos(ds):
        if info.byte_offset is None:
            continue
        try:
            mask, data = ds.id.read_direct_chunk(info.chunk_offset)
        except (OSError, ValueError, RuntimeError) as e:
            raise CorruptError(f"{where}: cannot read a chunk ({e}); the archive is damaged") from None
        data = _unfilter(bytes(data), filters, mask, size, where)
        if len(data) != size:
            raise CorruptError(f"{where}: a chunk holds {len(data)} bytes of references, expected {size}; the archive is damaged or crafted")
        yield np.frombuffer(data, dtype=rec)


def _check_heap_refs(refs: list[np.ndarray], path: str) -> None:
    """Refuse variable-length elements that share a heap object: HDF5 stores every
    element's bytes once, and sharing is how a small file expands into a huge one."""
    pairs = np.concatenate(refs) if refs else np.empty((0, 2), dtype=np.uint64)
    if len(pairs) < 2:
        return
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    s = pairs[order]
    dup = np.flatnonzero((s[1:] == s[:-1]).all(axis=1))
    if dup.size:
        raise UnsafeArchiveError(f"{path}: {dup.size} variable-length string elements point at heap objects that other elements already use; "
                                 "refusing a crafted archive (HDF5 stores every element once)")


def _is_soft_link(link: Any, full: str, path: str, allow_internal_links: bool) -> bool:
    """Whether a link is a soft link (allowed where ``allow_internal_links``); refuse a link out of the file or of a user-defined kind."""
    import h5py

    if isinstance(link, h5py.ExternalLink):
        raise UnsafeArchiveError(f"{path}: {full!r} is an external link to {link.filename}:{link.path}; "
                                 "ckptbridge reads only data stored inside the archive")
    if isinstance(link, h5py.SoftLink):
        if not allow_internal_links:
            raise UnsafeArchiveError(f"{path}: {full!r} is a soft link to {link.path}; links are not allowed")
        return True
    if not isinstance(link, h5py.HardLink):
        raise UnsafeArchiveError(f"{path}: {full!r} is a user-defined HDF5 link; ckptbridge reads only data stored inside the archive")
    return False


def _text(v: Any) -> str:

    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _tensor_name(obj: Any, full: str, path: str) -> str:
    """The tensor name a dataset carries (its ckptbridge_name attribute, else its path)."""
    import h5py

    if ATTR_NAME not in obj.attrs:
        name = full
    else:
        aid = h5py.h5a.open(obj.id, ATTR_NAME.encode())
        if aid.shape != () or aid.dtype.kind not in "OSU":
            raise CorruptError(f"{path}: dataset {full!r} has a {ATTR_NAME} attribute that is not one string; the archive is damaged")
        raw = obj.attrs[ATTR_NAME]
        name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)
    meta.check_tensor_name(name, f"{path}: dataset {full!r}")
    return name


def _resolve_soft(f: Any, group: Any, target: str, full: str, path: str) -> None:
    """Check that a soft link resolves inside the file, without following any
    external link on the way; refuse it otherwise."""
    import h5py

    hops = 0
    parts = [p for p in target.split("/") if p not in ("", ".")]
    node = f if target.startswith("/") else group
    while parts:
        key = parts.pop(0)
        link = node.get(key, getlink=True) if isinstance(node, h5py.Group) else None
        if link is None:
            raise UnsafeArchiveError(f"{path}: {full!r} is a soft link to {target!r}, which does not exist in the file (dangling); "
                                     "refusing the archive")
        if isinstance(link, h5py.SoftLink):
            hops += 1
            if hops > _MAX_SOFT_HOPS:
                raise UnsafeArchiveError(f"{path}: {full!r} is a soft link to {target!r} "
                                         f"that goes through more than {_MAX_SOFT_HOPS} links (a loop?); refusing the archive")
            parts = [p for p in link.path.split("/") if p not in ("", ".")] + parts
            if link.path.startswith("/"):
                node = f
            continue
        if not isinstance(link, h5py.HardLink):
            raise UnsafeArchiveError(f"{path}: {full!r} is a soft link to {target!r}, which leads out of the file; "
                                     "ckptbridge reads only data stored inside the archive")
        node = node[key]


def _plain_dtype(ds: Any, path: str, full: str) -> str:
    import h5py

    if h5py.check_string_dtype(ds.dtype) is not None or ds.dtype.kind == "S":
        return "string"
    if ds.dtype.kind == "O":
        raise FormatError(f"{path}: dataset {full!r} holds HDF5 references or variable-length sequences, not a tensor")
    if _is_tagged_bfloat16(ds):
        return "bfloat16"
    try:
        return dtype_name(ds.dtype)
    except FormatError:
        raise FormatError(f"{path}: dataset {full!r} has dtype {ds.dtype}, which is not a tensor dtype ckptbridge carries") from None


def _is_tagged_bfloat16(ds: Any) -> bool:
    """Keras 3 stores bfloat16 as 2-byte opaque data with an attribute ``dtype="bfloat16"``."""
    if ds.dtype.kind != "V" or ds.dtype.itemsize != 2 or ds.dtype.names is not None:
        return False
    tag = ds.attrs.get("dtype")
    return (tag.decode("ascii", "replace") if isinstance(tag, bytes) else tag) == "bfloat16"


def _plain_array(raw: np.ndarray, ds: Any) -> np.ndarray:
    """A dataset written by plain h5py, in exchange form (variable-length strings as bytes)."""
    if _is_tagged_bfloat16(ds):
        return np.ascontiguousarray(raw).view(numpy_dtype("bfloat16"))
    if raw.dtype.kind == "O" or raw.dtype.kind == "S":
        out = np.empty(raw.shape, dtype=object)
        flat = out.reshape(-1)
        for i, v in enumerate(raw.reshape(-1)):
            flat[i] = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        return out
    return as_exchange_array(raw)


Hdf5Sink.source_class = Hdf5Source
