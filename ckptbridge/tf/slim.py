"""tf-slim nets: a registry, and rebuilding a checkpoint through the slim graph.

The graph is built with the net's own arg_scope (so batch norm, biases and
names are those of the model zoo), its global variables are matched to the
archive by name, shape and dtype, and then either

* ``engine`` "auto"/"tf": each variable is filled through a placeholder — in
  slices of at most ``chunk_bytes`` for large ones, never as a graph constant —
  and ``tf.compat.v1.train.Saver`` writes the checkpoint; or
* ``engine`` "native": the bundle is streamed from the archive by ckptbridge's
  own writer, and TensorFlow only builds the graph and its ``.meta``.

Either way the result is read back and compared before it is published.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._atomic import AtomicCheckpoint
from .._chunks import CHUNK_BYTES, block_shape
from .._source import Source
from .._spec import TensorSpec, array_nbytes
from ..bundle import BundleReader
from ..convert import Report, exchange_checksum
from ..errors import CkptBridgeError, FormatError, MismatchError
from ..names import make_plan
from ..progress import bar
from .compat import import_slim, import_tensorflow
from .engine import tf_dtype_name


@dataclasses.dataclass(frozen=True)
class NetInfo:
    module: str
    function: str
    arg_scope: str
    image_size: int
    num_classes: int


_V1 = "tf_slim.nets.resnet_v1"
_V2 = "tf_slim.nets.resnet_v2"
_INC = "tf_slim.nets.inception"
NETS: dict[str, NetInfo] = {
    "vgg_a": NetInfo("tf_slim.nets.vgg", "vgg_a", "vgg_arg_scope", 224, 1000),
    "vgg_16": NetInfo("tf_slim.nets.vgg", "vgg_16", "vgg_arg_scope", 224, 1000),
    "vgg_19": NetInfo("tf_slim.nets.vgg", "vgg_19", "vgg_arg_scope", 224, 1000),
    **{f"resnet_v1_{d}": NetInfo(_V1, f"resnet_v1_{d}", "resnet_arg_scope", 224, 1000) for d in (50, 101, 152, 200)},
    **{f"resnet_v2_{d}": NetInfo(_V2, f"resnet_v2_{d}", "resnet_arg_scope", 224, 1001) for d in (50, 101, 152, 200)},
    "inception_v1": NetInfo(_INC, "inception_v1", "inception_v1_arg_scope", 224, 1001),
    "inception_v2": NetInfo(_INC, "inception_v2", "inception_v2_arg_scope", 224, 1001),
    "inception_v3": NetInfo(_INC, "inception_v3", "inception_v3_arg_scope", 299, 1001),
    "alexnet_v2": NetInfo("tf_slim.nets.alexnet", "alexnet_v2", "alexnet_v2_arg_scope", 224, 1000),
    "overfeat": NetInfo("tf_slim.nets.overfeat", "overfeat", "overfeat_arg_scope", 231, 1000),
}

# The final classification layer of each family, to read num_classes from an archive.
_LOGITS_RE = re.compile(r"(^|/)(fc8|logits|Logits/Conv2d_0c_1x1|Logits/Conv2d_1c_1x1)/weights$")


def infer_num_classes(specs: dict[str, TensorSpec], default: int) -> int:
    """The number of classes the archive's logits layer was trained for (else ``default``)."""
    for name, spec in specs.items():
        if _LOGITS_RE.search(name) and spec.shape:
            return int(spec.shape[-1])
    return default


def build_net(model: str, num_classes: int | None, specs: dict[str, TensorSpec] | None = None, *, image_size: int | None = None) -> tuple[Any, Any, Any]:
    """Build ``model`` in a fresh graph: (graph, input placeholder or None, output).

    ``image_size`` matters for a few nets whose layer names depend on the input
    (inception_v3's AuxLogits kernel is named after it); default: the net's own.
    """
    tf = import_tensorflow()
    slim = import_slim()
    graph = tf.Graph()
    with graph.as_default():
        if model in NETS:
            info = NETS[model]
            mod = importlib.import_module(info.module)
            fn = getattr(mod, info.function)
            scope = getattr(mod, info.arg_scope)
            n = num_classes if num_classes is not None else infer_num_classes(specs or {}, info.num_classes)
            size = image_size or info.image_size
            images = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3], name="images")
            with slim.arg_scope(scope()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tf-keras' legacy layers warn about their own deprecation
                out = fn(images, num_classes=n, is_training=False)
            logits = out[0] if isinstance(out, tuple) else out
            return graph, images, logits
        fn = _load_user_function(model)
        try:
            out = fn(num_classes=num_classes) if num_classes is not None else fn()
        except CkptBridgeError:
            raise
        except Exception as e:
            raise CkptBridgeError(f"model function {model} failed while building the graph: {type(e).__name__}: {e}") from None
        return graph, None, out


def _load_user_function(spec: str) -> Callable[..., Any]:
    names = ", ".join(sorted(NETS))
    if ":" not in spec:
        raise FormatError(f"unknown model {spec!r}; choose one of {names}, or give package.module:function")
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise FormatError(f"cannot import {mod_name!r} for --model {spec} ({e}); check that it is on PYTHONPATH") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise FormatError(f"{mod_name} has no function {fn_name!r} (--model {spec})")
    return fn


def _describe(dtype: str, shape: Sequence[int]) -> str:
    return f"{dtype}{list(shape)}"


def rebuild_with_graph(
    src: Source,
    output_prefix: str,
    *,
    model: str,
    num_classes: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    use_ema: bool = False,
    allow_missing: bool = False,
    strict: bool = False,
    chunk_bytes: int = 64 << 20,
    engine: str = "auto",
    force: bool = False,
    progress: bool | None = False,
    image_size: int | None = None,
) -> Report:
    """Rebuild a checkpoint for a tf-slim graph from ``src`` (see module docstring)."""
    tf = import_tensorflow()
    if chunk_bytes <= 0:
        raise CkptBridgeError(f"--chunk-mb must be positive, got {chunk_bytes / (1 << 20)}")
    specs = dict(src.specs())
    graph, _, _ = build_net(model, num_classes, specs, image_size=image_size)
    with graph.as_default():
        variables = tf.compat.v1.global_variables()
        if not variables:
            raise CkptBridgeError(f"model {model} created no variables; a model function must build its variables in the default graph")
        by_name = {v.op.name: v for v in variables}
        plan = make_plan(list(specs), include=include, exclude=exclude, use_ema=use_ema,
                         uncarried={n: s.dtype for n, s in src.uncarried().items()}, where=src.path)
        missing = sorted(n for n in by_name if n not in plan.mapping)
        unexpected = sorted(n for n in plan.mapping if n not in by_name)
        if missing and not allow_missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise MismatchError(
                f"{len(missing)} variables of {model} are not in {src.path}: {shown}; "
                "check --model/--num-classes, or pass --allow-missing to leave them at their initializer"
            )
        if unexpected and strict:
            shown = ", ".join(unexpected[:10]) + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
            raise MismatchError(f"{len(unexpected)} entries of {src.path} are not variables of {model}: {shown} (--strict)")
        bad = []
        for name, var in by_name.items():
            if name not in plan.mapping:
                continue
            spec = specs[plan.mapping[name]]
            want_dtype = tf_dtype_name(var.dtype.base_dtype)
            want_shape = tuple(int(x) for x in var.shape)
            if spec.dtype != want_dtype or spec.shape != want_shape:
                bad.append(f"{name}: graph {_describe(want_dtype, want_shape)} vs archive {_describe(spec.dtype, spec.shape)}")
        if bad:
            raise MismatchError(f"{len(bad)} variables do not match {src.path}: " + "; ".join(bad[:10]) + ("" if len(bad) <= 10 else f"; and {len(bad) - 10} more"))
        dropped = dict(plan.dropped)
        for n in unexpected:
            dropped[n] = f"not a variable of {model}"
        mapping = {n: plan.mapping[n] for n in sorted(by_name) if n in plan.mapping}
        swaps = {n: s for n, s in plan.ema_swaps.items() if n in mapping}
        saver = tf.compat.v1.train.Saver(var_list=variables, write_version=tf.compat.v1.train.SaverDef.V2)
        if engine == "native":
            nbytes = _write_native(tf, graph, saver, src, by_name, mapping, missing, output_prefix, force, progress)
        else:
            nbytes = _write_with_saver(tf, graph, saver, src, by_name, mapping, missing, output_prefix, force, chunk_bytes, progress)
    return Report(output_prefix, list(mapping), dropped, swaps, nbytes, missing=missing)


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


def _write_with_saver(tf: Any, graph: Any, saver: Any, src: Source, by_name: dict[str, Any], mapping: dict[str, str],
                      missing: list[str], output_prefix: str, force: bool, chunk_bytes: int, progress: bool | None) -> int:
    out = AtomicCheckpoint(output_prefix, force=force)
    try:
        saver.export_meta_graph(out.tmp_prefix + ".meta")  # before the feed ops, so the .meta is the model alone
        feeds = {n: _assign_ops(tf, by_name[n], chunk_bytes) for n in mapping}
        init_missing = tf.compat.v1.variables_initializer([by_name[n] for n in missing]) if missing else None
        chunked = [by_name[n] for n, f in feeds.items() if f[2] is not None]
        # A large variable gets an uninitialised buffer of its shape (every row is then fed):
        # a zero fill costs a pass over it, and the buffer it leaves behind is shared, so the
        # first in-place update copied the whole variable (measured: +411 MB for fc6).
        zero_fill = [_give_buffer(tf, v) for v in chunked]
        # A scatter puts a resource variable in copy-on-read mode, in which the Saver's read
        # copies the whole variable (measured: +390 MB for fc6); the buffer is ours alone.
        no_copy = [tf.raw_ops.DisableCopyOnRead(resource=v.handle) for v in chunked if _is_resource(v)]
        graph.finalize()
        crcs: dict[str, int] = {}
        total = sum(src.spec(s).nbytes for s in mapping.values())
        pbar = bar(total, "import", progress)
        nbytes = 0
        try:
            with tf.compat.v1.Session(graph=graph) as sess:
                if init_missing is not None:
                    sess.run(init_missing)
                if zero_fill:
                    sess.run(zero_fill)
                # One session.run per group of whole variables (up to chunk_bytes), and one
                # per slice of a large variable: every distinct run signature costs
                # TensorFlow an executor over the whole graph, so few runs is what makes this fast.
                group: list[tuple[str, np.ndarray]] = []
                group_bytes = 0

                def flush() -> None:
                    nonlocal group_bytes
                    if group:
                        sess.run([feeds[n][1] for n, _ in group], {feeds[n][0]: a for n, a in group})
                        pbar.update(group_bytes)
                    group.clear()
                    group_bytes = 0

                for name, source_name in mapping.items():
                    ph, op, start, rows = feeds[name]
                    if start is not None:
                        # A large variable streams from the archive in row blocks: never whole in memory.
                        shape = src.spec(source_name).shape
                        stream = src.read_blocks(source_name, rows * (src.spec(source_name).nbytes // max(shape[0], 1)))
                        if stream is not None:
                            for sel, block in stream:
                                sess.run(op, {ph: block.reshape(block_shape(shape, sel)), start: sel[0].start})
                                pbar.update(block.nbytes)
                            assert stream.crc is not None
                            crcs[name] = stream.crc
                            nbytes += src.spec(source_name).nbytes
                            continue
                    arr = src.read(source_name)
                    crcs[name] = exchange_checksum(arr)
                    n = array_nbytes(arr)
                    nbytes += n
                    if start is None:
                        if group_bytes + n > chunk_bytes:
                            flush()
                        group.append((name, arr))
                        group_bytes += n
                    else:
                        for i in range(0, arr.shape[0], rows):
                            part = arr[i : i + rows]
                            sess.run(op, {ph: part, start: i})
                            pbar.update(array_nbytes(part))
                    del arr
                flush()
                if no_copy:
                    sess.run(no_copy)
                saver.save(sess, out.tmp_prefix, write_meta_graph=False, write_state=False)
        finally:
            pbar.close()
        out.start_sync()  # the disk finishes writing while we read back
        _readback(out.tmp_prefix, crcs, output_prefix, native=True)
        out.commit()
    except BaseException:
        out.abort()
        raise
    return nbytes


def _write_native(tf: Any, graph: Any, saver: Any, src: Source, by_name: dict[str, Any], mapping: dict[str, str],
                  missing: list[str], output_prefix: str, force: bool, progress: bool | None) -> int:
    from .._resolve import open_checkpoint_sink

    initial: dict[str, np.ndarray] = {}
    if missing:
        with tf.compat.v1.Session(graph=graph) as sess:
            mv = [by_name[n] for n in missing]
            sess.run(tf.compat.v1.variables_initializer(mv))
            initial = dict(zip(missing, sess.run(mv)))
    sink = open_checkpoint_sink(output_prefix, engine="native", force=force)
    crcs: dict[str, int] = {}
    nbytes = 0
    pbar = bar(sum(src.spec(s).nbytes for s in mapping.values()), "import", progress)
    try:
        saver.export_meta_graph(sink.readback_path + ".meta")
        expected: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name in sorted(set(mapping) | set(initial)):
            var = by_name[name]
            expected[name] = (tf_dtype_name(var.dtype.base_dtype), tuple(int(x) for x in var.shape))
            # Stream from the archive in blocks (one crc32c pass; never a whole tensor in memory).
            stream = src.read_blocks(mapping[name], CHUNK_BYTES) if name in mapping and sink.streams else None
            if stream is not None:
                sink.write_blocks(name, stream)
                assert stream.crc is not None
                crcs[name] = stream.crc
                n = src.spec(mapping[name]).nbytes
            else:
                arr = src.read(mapping[name]) if name in mapping else initial[name]
                crcs[name] = exchange_checksum(arr)
                sink.write(name, arr)
                n = array_nbytes(arr)
                del arr
            nbytes += n
            pbar.update(n)
        sink.finish()
        sink.start_sync()  # the disk finishes writing while we read back
        # The bytes are read back natively (streamed); TensorFlow, the oracle, opens the same
        # bundle and must list exactly the graph's names, dtypes and shapes.  Reading every
        # tensor through TensorFlow too cost a copy of each (fc6: 411 MB) and ~1 s.
        _readback(sink.readback_path, crcs, output_prefix, native=True)
        _tf_index_check(tf, sink.readback_path, expected, output_prefix)
        sink.publish()
    except BaseException:
        sink.abort()
        raise
    finally:
        pbar.close()
    return nbytes


def _tf_index_check(tf: Any, prefix: str, expected: dict[str, tuple[str, tuple[int, ...]]], output_prefix: str) -> None:
    """TensorFlow's own reader opens ``prefix``: every name, dtype and shape must be as expected."""
    from ..convert import CorruptError

    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except Exception as e:
        raise CorruptError(f"TensorFlow cannot read the checkpoint written for {output_prefix}: {type(e).__name__}: {e}; output discarded") from None
    got = {n: (tf_dtype_name(dtypes[n]), tuple(int(x) for x in shapes[n])) for n in shapes}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
        raise CorruptError(f"TensorFlow reads the checkpoint written for {output_prefix} differently ({', '.join(diff[:5])}); output discarded")


def _readback(tmp_prefix: str, crcs: dict[str, int], output_prefix: str, *, native: bool = False) -> None:
    from ..convert import CorruptError
    from .engine import TfCheckpointSource

    # What the Saver wrote is read back natively, streamed (TensorFlow would copy every
    # tensor whole); what the native writer wrote is read back by TensorFlow, the oracle.
    src: Source = BundleReader(tmp_prefix) if native else TfCheckpointSource(tmp_prefix)
    try:
        for name, crc in crcs.items():
            stream = src.read_blocks(name, CHUNK_BYTES)
            if (stream.drain() if stream is not None else exchange_checksum(src.read(name))) != crc:
                raise CorruptError(f"read-back of {output_prefix}: variable {name!r} differs from the archive; output discarded")
    finally:
        src.close()
