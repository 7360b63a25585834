"""The pipe: source -> name plan -> sink, with one progress bar, a read-back check
of everything written, and an atomic publish."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._source import OBJECT_GRAPH, ArchiveSink, ArchiveSource, Sink, Source
from ..errors import CkptBridgeError, CorruptError, option
from ..formats import meta
from ..io.chunks import CHUNK_BYTES
from ..io.progress import bar
from ..reports import Report
from ..sources import _objgraph
from ..spec import STRING, TensorSpec, array_nbytes, dtype_name
from .names import Plan

_WRITEBACK_BYTES = 64 << 20
_BAR_BYTES = 1 << 20
_BAR_TENSORS = 1024


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
    crcs: dict[str, int] = {}
    unread: dict[str, str] = {}  # output name -> source name, for tensors whose bytes only the read-back reads
    nbytes = 0
    pbar = None
    # The sink is ours from the first line: whatever stops us (a signal included) aborts it, so no
    # open file outlives the command to be closed by the interpreter's shutdown.
    try:
        specs = source.specs()
        out_specs = [specs[src] if dst == src else dataclasses.replace(specs[src], name=dst) for dst, src in plan.mapping.items()]
        pbar = bar(sum(s.nbytes for s in out_specs), desc, progress)
        sink.begin(out_specs)
        nbytes = _write_tensors(source, specs, sink, plan, pbar, crcs, unread, chunk_bytes=chunk_bytes, verify=verify)
        graph_note = _carry_extras(source, sink, plan) if carry_extras else None
        sink.finish(_output_metadata(metadata, plan, graph_note))
        sink.start_sync()  # the disk finishes writing while we read back
        if verify:
            readback(sink, crcs, chunk_bytes, recheck=lambda dst: _recheck(source, unread.get(dst), chunk_bytes))
        sink.publish()
    except BaseException:
        sink.abort()
        raise
    finally:
        if pbar is not None:
            pbar.close()
    return Report(sink.path, list(plan.mapping), dict(plan.dropped), dict(plan.ema_swaps), nbytes, object_graph=graph_note,
                  checksums=crcs if verify else {})


def _write_tensors(source: Source, specs: Mapping[str, TensorSpec], sink: Sink, plan: Plan, pbar: Any,
                   crcs: dict[str, int], unread: dict[str, str], *, chunk_bytes: int, verify: bool) -> int:
    """Write every planned tensor, recording its crc32c in ``crcs`` (and in ``unread`` those moved
    unread); the bytes written."""
    nbytes = unsynced = shown = 0
    for i, (dst, src) in enumerate(plan.mapping.items(), 1):
        # Numeric tensors stream block by block where both ends can (any size in CHUNK_BYTES of
        # memory); the rest are read whole.  Either way the sink checks, encodes and checksums
        # the tensor once and returns its crc32c, which the read-back compares.
        stream = source.read_blocks(src, chunk_bytes) if sink.streams else None
        if stream is not None:
            # With a read-back to come, a sink may move the bytes unread (a kernel copy) and take
            # the source's stored crc32c: the read-back is then the source's check too.
            stream.checked_later = verify
            crcs[dst] = sink.write_blocks(dst, stream)
            if stream.unread:
                unread[dst] = src
            n = specs[src].nbytes
        else:
            arr = source.read(src)
            crcs[dst] = sink.write(dst, arr)
            n = array_nbytes(arr)
            del arr
        nbytes += n
        unsynced += n
        if unsynced >= _WRITEBACK_BYTES:
            sink.start_writeback()  # the disk writes while we convert, not all at the final fsync
            unsynced = 0
        shown += n if specs[src].dtype != STRING else 0
        if shown >= _BAR_BYTES or i % _BAR_TENSORS == 0:
            pbar.update(shown)  # in batches: a bar update costs more than writing an empty tensor
            shown = 0
    pbar.update(shown)
    return nbytes


def _carry_extras(source: Source, sink: Sink, plan: Plan) -> str | None:
    """Write the source's extras (its object graph, renamed to the keys written); the note on the graph."""
    graph_note = None
    for key, payload in source.extras().items():
        if key == OBJECT_GRAPH:
            # The graph must name exactly the keys written, or TensorFlow's restore fails.
            keys = _objgraph.key_map(plan.mapping, plan.ema_swaps, source.object_key)
            # An archive's graph is keyed by its own names (import maps them back); a checkpoint's must
            # keep the shape of key TensorFlow's object-based restore parses.
            restorable = not isinstance(sink, ArchiveSink)
            graph, graph_note = _objgraph.carry(payload, keys, restorable=restorable, held=held_keys(source))
            if graph is None:
                continue
            payload = graph
        sink.write_extra(key, payload)
    return graph_note


def _output_metadata(metadata: dict[str, Any] | None, plan: Plan, graph_note: str | None) -> dict[str, Any]:
    doc = dict(metadata or {})
    if graph_note:
        doc["object_graph"] = graph_note
    if plan.dropped:
        doc["dropped"] = plan.dropped
    if plan.ema_swaps:
        doc["ema_swaps"] = plan.ema_swaps
    return doc


def held_keys(source: Source) -> set[str]:
    """Every key the source's object graph can name that the files hold, written or not (the origin's
    tensors, uncarried ones included): an object whose value is several tensors is carried only whole."""
    base = source.origin()
    return {base.object_key(n) for n in [*base.specs(), *base.uncarried()]}


def _recheck(source: Source, name: str | None, chunk_bytes: int) -> None:
    """A read-back found tensor ``name``'s bytes differ from the crc32c the source stores for them, and
    they were moved unread: read them from the source, so a damaged source is named as such (its error)."""
    if name is None:
        return
    stream = source.read_blocks(name, chunk_bytes)
    if stream is not None:
        stream.drain()  # raises the source's CorruptError (file, tensor, byte range) if the source is damaged


def readback(sink: Sink, crcs: dict[str, int], chunk_bytes: int | None = None, recheck: Callable[[str], None] | None = None) -> None:
    """Re-open what ``sink`` wrote and compare every tensor to what was sent.

    ``recheck(name)`` is called before a mismatch is reported: it raises the source's own error where
    the source, not the output, is at fault (a tensor moved unread: see :func:`transfer`)."""
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES
    src = sink.open_readback()
    try:
        got = set(src.specs())
        if got != set(crcs):
            lost = sorted(set(crcs) - got)
            extra = sorted(got - set(crcs))
            raise CorruptError(f"read-back of {sink.path} does not match what was written (missing {lost[:5]}, unexpected {extra[:5]}); "
                               "output discarded")
        for name, crc in crcs.items():
            actual: int | None
            try:
                stream = src.read_blocks(name, chunk_bytes)
                if stream is not None:
                    actual = stream.drain()
                elif isinstance(src, ArchiveSource) and src.checksum(name) is not None:
                    src.read(name)  # checks the bytes against the archive's record, which must be what was sent
                    actual = src.checksum(name)
                else:
                    actual = exchange_checksum(src.read(name))
            except CorruptError:
                actual = None
            if actual != crc:
                if recheck is not None:
                    recheck(name)
                raise CorruptError(f"read-back of {sink.path}: tensor {name!r} differs from what was written; "
                                   "output discarded (is the disk failing?)")
    finally:
        src.close()


def require_some(plan: Plan, path: str) -> None:
    if not plan.mapping:
        raise CkptBridgeError(f"nothing to write: every tensor of {path} was filtered out; check {option('include')}/{option('exclude')}")
