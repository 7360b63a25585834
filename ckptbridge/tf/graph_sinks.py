"""Sinks that write the checkpoint of a built graph: what ``import --model`` hands to the one pipe.

``_pipe.transfer`` drives them like any other sink (the same read, checksum,
progress, read-back, publish and abort), so a graph rebuild has no loop of its own:

* :class:`SaverSink` fills the graph's variables through placeholders (row
  slices for large ones, never graph constants) in a session, the
  :class:`~ckptbridge.tf.feeds.VariableSink` that ``assign`` uses too, and
  ``tf.compat.v1.train.Saver`` writes the checkpoint;
* :class:`NativeGraphSink` is the native checkpoint writer plus the graph's
  ``.meta``, and TensorFlow's reader checks that the bundle lists exactly the
  graph's names, dtypes and shapes before it is published.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from .._source import Source, SourceView
from ..bundle import BundleReader
from ..bundle.sink import NativeCheckpointSink
from ..errors import CkptBridgeError, CorruptError
from ..io.atomic import AtomicCheckpoint
from ..io.chunks import BlockStream
from ..io.ckptfiles import meta_path
from ..spec import TensorSpec
from .engine import tf_dtype_name
from .feeds import Feeds, GraphFeeds, VariableSink, VarPart


class SaverSink(VariableSink):
    """Feeds each variable of ``graph`` in a session of its own (a :class:`VariableSink` over
    :class:`GraphFeeds`); ``saver`` then writes the result.

    ``variables`` maps every name that will be written to its graph variable;
    ``parts`` maps a partitioned variable's name to its parts, each (graph variable,
    offset in the full tensor), fed the slice of the full tensor it holds;
    ``missing`` are the graph's other variables, left at their initializers.
    """

    _out: AtomicCheckpoint

    def __init__(self, tf: Any, graph: Any, saver: Any, variables: dict[str, Any], missing: list[Any], prefix: str, *,
                 force: bool = False, chunk_bytes: int = 64 << 20, parts: Mapping[str, list[Part]] | None = None) -> None:
        self._tf, self._graph, self._saver = tf, graph, saver
        self._targets = {n: [_whole(v)] for n, v in variables.items()}
        self._targets.update({n: [VarPart(v, tuple(off), tuple(int(x) for x in v.shape)) for v, off in ps] for n, ps in (parts or {}).items()})
        self._missing = missing
        self._sess: Any = None
        self._out = AtomicCheckpoint(prefix, force=force)
        super().__init__(_Unbuilt(), prefix, chunk_bytes=chunk_bytes)

    def begin(self, specs: list[TensorSpec]) -> None:
        tf = self._tf
        with self._graph.as_default():
            self._saver.export_meta_graph(meta_path(self._out.tmp_prefix))  # before the feed ops: the .meta is the model alone
            feeds = GraphFeeds(tf, self._graph, {s.name: self._targets[s.name] for s in specs}, self._chunk)
            init_missing = tf.compat.v1.variables_initializer(self._missing) if self._missing else None
        self._graph.finalize()
        self._sess = feeds.session = tf.compat.v1.Session(graph=self._graph, config=session_config(tf))
        self.feeds = feeds
        if init_missing is not None:
            self._sess.run(init_missing)
        super().begin(specs)

    @property
    def readback_path(self) -> str:
        return self._out.tmp_prefix

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        super().finish(metadata)
        with self._graph.as_default():
            self._saver.save(self._sess, self._out.tmp_prefix, write_meta_graph=False, write_state=False)
        self._close()

    def open_readback(self) -> Source:
        # What the Saver wrote is read back natively, streamed (TensorFlow would copy every tensor whole);
        # the variables left at their initializers were not sent, so they are not compared.
        return _Without(BundleReader(self._out.tmp_prefix, verify=True), {saved_name(v) for v in self._missing})

    def abort(self) -> None:
        super().abort()
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


def _whole(var: Any) -> VarPart:
    return VarPart(var, (0,) * len(var.shape), tuple(int(x) for x in var.shape))


class _Unbuilt(Feeds):
    """The feeds of a :class:`SaverSink` before :meth:`SaverSink.begin` builds them in its graph."""

    rows: dict[str, int] = {}

    def _none(self) -> NoReturn:
        raise CkptBridgeError("internal error: the Saver's feeds are used before begin()")

    def assign(self, pairs: list[tuple[str, np.ndarray]]) -> None:
        self._none()

    def assign_rows(self, name: str, start: int, block: np.ndarray) -> None:
        self._none()

    def fresh_buffers(self) -> None:
        self._none()

    def settle(self) -> None:
        self._none()

    def read(self, names: list[str]) -> list[np.ndarray]:
        self._none()

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        self._none()


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
