"""The two roles every format plays: a lazy tensor source and a streaming tensor sink.

A :class:`Source` lists tensor specs without reading values and reads one
tensor on demand.  A :class:`Sink` takes tensors one at a time and writes
its output to a temporary location; :meth:`Sink.commit` makes it appear at the
destination in one step, :meth:`Sink.abort` leaves nothing behind.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ._dtypes import uncarried_error  # noqa: F401 - re-exported for the sources
from .errors import NotFoundError
from .spec import TensorSpec

if TYPE_CHECKING:
    from .io.chunks import BlockStream

# Entries that carry checkpoint structure rather than weights.  A source
# exposes them through extras(), never as tensors; a sink that can store them
# takes them through write_extra().
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
OBJECT_GRAPH = "object_graph"


class Source(abc.ABC):
    """A read-only, lazy view of named tensors."""

    path: str
    #: Short name of the format, for messages and ``ls``: "checkpoint", "npz", "hdf5"...
    kind: str = "?"
    #: What finding the source decided that the user should be told (a directory's state file that
    #: was not followed); ``ls`` shows them, reports carry them.
    notes: tuple[str, ...] = ()
    #: The source kind (``ckptbridge.sources``) that recognised and opened it; None for one made directly.
    opened_by: str | None = None
    #: What archive metadata records as what read it, set by what opened it: the checkpoint engine's
    #: label ("native"), the archive format's name ("npz"), a Keras file's kind; empty: :attr:`kind`.
    label: str = ""

    @abc.abstractmethod
    def specs(self) -> Mapping[str, TensorSpec]:
        """Name -> spec of every tensor, in sorted name order.  Reads no values."""

    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The tensor's values in the exchange form (see :mod:`ckptbridge.spec`)."""

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        """The tensor in C-order blocks of at most ``chunk_bytes`` (see ``_chunks``),
        or None where this source cannot stream it (then :meth:`read` it whole)."""
        return None

    def uncarried(self) -> Mapping[str, TensorSpec]:
        """Tensors the source holds whose dtype ckptbridge cannot carry (``variant``...), by name.

        They are not in :meth:`specs` (nothing can read them as arrays), but they are
        never hidden: ``ls``, ``diff`` and ``verify`` show them and an export refuses
        them unless they are excluded.  Archives cannot hold them: empty.
        """
        return {}

    def read_raw(self, name: str) -> bytes | None:
        """The stored bytes of a tensor in :meth:`uncarried`, checksum-verified where the format
        keeps a checksum; None where this source cannot get at them."""
        return None

    def metadata(self) -> dict[str, Any]:
        """What the source records about itself (provenance, checksums); may be empty."""
        return {}

    def extras(self) -> dict[str, bytes]:
        """Non-tensor payloads worth carrying along (the TF2 object graph)."""
        return {}

    def checksum(self, name: str) -> int | None:
        """The stored crc32c of a tensor's bytes, if the format records one."""
        return None

    def object_key(self, name: str) -> str:
        """The key under which this source's TF2 object graph (:meth:`extras`) knows tensor ``name``:
        the name itself, except in views that rename."""
        return name

    def origin(self) -> Source:
        """The source that reads the files: this one, or the one a view (readable names) shows."""
        return self

    def spec(self, name: str) -> TensorSpec:
        try:
            return self.specs()[name]
        except KeyError:
            raise NotFoundError(f"no tensor named {name!r} in {self.path}") from None

    def close(self) -> None:
        """Release files; safe to call twice."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class SourceView(Source):
    """A view of another source (``inner``): renamed, filtered, extended.  Everything is
    delegated to ``inner`` by default (its path, kind, notes and label too, copied when the view
    is made); a view overrides only what it changes.  Closing the view closes ``inner``."""

    def __init__(self, inner: Source) -> None:
        self._inner = inner
        self.path = inner.path
        self.kind = inner.kind
        self.notes = inner.notes
        self.opened_by = inner.opened_by
        self.label = inner.label

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._inner.specs()

    def read(self, name: str) -> np.ndarray:
        return self._inner.read(name)

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        return self._inner.read_blocks(name, chunk_bytes)

    def uncarried(self) -> Mapping[str, TensorSpec]:
        return self._inner.uncarried()

    def read_raw(self, name: str) -> bytes | None:
        return self._inner.read_raw(name)

    def metadata(self) -> dict[str, Any]:
        return self._inner.metadata()

    def extras(self) -> dict[str, bytes]:
        return self._inner.extras()

    def checksum(self, name: str) -> int | None:
        return self._inner.checksum(name)

    def object_key(self, name: str) -> str:
        return self._inner.object_key(name)

    def origin(self) -> Source:
        return self._inner.origin()

    def close(self) -> None:
        self._inner.close()


class ArchiveSource(Source):
    """A source that reads its specs, metadata and extras when it opens (our archive formats).

    Subclasses fill ``_specs``, ``_meta`` (the JSON document, ``{}`` for a plain
    archive) and ``_extras``; the per-tensor crc32c records live in ``_meta["tensors"]``.
    """

    _specs: Mapping[str, TensorSpec]
    _meta: dict[str, Any]
    _extras: dict[str, bytes]

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def metadata(self) -> dict[str, Any]:
        return self._meta

    def extras(self) -> dict[str, bytes]:
        return dict(self._extras)

    def checksum(self, name: str) -> int | None:
        rec = self._meta.get("tensors", {}).get(name)
        return None if rec is None else int(rec["crc32c"])


class Sink(abc.ABC):
    """Takes named tensors one at a time; commit() publishes atomically."""

    path: str
    #: Whether :meth:`write_blocks` takes a numeric tensor block by block.
    streams: bool = False

    def begin(self, specs: list[TensorSpec]) -> None:
        """Told every spec before the first write; formats that lay out names up front use it."""

    @abc.abstractmethod
    def write(self, name: str, array: np.ndarray) -> None:
        """Write one tensor (exchange form).  Names are unique."""

    def write_blocks(self, name: str, stream: BlockStream) -> None:
        """Write one numeric tensor from a :class:`BlockStream`, block by block.

        Only called when :attr:`streams` is true.  Records ``stream.crc`` (set
        once the stream is drained) as the tensor's checksum where the format keeps one.
        """
        raise NotImplementedError

    def write_extra(self, key: str, payload: bytes) -> None:
        """Store a non-tensor payload if the format can; by default it is dropped."""

    def start_writeback(self) -> None:
        """Let the disk start on what is written so far (a hint; by default nothing)."""
        out = getattr(self, "_out", None)
        if out is not None and hasattr(out, "start_writeback"):
            out.start_writeback()

    def start_sync(self) -> None:
        """After :meth:`finish`: start making the output durable (fsync) while it is read back."""
        out = getattr(self, "_out", None)
        if out is not None and hasattr(out, "start_sync"):
            out.start_sync()

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        """Complete the output at its temporary location (see :attr:`readback_path`)."""
        raise NotImplementedError

    def publish(self) -> None:
        """Move the finished output into place, atomically."""

    @property
    def readback_path(self) -> str:
        """Where the finished, not yet published, output can be opened to check it."""
        raise NotImplementedError

    def commit(self, metadata: dict[str, Any] | None = None) -> None:
        """Finish and move the output into place."""
        self.finish(metadata)
        self.publish()

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove everything written so far; safe to call after commit or twice."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is not None:
            self.abort()


class ArchiveSink(Sink):
    """A sink writing one temporary file (an ``_atomic.AtomicFile`` in ``_out``) that
    :attr:`source_class` reads back before :meth:`publish` renames it into place."""

    source_class: type[Source]
    _out: Any

    @property
    def readback_path(self) -> str:
        return self._out.tmp

    def open_readback(self) -> Source:
        return self.source_class(self._out.tmp)  # type: ignore[call-arg]

    def publish(self) -> None:
        self._out.commit()



class ArraySource(Source):
    """A source over arrays in memory: ``{name: array}``, what :func:`ckptbridge.save` writes.

    Checked when it is made, so nothing is written from a mapping that cannot be
    carried exactly: names must be non-empty strings, arrays of a dtype ckptbridge
    carries (see ``_dtypes``), and object arrays must hold ``bytes`` only.
    """

    kind = "arrays"

    def __init__(self, tensors: Mapping[str, Any], path: str = "<arrays>") -> None:
        from .errors import FormatError
        from .spec import as_exchange_array, dtype_name

        self.path = path
        arrays: dict[str, np.ndarray] = {}
        for name, value in tensors.items():
            if not isinstance(name, str) or not name:
                raise FormatError(f"tensor names must be non-empty strings, got {name!r}")
            arr = as_exchange_array(value)
            try:
                dtype = dtype_name(arr.dtype)
            except FormatError as e:
                raise FormatError(f"tensor {name!r}: {e}") from None
            if dtype == "string":
                bad = next((type(v).__name__ for v in arr.reshape(-1) if type(v) is not bytes), None)
                if bad is not None:
                    raise FormatError(f"tensor {name!r}: an object array must hold bytes only (string tensors), found {bad}; "
                                      "encode text to bytes first")
            arrays[name] = arr
        self._arrays = arrays
        self._specs = {n: TensorSpec(n, dtype_name(a.dtype), tuple(a.shape)) for n, a in sorted(arrays.items(), key=lambda kv: kv[0].encode("utf-8", "surrogateescape"))}

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> np.ndarray:
        self.spec(name)
        return self._arrays[name]
