"""Arrays into variables that already exist: the sink the one pipe drives for ``assign`` and ``init_fn``,
and that :class:`~ckptbridge.tf.graph_sinks.SaverSink` builds on.

:class:`VariableSink` takes each planned tensor from ``_pipe.transfer`` and hands it to a
:class:`Feeds`: small variables go together (a few ``session.run`` calls for a whole model:
each distinct run costs TensorFlow an executor over the graph), variables over ``chunk_bytes``
go in row slices into a fresh buffer of their own, so no whole copy of a large one is ever made.
Its read-back reads the variables themselves (row slices again), so what the pipe compares is
what the model now holds.

Two kinds of feeds:

* :class:`GraphFeeds`: placeholders and assign ops built in a graph once (before it is
  finalized: ``tf.compat.v1.train.Scaffold`` finalizes it before it calls ``init_fn``), then run
  in any session of that graph.  Values never enter the graph as constants.  A partitioned
  variable (``tf.compat.v1.get_variable(partitioner=...)``) is one name whose parts are filled
  part by part.
* :class:`EagerFeeds`: TF2 variables (a ``tf.Module``, a Keras model), assigned eagerly.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .._source import Encoded, Sink, Source
from ..io.chunks import BlockStream, Selection, block_shape
from ..spec import TensorSpec, array_nbytes, numpy_dtype


@dataclasses.dataclass
class VarPart:
    """One variable behind a name: all of it, or one part of a partitioned variable (its ``offset``)."""

    var: Any
    offset: tuple[int, ...]
    shape: tuple[int, ...]


def row_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    return itemsize * math.prod(shape[1:]) if shape else itemsize


def rows_per_slice(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> int:
    """How many rows go per slice for a variable of ``shape`` (0: it goes whole, with others)."""
    total = row_bytes(shape, itemsize) * (shape[0] if shape else 1)
    if not shape or total <= chunk_bytes or shape[0] <= 1:
        return 0
    return max(1, chunk_bytes // max(row_bytes(shape, itemsize), 1))


def is_resource(var: Any) -> bool:
    return "Resource" in type(var).__name__ or hasattr(var, "handle")


def _part_slices(part: VarPart) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(part.offset, part.shape))


class Feeds(abc.ABC):
    """The variables a :class:`VariableSink` fills, by name, and the few operations it needs."""

    #: name -> rows per slice (0: the variable goes whole, grouped with others)
    rows: dict[str, int]

    @abc.abstractmethod
    def assign(self, pairs: list[tuple[str, np.ndarray]]) -> None:
        """Whole values into several variables at once."""

    @abc.abstractmethod
    def assign_rows(self, name: str, start: int, block: np.ndarray) -> None:
        """Rows ``start:start + len(block)`` of a variable fed in slices."""

    @abc.abstractmethod
    def fresh_buffers(self) -> None:
        """Give each variable fed in slices a buffer of its own, uninitialised (every row is then fed).

        A zero fill would cost a pass over it, and a buffer shared with its initial value (a
        constant's, a zeros initializer's) made the first in-place update copy the whole variable
        (measured: +411 MB for vgg_16's fc6, +614 MB for a zero-initialised 614 MB variable).  The
        new buffer's pages are touched only as rows arrive, and the old one is freed as it is
        replaced, so the resident memory never holds both.
        """

    @abc.abstractmethod
    def settle(self) -> None:
        """After the last slice: a scatter puts a resource variable in copy-on-read mode, in which
        every later read copies it whole (measured: +390 MB for fc6); its buffer is its own, so end that."""

    @abc.abstractmethod
    def read(self, names: list[str]) -> list[np.ndarray]:
        """Several variables' whole values at once (the read-back of those fed whole: one run,
        where a run per variable would cost TensorFlow an executor each)."""

    @abc.abstractmethod
    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a variable fed in slices."""


class GraphFeeds(Feeds):
    """Placeholders and assign ops for ``targets`` (name -> parts), built in ``graph`` now; run in ``session``."""

    def __init__(self, tf: Any, graph: Any, targets: Mapping[str, list[VarPart]], chunk_bytes: int) -> None:
        self._tf = tf
        self.session: Any = None
        self.rows = {}
        self._whole: dict[str, list[tuple[VarPart, Any, Any, Any]]] = {}  # name -> (part, placeholder, assign op, read tensor)
        self._sliced: dict[str, tuple[Any, Any, Any, Any, Any]] = {}  # name -> (placeholder, start, assign op, stop, rows read)
        fill, no_copy = [], []
        with graph.as_default(), tf.name_scope("ckptbridge_assign"):
            for name, parts in targets.items():
                if len(parts) == 1 and not any(parts[0].offset):
                    var = parts[0].var
                    rows = rows_per_slice(parts[0].shape, var.dtype.base_dtype.size, chunk_bytes)
                    if rows:
                        self.rows[name] = rows
                        self._sliced[name] = _slice_ops(tf, var)
                        fill.append(_give_buffer(tf, var))
                        if is_resource(var):
                            no_copy.append(tf.raw_ops.DisableCopyOnRead(resource=var.handle))
                        continue
                self.rows[name] = 0
                self._whole[name] = [_whole_ops(tf, p) for p in parts]
            self._fill = fill
            self._no_copy = no_copy

    def _run(self, fetches: Any, feed: dict[Any, Any] | None = None) -> Any:
        return self.session.run(fetches, feed)

    def assign(self, pairs: list[tuple[str, np.ndarray]]) -> None:
        ops, feed = [], {}
        for name, array in pairs:
            for part, ph, op, _ in self._whole[name]:
                ops.append(op)
                feed[ph] = array[_part_slices(part)] if len(self._whole[name]) > 1 else array
        self._run(ops, feed)

    def assign_rows(self, name: str, start: int, block: np.ndarray) -> None:
        ph, st, op, _, _ = self._sliced[name]
        self._run(op, {ph: block, st: start})

    def fresh_buffers(self) -> None:
        if self._fill:
            self._run(self._fill)

    def settle(self) -> None:
        if self._no_copy:
            self._run(self._no_copy)

    def read(self, names: list[str]) -> list[np.ndarray]:
        values = self._run([[r for _, _, _, r in self._whole[n]] for n in names])
        return [self._joined(self._whole[n], v) for n, v in zip(names, values)]

    @staticmethod
    def _joined(parts: list[tuple[VarPart, Any, Any, Any]], values: list[Any]) -> np.ndarray:
        if len(parts) == 1:
            return np.asarray(values[0])
        full = tuple(max(p.offset[k] + p.shape[k] for p, _, _, _ in parts) for k in range(len(parts[0][0].shape)))
        out = np.empty(full, dtype=np.asarray(values[0]).dtype)
        for (p, _, _, _), v in zip(parts, values):
            out[_part_slices(p)] = v
        return out

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        _, st, _, sp, rows = self._sliced[name]
        return np.asarray(self._run(rows, {st: start, sp: stop}))


def _whole_ops(tf: Any, part: VarPart) -> tuple[VarPart, Any, Any, Any]:
    var = part.var
    ph = tf.compat.v1.placeholder(var.dtype.base_dtype, list(part.shape), name="feed")
    if is_resource(var):
        return part, ph, var.assign(ph, read_value=False), var.value()
    return part, ph, tf.compat.v1.assign(var, ph, validate_shape=True).op, var.value()


def _slice_ops(tf: Any, var: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(rows placeholder, start, scatter op, stop, the rows start:stop read back) for one variable."""
    dtype = var.dtype.base_dtype
    shape = [int(x) for x in var.shape]
    ph = tf.compat.v1.placeholder(dtype, [None] + shape[1:], name="rows")
    start = tf.compat.v1.placeholder(tf.int64, [], name="start")
    stop = tf.compat.v1.placeholder(tf.int64, [], name="stop")
    fed = tf.range(start, start + tf.shape(ph, out_type=tf.int64)[0])
    read = tf.range(start, stop)
    # A scatter of whole rows into the variable's own buffer: a memcpy per row, in place.
    # (var[start:stop].assign() — StridedSliceAssign — measured 7x slower on fc6's 58 MB rows.)
    if is_resource(var):
        op = tf.raw_ops.ResourceScatterUpdate(resource=var.handle, indices=fed, updates=ph)
        rows = tf.raw_ops.ResourceGather(resource=var.handle, indices=read, dtype=dtype)
    else:
        op = tf.compat.v1.scatter_update(var, fed, ph).op
        rows = tf.gather(var, read)
    return ph, start, op, stop, rows


def _give_buffer(tf: Any, var: Any) -> Any:
    """An op giving ``var`` an uninitialised buffer of its shape (to be overwritten row by row)."""
    empty = tf.raw_ops.Empty(shape=[int(x) for x in var.shape], dtype=var.dtype.base_dtype, init=False)
    return var.assign(empty, read_value=False) if is_resource(var) else tf.compat.v1.assign(var, empty).op


class EagerFeeds(Feeds):
    """TF2 variables (``tf.Variable``, resource-backed) by name, assigned eagerly."""

    def __init__(self, tf: Any, targets: Mapping[str, Any], chunk_bytes: int) -> None:
        self._tf = tf
        self._vars = dict(targets)
        self.rows = {n: rows_per_slice(tuple(int(x) for x in v.shape), v.dtype.size, chunk_bytes) for n, v in self._vars.items()}

    def assign(self, pairs: list[tuple[str, np.ndarray]]) -> None:
        for name, array in pairs:
            self._vars[name].assign(array, read_value=False)

    def assign_rows(self, name: str, start: int, block: np.ndarray) -> None:
        tf = self._tf
        var = self._vars[name]
        rows = tf.range(start, start + block.shape[0], dtype=tf.int64)
        tf.raw_ops.ResourceScatterUpdate(resource=var.handle, indices=rows, updates=tf.constant(block, dtype=var.dtype))

    def fresh_buffers(self) -> None:
        tf = self._tf
        for name, rows in self.rows.items():
            if rows:
                var = self._vars[name]
                var.assign(tf.raw_ops.Empty(shape=[int(x) for x in var.shape], dtype=var.dtype, init=False), read_value=False)

    def settle(self) -> None:
        for name, rows in self.rows.items():
            if rows:
                self._tf.raw_ops.DisableCopyOnRead(resource=self._vars[name].handle)

    def read(self, names: list[str]) -> list[np.ndarray]:
        return [self._vars[n].read_value().numpy() for n in names]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        tf = self._tf
        var = self._vars[name]
        rows = tf.raw_ops.ResourceGather(resource=var.handle, indices=tf.range(start, stop, dtype=tf.int64), dtype=var.dtype)
        return np.asarray(rows.numpy())


class VariableSink(Sink):
    """Feeds each planned tensor into its variable through ``feeds`` (see the module docstring).

    Nothing is written to disk: :attr:`path` names the target in messages and the report, and
    the read-back reads the variables.
    """

    streams = True

    def __init__(self, feeds: Feeds, path: str, *, chunk_bytes: int = 64 << 20) -> None:
        super().__init__(path)
        self.feeds = feeds
        self._chunk = chunk_bytes
        self._group: list[tuple[str, np.ndarray]] = []
        self._group_bytes = 0
        self._specs: dict[str, TensorSpec] = {}

    def begin(self, specs: list[TensorSpec]) -> None:
        self._specs = {s.name: s for s in specs}
        self.feeds.fresh_buffers()

    def put(self, tensor: Encoded) -> None:
        self._feed(tensor.name, tensor.array)

    def _feed(self, name: str, array: np.ndarray) -> None:
        rows = self.feeds.rows[name]
        if not rows:
            n = array_nbytes(array)
            if self._group and self._group_bytes + n > self._chunk:
                self._flush()
            self._group.append((name, array))
            self._group_bytes += n
            return
        for i in range(0, array.shape[0], rows):
            self.feeds.assign_rows(name, i, array[i:i + rows])

    def put_blocks(self, name: str, stream: BlockStream) -> None:
        """Whole rows go straight to the variable; a row split across blocks is gathered first."""
        shape = stream.spec.shape
        if not self.feeds.rows[name]:
            whole = np.empty(shape, dtype=numpy_dtype(stream.spec.dtype))
            flat = whole.reshape(-1)
            pos = 0
            for _, block in stream:  # a block is valid until the next: copied into the tensor's own buffer
                flat[pos:pos + block.size] = block.reshape(-1)
                pos += block.size
            self._feed(name, whole)
            return
        row: np.ndarray | None = None
        row_elems = math.prod(shape[1:])
        filled = 0
        for sel, block in stream:
            if len(sel) == 1:  # whole rows a:b
                rows = sel[0]
                if not isinstance(rows, slice):
                    raise TypeError(f"a one-axis selection is a run of rows, not {rows!r}")
                self.feeds.assign_rows(name, rows.start, block.reshape(block_shape(shape, sel)))
                continue
            if row is None:
                row = np.empty(shape[1:], dtype=block.dtype)
            row[sel[1:]] = block.reshape(block_shape(shape[1:], sel[1:]))
            filled += block.size
            if filled == row_elems:
                first = sel[0]
                if not isinstance(first, int):
                    raise TypeError(f"a selection inside a row starts with its row index, not {first!r}")
                self.feeds.assign_rows(name, first, row[np.newaxis])
                filled = 0

    def _flush(self) -> None:
        if self._group:
            self.feeds.assign(self._group)
        self._group.clear()
        self._group_bytes = 0

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        self._flush()
        self.feeds.settle()

    @property
    def readback_path(self) -> str:
        return self.path

    def open_readback(self) -> Source:
        return _Variables(self.feeds, self._specs, self.path, self._chunk)

    def abort(self) -> None:
        self._group.clear()


class _Variables(Source):
    """What the variables hold now, as a source: the read-back of a :class:`VariableSink`."""

    kind = "variables"

    def __init__(self, feeds: Feeds, specs: Mapping[str, TensorSpec], path: str, chunk_bytes: int) -> None:
        self._feeds, self._specs, self.path, self._chunk = feeds, dict(specs), path, chunk_bytes
        self._order = [n for n in self._specs if not feeds.rows[n]]  # the pipe reads back in the order it wrote
        self._at: dict[str, int] = {n: i for i, n in enumerate(self._order)}
        self._read: dict[str, np.ndarray] = {}

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> np.ndarray:
        spec = self.spec(name)
        if self._feeds.rows[name]:
            return self._feeds.read_rows(name, 0, spec.shape[0])
        if name not in self._read:  # this one and those after it, up to chunk_bytes, in one run
            group: list[str] = []
            total = 0
            for n in self._order[self._at[name]:]:
                if group and total + self._specs[n].nbytes > self._chunk:
                    break
                group.append(n)
                total += self._specs[n].nbytes
            self._read = dict(zip(group, self._feeds.read(group)))
        return self._read.pop(name)

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        spec = self.spec(name)
        rows = self._feeds.rows[name]
        if not rows:
            return None
        return BlockStream(spec, self._rows(name, spec.shape[0], rows))

    def _rows(self, name: str, n: int, rows: int) -> Iterator[tuple[Selection, np.ndarray]]:
        for i in range(0, n, rows):
            block = np.ascontiguousarray(self._feeds.read_rows(name, i, min(n, i + rows)))
            yield (slice(i, i + block.shape[0]),), block
