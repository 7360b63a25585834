"""Reading and writing checkpoints through TensorFlow itself.

Reading uses TensorFlow's checkpoint reader (``NewCheckpointReader``, what
``tf.train.load_checkpoint`` opens once it has a prefix; V1 and V2, sharded, partitioned);
writing, graph-free, uses ``SaveV2`` on batches of tensors that are merged with
``MergeV2Checkpoints``, so memory stays bounded by one batch.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .. import _dtypes
from .._dtypes import uncarried_error
from .._source import OBJECT_GRAPH, OBJECT_GRAPH_KEY, Encoded, Sink, Source
from ..errors import CorruptError, FormatError, NotFoundError, option
from ..io.atomic import AtomicCheckpoint
from ..io.containers import Scratch, stage
from ..io.ranged import Place, where
from ..io.signals import raise_signals_after
from ..spec import STRING, TensorSpec, array_nbytes, as_exchange_array
from .compat import import_tensorflow

DEFAULT_BATCH_BYTES = 512 << 20
# What TensorFlow's C++ checkpoint reader raises on a damaged checkpoint besides OpError: pybind turns
# status codes into built-ins (OUT_OF_RANGE -> IndexError for a truncated .data shard, INVALID_ARGUMENT ->
# ValueError, UNIMPLEMENTED -> NotImplementedError, others -> RuntimeError).
_TF_READ_ERRORS: tuple[type[BaseException], ...] = (ValueError, IndexError, RuntimeError, NotImplementedError)


def tf_dtype_name(dt: Any) -> str:
    """The canonical name of a ``tf.DType`` (from its enum, through the one dtype table)."""
    d = _dtypes.by_enum(int(dt.as_datatype_enum))
    return d.name if d is not None else f"DataType {int(dt.as_datatype_enum)}"


def _tf_error(e: Exception, path: str) -> Exception:
    tf = import_tensorflow()
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, tf.errors.NotFoundError):
        return NotFoundError(f"{path}: TensorFlow cannot find the checkpoint ({msg}); check the path")
    if isinstance(e, (tf.errors.UnimplementedError, NotImplementedError)):
        # What TensorFlow's reader does not do (a V1 tensor saved in slices, a dtype it reads from V1 files
        # only through Saver.restore), not damage: the native engine reads these.
        return FormatError(f"{path}: TensorFlow's checkpoint reader cannot read this ({msg}), a limit of the reader, "
                           f"not damage; read it with {option('engine', 'native')}")
    return CorruptError(f"{path}: TensorFlow cannot read the checkpoint ({msg}); the checkpoint is damaged or incomplete")


def _files_of(place: Place, prefix: str) -> list[str]:
    """The files of the checkpoint ``prefix`` in ``place``: a V2 index and the data shards its
    header counts, or a V1 checkpoint's file(s)."""
    from ..bundle._entries import parse_header
    from ..bundle._table import read_table
    from ..bundle.v1_shards import v1_files
    from ..io.ckptfiles import data_path, index_path

    if not place.exists(index_path(prefix)):
        return v1_files(prefix, place)
    with place.open(index_path(prefix)) as f:
        data = f.pread(0, f.size)
    try:
        header = parse_header(next(iter(read_table(data)))[1])
    except Exception as e:  # noqa: BLE001 - any damage: TensorFlow's own reader will say what is wrong
        raise CorruptError(f"{where(place, index_path(prefix))}: cannot read the checkpoint index ({e})") from None
    return [index_path(prefix)] + [data_path(prefix, i, header.num_shards) for i in range(header.num_shards)]


@contextlib.contextmanager
def _tf_logging_off() -> Iterator[None]:
    """TensorFlow's Python logger silenced: what it would log ("ERROR:tensorflow:...") is raised and
    reported as one error instead."""
    log = logging.getLogger("tensorflow")
    was = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was


def _reader_path(prefix: str) -> str:
    """What TensorFlow's reader opens for the local checkpoint at ``prefix``: the prefix (a V2
    checkpoint, or one V1 file), or for a sharded V1 checkpoint (named by its prefix or by one
    shard) the pattern of all its shards, which the reader merges."""
    from ..bundle.v1_shards import v1_files
    from ..io.ckptfiles import index_path, v1_pattern, v1_shard_base

    if os.path.isfile(index_path(prefix)):
        return prefix
    files = v1_files(prefix)
    base = v1_shard_base(files[0])
    if len(files) == 1 or base is None:
        return files[0]
    return v1_pattern(glob.escape(base), len(files))


class TfCheckpointSource(Source):
    """A checkpoint read through TensorFlow's checkpoint reader.

    With ``place``, ``prefix`` is the checkpoint's name inside it, and the source
    owns the place.  TensorFlow reads real files: a place without a local
    directory (an archive's members, a remote prefix) has the checkpoint's files
    copied into bounded temporary space first, removed on close."""

    kind = "checkpoint"

    def __init__(self, prefix: str, *, place: Place | None = None) -> None:
        tf = import_tensorflow()
        self._place = place
        self._scratch: Scratch | None = None
        if place is not None:
            self.path = where(place, prefix)
            try:
                local = place.local_dir()
                if local is None:
                    self._scratch, local = stage(place, _files_of(place, prefix))
            except BaseException:
                self.close()
                raise
            prefix = os.path.join(local, *prefix.split("/"))
        else:
            self.path = prefix
        try:
            # The prefix is resolved already: tf.train.load_checkpoint would take a prefix that names a
            # directory (Saver.save(sess, "dir/") writes dir/.index) for a directory to search.
            with _tf_logging_off():
                self._reader = tf.compat.v1.train.NewCheckpointReader(_reader_path(prefix))
            shapes = self._reader.get_variable_to_shape_map()
            dtypes = self._reader.get_variable_to_dtype_map()
        except _TF_READ_ERRORS + (tf.errors.OpError,) as e:
            self.close()
            raise _tf_error(e, self.path) from None
        except BaseException:
            self.close()
            raise
        specs = {n: TensorSpec(n, tf_dtype_name(dtypes[n]), tuple(int(x) for x in shapes[n])) for n in sorted(shapes) if n != OBJECT_GRAPH_KEY}
        self._specs = {n: s for n, s in specs.items() if s.carried}
        self._uncarried = {n: s for n, s in specs.items() if not s.carried}
        self._has_graph = OBJECT_GRAPH_KEY in shapes

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def uncarried(self) -> Mapping[str, TensorSpec]:
        return self._uncarried

    def extras(self) -> dict[str, bytes]:
        if not self._has_graph:
            return {}
        tf = import_tensorflow()
        try:
            with raise_signals_after():
                return {OBJECT_GRAPH: bytes(self._reader.get_tensor(OBJECT_GRAPH_KEY))}
        except _TF_READ_ERRORS + (tf.errors.OpError,) as e:
            raise _tf_error(e, f"{self.path}: {OBJECT_GRAPH_KEY}") from None

    def read(self, name: str) -> np.ndarray:
        if name in self._uncarried:
            raise uncarried_error(self.path, {name: self._uncarried[name].dtype})
        spec = self.spec(name)
        tf = import_tensorflow()
        try:
            with raise_signals_after():  # a KeyboardInterrupt raised inside get_tensor's callbacks is lost
                value = self._reader.get_tensor(name)
        except _TF_READ_ERRORS + (tf.errors.OpError,) as e:
            raise _tf_error(e, f"{self.path}: tensor {name!r}") from None
        if isinstance(value, bytes):  # 0-d string
            out = np.empty((), dtype=object)
            out[()] = value
            return out
        arr = as_exchange_array(value)
        want = _dtypes.numpy_dtype(spec.dtype)
        if arr.dtype != want and arr.dtype.itemsize == want.itemsize and spec.dtype != STRING:
            arr = arr.view(want)  # quantized tensors come back as their plain integers
        if tuple(arr.shape) != spec.shape:
            raise CorruptError(f"{self.path}: tensor {name!r} reads as {list(arr.shape)}, index says {list(spec.shape)}")
        return arr

    def close(self) -> None:
        self._reader = None
        if self._scratch is not None:
            self._scratch.remove()
            self._scratch = None
        if self._place is not None:
            self._place.close()
            self._place = None


class TfCheckpointSink(Sink):
    """Writes exactly the given tensors as a V2 checkpoint with TensorFlow's own ops."""

    _out: AtomicCheckpoint

    def __init__(self, prefix: str, *, force: bool = False, max_shard_bytes: int | None = None, update_state: bool = True) -> None:
        super().__init__(prefix)
        self._tf = import_tensorflow()
        self._out = AtomicCheckpoint(prefix, force=force, update_state=update_state)
        self._parts: list[str] = []
        self._batch: list[tuple[str, np.ndarray]] = []
        self._batch_bytes = 0
        self._limit = max_shard_bytes or DEFAULT_BATCH_BYTES

    def begin(self, specs: list[TensorSpec]) -> None:
        from ..bundle.writer import check_keys

        check_keys([s.name for s in specs], self.path)  # every bad name refused before the first SaveV2

    def check_name(self, name: str) -> None:
        from ..bundle.writer import key_problem

        problem = key_problem(name)
        if problem is not None:
            raise FormatError(problem)

    def put(self, tensor: Encoded) -> None:
        name, array = tensor.name, tensor.array
        size = array_nbytes(array)
        if self._batch and self._batch_bytes + size > self._limit:
            self._flush()
        self._batch.append((name, array))
        self._batch_bytes += size

    def write_extra(self, key: str, payload: bytes) -> None:
        if key == OBJECT_GRAPH:
            value = np.empty((), dtype=object)
            value[()] = payload
            self._batch.append((OBJECT_GRAPH_KEY, value))

    def _flush(self) -> None:
        if not self._batch:
            return
        tf = self._tf
        part = os.path.join(self._out.tmpdir, "parts", f"part-{len(self._parts):05d}")
        names = [n for n, _ in self._batch]
        tensors = [tf.convert_to_tensor(a) for _, a in self._batch]
        with tf.device("/cpu:0"):
            with raise_signals_after():
                tf.raw_ops.SaveV2(prefix=part, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
        self._parts.append(part)
        self._batch.clear()
        self._batch_bytes = 0

    @property
    def readback_path(self) -> str:
        return self._out.tmp_prefix

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        tf = self._tf
        self._flush()
        if not self._parts:
            raise FormatError(f"no tensors to write to {self.path}; check {option('include')}/{option('exclude')}")
        with raise_signals_after():
            tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=self._parts, destination_prefix=self._out.tmp_prefix, delete_old_dirs=True)

    def open_readback(self) -> Source:
        return TfCheckpointSource(self._out.tmp_prefix)

    def abort(self) -> None:
        self._batch.clear()
        self._out.abort()
