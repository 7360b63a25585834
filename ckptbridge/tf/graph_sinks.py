"""Sinks that write the checkpoint of a built graph: what ``import --model`` hands to the one pipe.

``_pipe.transfer`` drives them like any other sink (the same read, checksum,
progress, read-back, publish and abort), so a graph rebuild has no loop of its own:

* :class:`SaverSink` fills the graph's variables through placeholders (row
  slices for large ones, never graph constants) in a session, and
  ``tf.compat.v1.train.Saver`` writes the checkpoint;
* :class:`NativeGraphSink` is the native checkpoint writer plus the graph's
  ``.meta``, and TensorFlow's reader checks that the bundle lists exactly the
  graph's names, dtypes and shapes before it is published.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._source import Encoded, Sink, Source, SourceView
from ..bundle import BundleReader
from ..bundle.sink import NativeCheckpointSink
from ..errors import CorruptError
from ..io.atomic import AtomicCheckpoint
from ..io.chunks import BlockStream, block_shape
from ..io.ckptfiles import meta_path
from ..spec import TensorSpec, array_nbytes, numpy_dtype
from .engine import tf_dtype_name


class SaverSink(Sink):
    """Feeds each variable of ``graph`` through a placeholder; ``saver`` writes the result.

    ``variables`` maps every name that will be written to its graph variable;
    ``parts`` maps a partitioned variable's name to its parts, each (graph variable,
    offset in the full tensor), fed the slice of the full tensor it holds;
    ``missing`` are the graph's other variables, left at their initializers.
    Variables over ``chunk_bytes`` are fed in row slices into an uninitialised
    buffer; smaller ones are fed together, a few ``session.run`` calls for the
    whole model (each distinct run costs TensorFlow an executor over the graph).
    """

    streams = True
    _out: AtomicCheckpoint

    def __init__(self, tf: Any, graph: Any, saver: Any, variables: dict[str, Any], missing: list[Any], prefix: str, *,
                 force: bool = False, chunk_bytes: int = 64 << 20, parts: Mapping[str, list[Part]] | None = None) -> None:
        super().__init__(prefix)
        self._tf, self._graph, self._saver = tf, graph, saver
        self._vars = dict(variables)
        # A part is fed like a variable of its own, under a key no tensor name has.
        self._parts = {name: [(f"{name}\x00part{i}", off, tuple(int(x) for x in v.shape)) for i, (v, off) in enumerate(ps)]
                       for name, ps in (parts or {}).items()}
        for name, ps in (parts or {}).items():
            self._vars.update({key: v for (key, _, _), (v, _) in zip(self._parts[name], ps)})
        self._missing = missing
        self._chunk = chunk_bytes
        self._sess: Any = None
        self._feeds: dict[str, tuple[Any, Any, Any | None, int]] = {}
        self._group: list[tuple[str, np.ndarray]] = []
        self._group_bytes = 0
        self._no_copy: list[Any] = []
        self._out = AtomicCheckpoint(prefix, force=force)

    def begin(self, specs: list[TensorSpec]) -> None:
        tf = self._tf
        with self._graph.as_default():
            self._saver.export_meta_graph(meta_path(self._out.tmp_prefix))  # before the feed ops: the .meta is the model alone
            keys = [k for s in specs for k in ([p[0] for p in self._parts[s.name]] if s.name in self._parts else [s.name])]
            self._feeds = {k: _assign_ops(tf, self._vars[k], self._chunk) for k in keys}
            init_missing = tf.compat.v1.variables_initializer(self._missing) if self._missing else None
            chunked = [self._vars[n] for n, f in self._feeds.items() if f[2] is not None]
            # A large variable gets an uninitialised buffer of its shape (every row is then fed):
            # a zero fill costs a pass over it, and the buffer it leaves behind is shared, so the
            # first in-place update copied the whole variable (measured: +411 MB for fc6).
            fill = [_give_buffer(tf, v) for v in chunked]
            # A scatter puts a resource variable in copy-on-read mode, in which the Saver's read
            # copies the whole variable (measured: +390 MB for fc6); the buffer is ours alone.
            self._no_copy = [tf.raw_ops.DisableCopyOnRead(resource=v.handle) for v in chunked if _is_resource(v)]
        self._graph.finalize()
        self._sess = tf.compat.v1.Session(graph=self._graph, config=session_config(tf))
        if init_missing is not None:
            self._sess.run(init_missing)
        if fill:
            self._sess.run(fill)

    def put(self, tensor: Encoded) -> None:
        self._put_array(tensor.name, tensor.array)

    def _put_array(self, name: str, array: np.ndarray) -> None:
        if name in self._parts:
            for key, offset, shape in self._parts[name]:
                self._feed(key, array[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
            return
        self._feed(name, array)

    def _feed(self, name: str, array: np.ndarray) -> None:
        ph, op, start, rows = self._feeds[name]
        if start is None:
            n = array_nbytes(array)
            if self._group and self._group_bytes + n > self._chunk:
                self._flush()
            self._group.append((name, array))
            self._group_bytes += n
            return
        for i in range(0, array.shape[0], rows):
            self._sess.run(op, {ph: array[i:i + rows], start: i})

    def put_blocks(self, name: str, stream: BlockStream) -> None:
        """Whole rows go straight to the variable; a row split across blocks is gathered first."""
        if name in self._parts:  # each part takes a slice of the whole: gathered first
            self._put_array(name, _gather(stream))
            return
        ph, op, start, _ = self._feeds[name]
        shape = stream.spec.shape
        if start is None:
            self._feed(name, _gather(stream))
            return
        row: np.ndarray | None = None
        row_elems = math.prod(shape[1:])
        filled = 0
        for sel, block in stream:
            if len(sel) == 1:  # whole rows a:b
                rows = sel[0]
                if not isinstance(rows, slice):
                    raise TypeError(f"a one-axis selection is a run of rows, not {rows!r}")
                self._sess.run(op, {ph: block.reshape(block_shape(shape, sel)), start: rows.start})
                continue
            if row is None:
                row = np.empty(shape[1:], dtype=block.dtype)
            row[sel[1:]] = block.reshape(block_shape(shape[1:], sel[1:]))
            filled += block.size
            if filled == row_elems:
                self._sess.run(op, {ph: row[np.newaxis], start: sel[0]})
                filled = 0

    def _flush(self) -> None:
        if self._group:
            self._sess.run([self._feeds[n][1] for n, _ in self._group], {self._feeds[n][0]: a for n, a in self._group})
        self._group.clear()
        self._group_bytes = 0

    @property
    def readback_path(self) -> str:
        return self._out.tmp_prefix

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        self._flush()
        if self._no_copy:
            self._sess.run(self._no_copy)
        with self._graph.as_default():
            self._saver.save(self._sess, self._out.tmp_prefix, write_meta_graph=False, write_state=False)
        self._close()

    def open_readback(self) -> Source:
        # What the Saver wrote is read back natively, streamed (TensorFlow would copy every tensor whole);
        # the variables left at their initializers were not sent, so they are not compared.
        return _Without(BundleReader(self._out.tmp_prefix, verify=True), {saved_name(v) for v in self._missing})

    def abort(self) -> None:
        self._group.clear()
        try:
            self._close()
        finally:
            self._out.abort()

    def _close(self) -> None:
        if self._sess is not None:
            sess, self._sess = self._sess, None
            sess.close()


#: a part of a partitioned variable: (its graph variable, its offset in the full tensor)
Part = tuple[Any, tuple[int, ...]]


def saved_name(var: Any) -> str:
    """The name a Saver stores ``var`` under by default: its op's, or a partitioned variable's full name."""
    info = getattr(var, "_save_slice_info", None)
    return str(info.full_name) if info is not None else str(var.op.name)


def session_config(tf: Any) -> Any:
    """A session's options: an imported training graph may pin ops to devices this machine lacks
    (``/job:worker``, a GPU); they run where they can, and the graph keeps its placements."""
    return tf.compat.v1.ConfigProto(allow_soft_placement=True)


def _gather(stream: BlockStream) -> np.ndarray:
    """A whole tensor from its blocks (a block is valid until the next: copied into the tensor's own buffer)."""
    whole = np.empty(stream.spec.shape, dtype=numpy_dtype(stream.spec.dtype))
    flat = whole.reshape(-1)
    pos = 0
    for _, block in stream:
        flat[pos:pos + block.size] = block.reshape(-1)
        pos += block.size
    return whole


class _Without(SourceView):
    """``inner`` without the tensors ``names`` (for a read-back of what was sent)."""

    def __init__(self, inner: Source, names: set[str]) -> None:
        super().__init__(inner)
        self._specs = {n: s for n, s in inner.specs().items() if n not in names}

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> np.ndarray:
        self.spec(name)
        return self._inner.read(name)

    def read_blocks(self, name: str, chunk_bytes: int) -> BlockStream | None:
        self.spec(name)
        return self._inner.read_blocks(name, chunk_bytes)


class NativeGraphSink(NativeCheckpointSink):
    """The native checkpoint writer for a graph: the Saver's ``.meta`` beside the bundle, and
    TensorFlow's reader as the oracle of names, dtypes and shapes before anything is published."""

    def __init__(self, tf: Any, graph: Any, saver: Any, expected: dict[str, tuple[str, tuple[int, ...]]], prefix: str, *,
                 force: bool = False, max_shard_bytes: int | None = None) -> None:
        super().__init__(prefix, force=force, max_shard_bytes=max_shard_bytes)
        self._tf, self._graph, self._saver, self._expected = tf, graph, saver, expected

    def begin(self, specs: list[TensorSpec]) -> None:
        super().begin(specs)
        with self._graph.as_default():
            self._saver.export_meta_graph(meta_path(self.readback_path))

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        super().finish(metadata)
        # Reading every tensor through TensorFlow too would copy each (fc6: 411 MB); the bytes
        # are compared natively by the pipe's read-back, TensorFlow checks the index.
        _tf_index_check(self._tf, self.readback_path, self._expected, self.path)


def _tf_index_check(tf: Any, prefix: str, expected: dict[str, tuple[str, tuple[int, ...]]], output_prefix: str) -> None:
    """TensorFlow's own reader opens ``prefix``: every name, dtype and shape must be as expected."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except Exception as e:  # noqa: BLE001 - whatever TensorFlow raises, the output is not what we meant
        raise CorruptError(f"TensorFlow cannot read the checkpoint written for {output_prefix}: {type(e).__name__}: {e}; output discarded") from None
    got = {n: (tf_dtype_name(dtypes[n]), tuple(int(x) for x in shapes[n])) for n in shapes}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
        raise CorruptError(f"TensorFlow reads the checkpoint written for {output_prefix} differently ({', '.join(diff[:5])}); output discarded")


def _assign_ops(tf: Any, var: Any, chunk_bytes: int) -> tuple[Any, Any, Any | None, int]:
    """(placeholder, assign op, start placeholder or None, rows per chunk)."""
    dtype = var.dtype.base_dtype
    shape = [int(x) for x in var.shape]
    row_bytes = dtype.size * int(np.prod(shape[1:], dtype=np.int64)) if shape else dtype.size
    total = row_bytes * (shape[0] if shape else 1)
    name = var.op.name.replace("/", "_")
    if not shape or total <= chunk_bytes or shape[0] <= 1:
        ph = tf.compat.v1.placeholder(dtype, shape, name=f"ckptbridge_feed/{name}")
        return ph, tf.compat.v1.assign(var, ph, validate_shape=True) if not _is_resource(var) else var.assign(ph, read_value=False), None, 0
    rows = max(1, chunk_bytes // max(row_bytes, 1))
    ph = tf.compat.v1.placeholder(dtype, [None] + shape[1:], name=f"ckptbridge_feed/{name}")
    start = tf.compat.v1.placeholder(tf.int64, [], name=f"ckptbridge_start/{name}")
    rows_fed = tf.range(start, start + tf.shape(ph, out_type=tf.int64)[0])
    # A scatter of whole rows into the variable's own buffer: a memcpy per row, in place.
    # (var[start:stop].assign() — StridedSliceAssign — measured 7x slower on fc6's 58 MB rows.)
    if _is_resource(var):
        op = tf.raw_ops.ResourceScatterUpdate(resource=var.handle, indices=rows_fed, updates=ph)
    else:
        op = tf.compat.v1.scatter_update(var, rows_fed, ph).op
    return ph, op, start, rows


def _give_buffer(tf: Any, var: Any) -> Any:
    """An op giving ``var`` an uninitialised buffer of its shape (to be overwritten row by row)."""
    dtype = var.dtype.base_dtype
    empty = tf.raw_ops.Empty(shape=[int(x) for x in var.shape], dtype=dtype, init=False)
    return var.assign(empty, read_value=False) if _is_resource(var) else tf.compat.v1.assign(var, empty).op


def _is_resource(var: Any) -> bool:
    return "Resource" in type(var).__name__ or hasattr(var, "handle")
