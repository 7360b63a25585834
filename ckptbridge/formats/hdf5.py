"""HDF5 (``.h5``, ``.hdf5``): one dataset per tensor at its checkpoint path.

``f["vgg_16/conv1/conv1_1/weights"]`` works in plain h5py.  HDF5 cannot hold
a dataset and a group at one path, so when a name is also the prefix of
another (``w`` and ``w/ExponentialMovingAverage``) the shorter one is stored at
``w/__value__``; names that are not valid HDF5 paths go under
``/.ckptbridge/escaped/``.  Every dataset carries its true name and dtype as
attributes, and readers go by those, never by the path.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from .._atomic import AtomicFile, checks_writes, raise_signals_after
from .._chunks import BlockStream, block_shape, c_blocks, mmap_blocks, write_stream
from .._source import ArchiveSink, ArchiveSource, OBJECT_GRAPH
from .._spec import BFLOAT16, STRING, TensorSpec, as_exchange_array, dtype_name, numpy_dtype
from ..errors import CkptBridgeError, CorruptError, FormatError, MismatchError, UnsafeArchiveError
from . import meta

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

        self.path = path
        self._out = AtomicFile(path, force=force)
        # Through a guarded file object: HDF5 crashes on close after a failed write (see _atomic.GuardedFile).
        try:
            with raise_signals_after():  # HDF5 must not be interrupted half-way through creating the file
                self._f = h5py.File(self._out.open_guarded(), "w")
        except BaseException:
            f = getattr(self, "_f", None)
            if f is not None:
                f.close()
            self._out.abort()
            raise
        self._compress = compress
        self._records: dict[str, dict[str, Any]] = {}
        self._paths: dict[str, str] = {}
        self._source = source
        self._escaped = 0

    def begin(self, specs: list[TensorSpec]) -> None:
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

        return h5py.Group

    @checks_writes
    def write(self, name: str, array: np.ndarray) -> None:
        if name in self._records:
            raise MismatchError(f"tensor {name!r} written twice to {self.path}")
        if not name:
            raise FormatError(f"an empty tensor name cannot be stored in {self.path}")
        array = as_exchange_array(array)
        dtype = dtype_name(array.dtype)
        stored, enc = meta.encode(array, dtype)
        stored = np.require(stored, requirements="C")
        path = self._place(name)
        kwargs: dict[str, Any] = {}
        if self._compress and stored.size > 0 and stored.ndim > 0:
            kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True, "chunks": True}
        ds = self._f.create_dataset(path, data=stored, **kwargs)
        ds.attrs[ATTR_NAME] = name
        ds.attrs[ATTR_DTYPE] = dtype
        crc = meta.checksum(stored)
        self._records[name] = meta.tensor_record(dtype, tuple(array.shape), enc, crc, path=path)

    @checks_writes
    def write_blocks(self, name: str, stream: BlockStream) -> None:
        """Stream a numeric tensor into its dataset hyperslab by hyperslab (never whole in memory)."""
        if name in self._records:
            raise MismatchError(f"tensor {name!r} written twice to {self.path}")
        if not name:
            raise FormatError(f"an empty tensor name cannot be stored in {self.path}")
        spec = stream.spec
        bf16 = spec.dtype == BFLOAT16
        stored = np.dtype(np.uint16) if bf16 else numpy_dtype(spec.dtype)
        path = self._place(name)
        kwargs: dict[str, Any] = {}
        if self._compress and spec.size > 0 and spec.shape:
            kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True, "chunks": True}
        if not kwargs and spec.shape and spec.size:
            # Allocated now and never filled: the bytes go straight to the dataset's place in
            # the file, copied by the kernel where the source is a file (see _chunks.write_stream).
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
        assert stream.crc is not None
        self._records[name] = meta.tensor_record(spec.dtype, tuple(spec.shape), meta.ENC_BF16 if bf16 else meta.ENC_RAW, stream.crc, path=path)

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
        soft: list[tuple[str, str, Any]] = []

        def visit(group: Any, prefix: str) -> None:
            for key in group:
                full = f"{prefix}/{key}" if prefix else key
                link = group.get(key, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    raise UnsafeArchiveError(f"{path}: {full!r} is an external link to {link.filename}:{link.path}; ckptbridge reads only data stored inside the archive")
                if isinstance(link, h5py.SoftLink):
                    if not allow_internal_links:
                        raise UnsafeArchiveError(f"{path}: {full!r} is a soft link to {link.path}; links are not allowed")
                    soft.append((full, link.path, group))
                    continue  # the target is listed (and checked) under its own path
                if not isinstance(link, h5py.HardLink):
                    raise UnsafeArchiveError(f"{path}: {full!r} is a user-defined HDF5 link; ckptbridge reads only data stored inside the archive")
                if prefix == META_GROUP and full not in (ESCAPED_GROUP, META_DATASET, OBJECT_GRAPH_DATASET):
                    continue  # not ours to read
                try:
                    obj = group[key]
                except (OSError, ValueError, KeyError, RuntimeError) as e:
                    raise CorruptError(f"{path}: cannot open {full!r} ({e}); the archive is damaged or crafted") from None
                addr = h5py.h5o.get_info(obj.id).addr
                if addr in seen:
                    raise UnsafeArchiveError(f"{path}: {full!r} is a second name (hard link) for {seen[addr]!r}; refusing an archive that shows one object under two names")
                seen[addr] = full
                if isinstance(obj, h5py.Group):
                    visit(obj, full)
                elif isinstance(obj, h5py.Dataset):
                    self._check_dataset(obj, full, fsize, max_tensor_bytes)
                    if full in (META_DATASET, OBJECT_GRAPH_DATASET):
                        own[full] = obj
                        continue
                    name = _tensor_name(obj, full, path)
                    if name in datasets:
                        raise CorruptError(f"{path}: two datasets ({datasets[name]!r}, {full!r}) both claim tensor name {name!r}; refusing an ambiguous archive")
                    datasets[name] = full

        visit(f, "")
        for full, target, group in soft:
            _resolve_soft(f, group, target, full, path)
        for key, obj in own.items():
            if obj.dtype != np.uint8 or obj.ndim != 1:
                raise CorruptError(f"{path}: {key!r} is {obj.dtype}{list(obj.shape)}, expected a 1-d uint8 blob; the archive is damaged")
            raw = np.asarray(obj[()]).tobytes()
            if key == META_DATASET:
                self._meta = meta.loads(raw, path)
            else:
                self._extras[OBJECT_GRAPH] = raw
        records = self._meta.get("tensors", {})
        if self._meta:
            missing = sorted(set(records) - set(datasets))
            if missing:
                raise CorruptError(f"{path}: metadata lists tensors that are not in the archive: {', '.join(missing[:5])}; the archive is incomplete")
        specs = {}
        for name in sorted(datasets):
            ds = f[datasets[name]]
            rec = records.get(name)
            if rec is not None:
                dtype, shape = meta.record_spec(name, rec, ds.dtype, tuple(int(x) for x in ds.shape), f"{path}: tensor {name!r}")
                specs[name] = TensorSpec(name, dtype, shape)
            else:
                specs[name] = TensorSpec(name, _plain_dtype(ds, path, datasets[name]), tuple(int(x) for x in ds.shape))
        self._datasets = datasets
        self._specs = specs

    def _check_dataset(self, ds: Any, full: str, fsize: int, max_tensor_bytes: int | None) -> None:
        """Refuse, before any value is read, a dataset whose bytes live outside the
        archive or that would expand far beyond the bytes stored for it."""
        import h5py

        path = self.path
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            n = dcpl.get_virtual_count()
            srcs = [f"{_text(dcpl.get_virtual_filename(i))}:{_text(dcpl.get_virtual_dsetname(i))}" for i in range(min(n, 3))]
            more = f" and {n - 3} more" if n > 3 else ""
            raise UnsafeArchiveError(f"{path}: dataset {full!r} is a virtual dataset mapping {', '.join(srcs)}{more}; ckptbridge reads only data stored inside the archive")
        if dcpl.get_external_count() > 0:
            target = _text(dcpl.get_external(0)[0])
            raise UnsafeArchiveError(f"{path}: dataset {full!r} stores its data in external file {target!r}; ckptbridge reads only data stored inside the archive")
        for i in range(dcpl.get_nfilters()):
            code, _flags, _opts, fname = dcpl.get_filter(i)
            if code not in _FILTERS:
                what = f"HDF5 filter {_text(fname)!r}" if _text(fname) else "an unknown HDF5 filter"
                raise UnsafeArchiveError(f"{path}: dataset {full!r} uses {what} (id {code}), which ckptbridge does not read from archives; re-save it with gzip, lzf or no compression")
        if ds.shape is None:
            raise FormatError(f"{path}: dataset {full!r} has no shape (an empty dataspace); not a tensor")
        meta.check_shape(list(ds.shape), f"{path}: dataset {full!r}")
        need = int(np.prod(ds.shape, dtype=object)) * ds.dtype.itemsize if ds.shape else ds.dtype.itemsize
        if max_tensor_bytes is not None and need > max_tensor_bytes:
            raise UnsafeArchiveError(f"{path}: dataset {full!r} claims {need} bytes, over the limit of {max_tensor_bytes}; raise --max-tensor-gb if it is genuine")
        stored = ds.id.get_storage_size()
        offset = ds.id.get_offset() if layout == h5py.h5d.CONTIGUOUS else None
        # Variable-length strings store a heap reference per element (16 bytes, not
        # the 8 of a Python object pointer), so only their placement can be checked.
        vlen = ds.dtype.kind == "O" or h5py.check_vlen_dtype(ds.dtype) is not None
        if offset is not None:
            if (stored != need and not vlen) or offset + stored > fsize:
                raise CorruptError(f"{path}: dataset {full!r} claims {need} bytes at offset {offset} ({stored} stored) but the file has {fsize}; the archive is damaged or crafted")
        elif layout != h5py.h5d.COMPACT and need > _MAX_EXPANSION * stored + _EXPANSION_SLACK:
            # Unwritten storage reads as the fill value and gzip cannot expand more
            # than ~1032:1, so a small file claiming a huge dataset is a memory bomb.
            raise UnsafeArchiveError(f"{path}: dataset {full!r} claims {need} bytes but only {stored} are stored in the file (unwritten chunks or an impossible compression ratio); refusing what looks like a memory bomb")

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
            enc = rec.get("encoding", meta.ENC_RAW)
            if enc not in (meta.ENC_RAW, meta.ENC_BF16):
                return None
            stored = np.dtype(np.uint16) if enc == meta.ENC_BF16 else want
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
            if mapped is not None and offset + spec.size * stored.itemsize <= len(mapped):
                blocks = ((sel, a.view(want)) for sel, a in mmap_blocks(mapped, offset, spec, stored, chunk_bytes))
                return BlockStream(spec, blocks, check, span=(self._map_file.fileno(), offset))

        def blocks() -> Any:
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
        if getattr(self, "_map", None) is None:
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
        mf = getattr(self, "_map_file", None)
        if mf is not None:
            mf.close()
            self._map_file = None
        f = getattr(self, "_f", None)
        if f is not None:
            try:
                f.close()
            finally:
                self._f = None  # type: ignore[assignment]


# Filters every HDF5 build (or h5py itself, for lzf) provides, and whose expansion
# is bounded; anything else (plugins, codecs we do not know) is refused.
_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset", 32000: "lzf"}
# A dataset may claim at most this many times the bytes stored for it, plus a
# little: deflate's own limit is about 1032:1.
_MAX_EXPANSION = 1100
_EXPANSION_SLACK = 16 << 20
# HDF5 follows at most 16 soft links in a row; so do we.
_MAX_SOFT_HOPS = 16


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _tensor_name(obj: Any, full: str, path: str) -> str:
    """The tensor name a dataset carries (its ckptbridge_name attribute, else its path)."""
    import h5py

    if ATTR_NAME not in obj.attrs:
        name: Any = full
    else:
        aid = h5py.h5a.open(obj.id, ATTR_NAME.encode())
        if aid.shape != () or aid.dtype.kind not in "OSU":
            raise CorruptError(f"{path}: dataset {full!r} has a {ATTR_NAME} attribute that is not one string; the archive is damaged")
        name = obj.attrs[ATTR_NAME]
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        name = str(name)
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
            raise UnsafeArchiveError(f"{path}: {full!r} is a soft link to {target!r}, which does not exist in the file (dangling); refusing the archive")
        if isinstance(link, h5py.SoftLink):
            hops += 1
            if hops > _MAX_SOFT_HOPS:
                raise UnsafeArchiveError(f"{path}: {full!r} is a soft link to {target!r} that goes through more than {_MAX_SOFT_HOPS} links (a loop?); refusing the archive")
            parts = [p for p in link.path.split("/") if p not in ("", ".")] + parts
            if link.path.startswith("/"):
                node = f
            continue
        if not isinstance(link, h5py.HardLink):
            raise UnsafeArchiveError(f"{path}: {full!r} is a soft link to {target!r}, which leads out of the file; ckptbridge reads only data stored inside the archive")
        node = node[key]


def _plain_dtype(ds: Any, path: str, full: str) -> str:
    import h5py

    if h5py.check_string_dtype(ds.dtype) is not None or ds.dtype.kind == "S":
        return "string"
    if ds.dtype.kind == "O":
        raise FormatError(f"{path}: dataset {full!r} holds HDF5 references or variable-length sequences, not a tensor")
    try:
        return dtype_name(ds.dtype)
    except FormatError:
        raise FormatError(f"{path}: dataset {full!r} has dtype {ds.dtype}, which is not a tensor dtype ckptbridge carries") from None


def _plain_array(raw: np.ndarray, ds: Any) -> np.ndarray:
    """A dataset written by plain h5py, in exchange form (variable-length strings as bytes)."""
    if raw.dtype.kind == "O" or raw.dtype.kind == "S":
        out = np.empty(raw.shape, dtype=object)
        flat = out.reshape(-1)
        for i, v in enumerate(raw.reshape(-1)):
            flat[i] = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        return out
    return as_exchange_array(raw)


Hdf5Sink.source_class = Hdf5Source
