"""The pipe: source -> name plan -> sink, with one progress bar, a read-back check
of everything written, and an atomic publish.  Also diff and verify, which
walk two sources or one."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import _engines, objgraph
from ._chunks import CHUNK_BYTES
from ._source import OBJECT_GRAPH, Sink, Source
from ._spec import STRING, TensorSpec, array_nbytes, dtype_name
from .errors import CkptBridgeError, CorruptError
from . import _dtypes
from ._dtypes import uncarried_error
from .formats import meta
from .names import Plan
from .progress import bar


_WRITEBACK_BYTES = 64 << 20


@dataclasses.dataclass
class Report:
    """What a conversion did: every name written, dropped or swapped."""

    output: str
    written: list[str]
    dropped: dict[str, str]
    ema_swaps: dict[str, str]
    nbytes: int
    #: graph variables the archive did not have (left at their initializer; rebuild only)
    missing: list[str] = dataclasses.field(default_factory=list)
    #: old name -> new name for every tensor renamed (--rename, --rename-file, --original-names)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)
    #: output name -> the layout change made to it, or why a kernel-like tensor was left alone (--layout)
    layout: dict[str, str] = dataclasses.field(default_factory=dict)
    #: True when nothing was written (--dry-run)
    dry_run: bool = False
    #: what became of a TF2 object graph that could not be carried as it was (rewritten, or left out and why)
    object_graph: str | None = None


def exchange_checksum(arr: np.ndarray) -> int:
    """crc32c of a tensor's canonical bytes (strings: their length-prefixed blob)."""
    dtype = dtype_name(arr.dtype)
    stored, _ = meta.encode(arr, dtype)
    return meta.checksum(stored)


def transfer(
    source: Source,
    sink: Sink,
    plan: Plan,
    *,
    progress: bool | None = False,
    desc: str = "converting",
    verify: bool = True,
    metadata: dict[str, Any] | None = None,
    carry_extras: bool = True,
    chunk_bytes: int | None = None,
) -> Report:
    """Stream every planned tensor from ``source`` into ``sink``; read back; publish.

    ``chunk_bytes``: the most read or written at a time for one tensor (default: ``CHUNK_BYTES``).
    """
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES
    specs = source.specs()
    out_specs = [dataclasses.replace(specs[src], name=dst) for dst, src in plan.mapping.items()]
    total = sum(s.nbytes for s in out_specs)
    crcs: dict[str, int] = {}
    nbytes = 0
    pbar = bar(total, desc, progress)
    try:
        sink.begin(out_specs)
        unsynced = 0
        for dst, src in plan.mapping.items():
            # Numeric tensors stream block by block where both ends can (any size in
            # CHUNK_BYTES of memory, one crc32c pass); the rest are read whole.
            stream = source.read_blocks(src, chunk_bytes) if sink.streams else None
            if stream is not None:
                sink.write_blocks(dst, stream)
                assert stream.crc is not None
                crcs[dst] = stream.crc
                n = specs[src].nbytes
            else:
                arr = source.read(src)
                if verify:
                    crcs[dst] = exchange_checksum(arr)
                sink.write(dst, arr)
                n = array_nbytes(arr)
                del arr
            nbytes += n
            unsynced += n
            if unsynced >= _WRITEBACK_BYTES:
                sink.start_writeback()  # the disk writes while we convert, not all at the final fsync
                unsynced = 0
            pbar.update(n if specs[src].dtype != STRING else 0)
        graph_note = None
        if carry_extras:
            for key, payload in source.extras().items():
                if key == OBJECT_GRAPH:
                    # The graph must name exactly the keys written, or TensorFlow's restore fails.
                    keys = objgraph.key_map(plan.mapping, plan.ema_swaps, source.object_key)
                    graph, graph_note = objgraph.carry(payload, keys)
                    if graph is None:
                        continue
                    payload = graph
                sink.write_extra(key, payload)
        doc = dict(metadata or {})
        if graph_note:
            doc["object_graph"] = graph_note
        if plan.dropped:
            doc["dropped"] = plan.dropped
        if plan.ema_swaps:
            doc["ema_swaps"] = plan.ema_swaps
        sink.finish(doc)
        sink.start_sync()  # the disk finishes writing while we read back
        if verify:
            readback(sink, crcs, chunk_bytes)
        sink.publish()
    except BaseException:
        sink.abort()
        raise
    finally:
        pbar.close()
    return Report(sink.path, list(plan.mapping), dict(plan.dropped), dict(plan.ema_swaps), nbytes, object_graph=graph_note)


def readback(sink: Sink, crcs: dict[str, int], chunk_bytes: int | None = None) -> None:
    """Re-open what ``sink`` wrote and compare every tensor to what was sent."""
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES
    src = sink.open_readback()  # type: ignore[attr-defined]
    try:
        got = set(src.specs())
        if got != set(crcs):
            lost = sorted(set(crcs) - got)
            extra = sorted(got - set(crcs))
            raise CorruptError(f"read-back of {sink.path} does not match what was written (missing {lost[:5]}, unexpected {extra[:5]}); output discarded")
        for name, crc in crcs.items():
            try:
                stream = src.read_blocks(name, chunk_bytes)
                actual = stream.drain() if stream is not None else exchange_checksum(src.read(name))
            except CorruptError:
                actual = None
            if actual != crc:
                raise CorruptError(f"read-back of {sink.path}: tensor {name!r} differs from what was written; output discarded (is the disk failing?)")
    finally:
        src.close()


@dataclasses.dataclass
class DiffReport:
    """How two sets of tensors differ."""

    only_a: list[str]
    only_b: list[str]
    #: name -> (spec in a, spec in b) where shape or dtype differ
    spec_diffs: dict[str, tuple[TensorSpec, TensorSpec]]
    #: name -> (number of differing elements, max abs difference or None for strings/bools)
    value_diffs: dict[str, tuple[int, float | None]]
    compared: int
    #: tensors of a dtype ckptbridge does not carry whose stored bytes differ: name -> dtype
    raw_diffs: dict[str, str] = dataclasses.field(default_factory=dict)
    #: how many of ``compared`` were compared as stored bytes (dtypes not carried)
    compared_raw: int = 0

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.spec_diffs or self.value_diffs or self.raw_diffs)


def diff_sources(a: Source, b: Source, *, atol: float = 0.0, rtol: float = 0.0, progress: bool | None = False) -> DiffReport:
    """Compare every tensor of ``a`` and ``b`` by name, those of a dtype not carried included
    (by their stored bytes: an engine that cannot get at them is an error, never a silent pass)."""
    sa, sb = {**a.specs(), **a.uncarried()}, {**b.specs(), **b.uncarried()}
    opaque = a.uncarried().keys() | b.uncarried().keys()
    only_a = sorted(set(sa) - set(sb))
    only_b = sorted(set(sb) - set(sa))
    common = sorted(set(sa) & set(sb))
    spec_diffs = {}
    value_diffs: dict[str, tuple[int, float | None]] = {}
    raw_diffs: dict[str, str] = {}
    compared_raw = 0
    pbar = bar(sum(sa[n].nbytes for n in common), "comparing", progress)
    try:
        for name in common:
            if sa[name].dtype != sb[name].dtype or sa[name].shape != sb[name].shape:
                spec_diffs[name] = (sa[name], sb[name])
                continue
            if name in opaque:
                if _raw(a, name, sa[name]) != _raw(b, name, sb[name]):
                    raw_diffs[name] = sa[name].dtype
                compared_raw += 1
                continue
            d = _value_diff(a.read(name), b.read(name), atol, rtol)
            if d is not None:
                value_diffs[name] = d
            pbar.update(sa[name].nbytes)
    finally:
        pbar.close()
    return DiffReport(only_a, only_b, spec_diffs, value_diffs, len(common), raw_diffs, compared_raw)


def _raw(source: Source, name: str, spec: TensorSpec) -> bytes:
    """The stored bytes of a tensor of a dtype not carried, or the error that says this engine cannot read them."""
    raw = source.read_raw(name)
    if raw is None:
        raise uncarried_error(source.path, {name: spec.dtype})
    return raw


def _value_diff(x: np.ndarray, y: np.ndarray, atol: float, rtol: float) -> tuple[int, float | None] | None:
    x, y = _dtypes.comparable(x), _dtypes.comparable(y)
    if x.dtype == np.dtype(object):
        n = int(sum(1 for p, q in zip(x.reshape(-1), y.reshape(-1)) if bytes(p) != bytes(q)))
        return (n, None) if n else None
    if x.tobytes() == y.tobytes():
        return None
    if x.dtype == np.bool_:
        n = int(np.count_nonzero(x != y))
        return (n, None) if n else None
    xf = x.astype(np.complex128 if x.dtype.kind == "c" else np.float64)
    yf = y.astype(xf.dtype)
    if x.dtype.kind in "iu":
        # Exact integer distance: through float64, int64 values past 2**53 that differ would compare equal.
        big, small = np.maximum(x, y).astype(np.uint64), np.minimum(x, y).astype(np.uint64)
        absdiff = (big - small).astype(np.float64)  # modulo 2**64, so exact for every pair
    else:
        with np.errstate(invalid="ignore"):  # inf - inf
            absdiff = np.abs(xf - yf)
    # From the float64 copies, so that bfloat16 (dtype kind "V") NaNs count too.
    both_nan = np.isnan(xf) & np.isnan(yf)
    if atol == 0 and rtol == 0:
        # Exact mode: bit patterns decide (so -0.0 vs 0.0 and NaN payloads count).
        bad = x.reshape(-1).view(np.uint8).reshape(x.size, -1) != y.reshape(-1).view(np.uint8).reshape(y.size, -1)
        bad = bad.any(axis=1).reshape(x.shape)
    else:
        with np.errstate(invalid="ignore"):
            bad = ~((absdiff <= atol + rtol * np.abs(yf)) | both_nan)
    n = int(np.count_nonzero(bad))
    if n == 0:
        return None
    with np.errstate(invalid="ignore"):
        finite = absdiff[bad & ~np.isnan(absdiff)]
    return n, float(finite.max()) if finite.size else float("nan")


@dataclasses.dataclass
class VerifyReport:
    """The outcome of checking every tensor's checksum."""

    path: str
    checked: int
    ok: bool
    bad: str | None = None
    message: str | None = None
    has_checksums: bool = True
    #: how many of ``checked`` are of a dtype not carried, checked as stored bytes
    checked_raw: int = 0


def verify_source(source: Source, *, progress: bool | None = False) -> VerifyReport:
    """Read every tensor (sources check their checksums as they read)."""
    specs = source.specs()
    opaque = source.uncarried()
    pbar = bar(sum(s.nbytes for s in specs.values()), "verifying", progress)
    checked = 0
    try:
        for name, spec in specs.items():
            try:
                source.read(name)
            except CorruptError as e:
                return VerifyReport(source.path, checked, False, name, str(e))
            checked += 1
            pbar.update(spec.nbytes)
        for name, spec in opaque.items():
            try:
                _raw(source, name, spec)
            except CorruptError as e:
                return VerifyReport(source.path, checked, False, name, str(e), checked_raw=checked - len(specs))
            checked += 1
    finally:
        pbar.close()
    has = _engines.is_checkpoint(source) or bool(source.metadata().get("tensors"))
    return VerifyReport(source.path, checked, True, has_checksums=has, checked_raw=len(opaque))


def require_some(plan: Plan, path: str) -> None:
    if not plan.mapping:
        raise CkptBridgeError(f"nothing to write: every tensor of {path} was filtered out; check --include/--exclude")
