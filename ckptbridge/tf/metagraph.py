"""A graph the user already has: a MetaGraphDef (a training job's ``.meta``) to rebuild a checkpoint through.

The graph is imported with ``tf.compat.v1.train.import_meta_graph`` into a fresh
graph, with its own Saver: the checkpoint written through it holds what that
Saver saves, under its names, so ``import_meta_graph(OUT.meta).restore(sess, OUT)``
is the training job's own restore.  What it saves is read from its save op
(``SaveV2`` or a V1 ``SaveSlices``); each name must be a variable's own name, or a
partitioned variable's full name (its parts are then fed the slices they hold).

A ``.meta`` written by an older TensorFlow may carry ``_output_shapes``
attributes that today's shape inference contradicts (TensorFlow 1.12 recorded
``[0]`` for outputs of ``FusedBatchNormGrad`` that are now ``[C]``), and
TensorFlow then refuses the whole graph.  The attribute is only a hint: on
import TensorFlow merges it into the shapes it infers and drops it from the
node.  Only then, and only on that refusal, the graph is imported without those
attributes, and the report says so.  Not always: where the attributes agree
they can carry shapes that inference alone cannot recover (a ``set_shape`` on
the output of a ``py_func``), which an unconditional strip would lose.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
from typing import Any

import numpy as np

from ..errors import CkptBridgeError, FormatError, MismatchError, NotFoundError
from .engine import tf_dtype_name
from .graph_sinks import Part, saved_name

#: what TensorFlow's graph importer says of an ``_output_shapes`` attribute its shape inference contradicts
STALE_SHAPES = "_output_shapes attribute inconsistent with the GraphDef"

_OP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_>]*\Z")
_SAVE_OPS = ("SaveV2", "SaveSlices")


@dataclasses.dataclass
class Imported:
    """An imported MetaGraphDef: its graph, the Saver it restores with, and what that Saver saves."""

    graph: Any
    saver: Any
    #: checkpoint name -> the graph variable holding it, for whole variables
    whole: dict[str, Any]
    #: checkpoint name -> its parts, for partitioned variables
    parts: dict[str, list[Part]]
    #: checkpoint name -> (dtype, full shape)
    expected: dict[str, tuple[str, tuple[int, ...]]]
    #: what the import had to do that the user should know (the stale shapes it left out)
    notes: list[str]


def import_meta(tf: Any, path: str) -> Imported:
    """Read ``path`` as a MetaGraphDef and import it into a fresh graph (see module docstring)."""
    meta = read_meta_graph(tf, path)
    graph, saver, notes = _import(tf, meta, path)
    with graph.as_default():
        variables = tf.compat.v1.global_variables()
    if saver is None or not variables:
        raise CkptBridgeError(f"the graph in {path} has no variables (its 'variables' collection is empty); "
                              "give the .meta of the graph the archive's checkpoint belongs to")
    whole, parts, expected = _saved_variables(tf, graph, saver, variables, path)
    return Imported(graph, saver, whole, parts, expected, notes)


def read_meta_graph(tf: Any, path: str) -> Any:
    """``path`` as a MetaGraphDef (binary, or the text form ``as_text=True`` writes), or one clear error."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NotFoundError(f"graph {path}: no such file") from None
    except OSError as e:
        raise NotFoundError(f"graph {path}: cannot read it ({e.strerror or e})") from None
    what = f"graph {path} is not a MetaGraphDef (the .meta file tf.compat.v1.train.Saver or export_meta_graph writes)"
    meta = tf.compat.v1.MetaGraphDef()
    why = _parse(meta, data)
    if why is None and _plausible(meta.graph_def):
        return meta
    if _parses_as(tf.compat.v1.GraphDef(), data):
        raise FormatError(f"{what}: it is a GraphDef (a frozen graph or a graph .pb), which has no variables or Saver; "
                          "give the .meta file written beside the checkpoint")
    text = _parse_text(tf, data)
    if text is not None:
        return text
    raise FormatError(f"{what}: {why or 'it holds no graph'}; it may be truncated or another kind of file")


def _parse(message: Any, data: bytes) -> str | None:
    try:
        message.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or a RuntimeWarning-turned-error: the bytes are not one
        return f"it does not parse as one ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'damaged'})"
    return None


def _parses_as(graph_def: Any, data: bytes) -> bool:
    return _parse(graph_def, data) is None and _plausible(graph_def)


def _plausible(graph_def: Any) -> bool:
    """Protobuf parses many byte strings as some message: a graph has nodes, each named, of a named op."""
    nodes = graph_def.node
    return len(nodes) > 0 and all(n.name and _OP_NAME.match(n.op) for n in nodes)


def _parse_text(tf: Any, data: bytes) -> Any | None:
    text_format = importlib.import_module("google.protobuf.text_format")  # TensorFlow's own dependency
    try:
        meta = text_format.Parse(data.decode("utf-8"), tf.compat.v1.MetaGraphDef())
    except Exception:  # noqa: BLE001 - not text either; the caller says what it is not
        return None
    return meta if _plausible(meta.graph_def) else None


def _import(tf: Any, meta: Any, path: str) -> tuple[Any, Any, list[str]]:
    """(graph, saver, notes): the plain import, or on a stale ``_output_shapes`` refusal the import without them."""
    notes: list[str] = []
    clear = _remote_device(tf, meta.graph_def)
    if clear is not None:
        notes.append(f"the graph in {path} places ops on {clear}, which no session here has; imported with clear_devices=True, "
                     "so the written .meta places nothing (TensorFlow places each op where it can)")
    try:
        graph, saver = _import_into_fresh_graph(tf, meta, clear_devices=clear is not None)
        return graph, saver, notes
    except Exception as e:  # noqa: BLE001 - TensorFlow raises ValueError, InvalidArgumentError or NotFoundError here
        message = _first_line(e)
        if STALE_SHAPES not in message:
            raise CkptBridgeError(f"TensorFlow {tf.__version__} cannot import the graph in {path}: {message}") from None
    stripped = tf.compat.v1.MetaGraphDef()
    stripped.CopyFrom(meta)
    count = strip_output_shapes(stripped.graph_def)
    try:
        graph, saver = _import_into_fresh_graph(tf, stripped, clear_devices=clear is not None)
    except Exception as e:  # noqa: BLE001 - as above
        raise CkptBridgeError(f"TensorFlow {tf.__version__} cannot import the graph in {path}, even without its stale _output_shapes "
                              f"attributes: {_first_line(e)}") from None
    written_by = meta.meta_info_def.tensorflow_version or "an older TensorFlow"
    note = (f"the graph in {path} (written by TensorFlow {written_by}) has _output_shapes attributes that TensorFlow {tf.__version__}'s "
            f"shape inference contradicts ({message}); imported without them ({count} nodes), every shape inferred again, "
            "and the written .meta records shapes that agree")
    return graph, saver, [*notes, note]


def _import_into_fresh_graph(tf: Any, meta: Any, *, clear_devices: bool) -> tuple[Any, Any]:
    graph = tf.Graph()
    with graph.as_default(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saver = tf.compat.v1.train.import_meta_graph(meta, clear_devices=clear_devices)
    return graph, saver


def _remote_device(tf: Any, graph_def: Any) -> str | None:
    """The first device of ``graph_def`` on another job, replica or task than this process's, or None.

    A session here runs as ``/job:localhost/replica:0/task:0``; soft placement moves an op
    pinned to a device type it lacks (a GPU), but not one pinned to another job.
    """
    for node in graph_def.node:
        if not node.device:
            continue
        spec = tf.DeviceSpec.from_string(node.device)
        if spec.job not in (None, "localhost") or spec.replica not in (None, 0) or spec.task not in (None, 0):
            return str(node.device)
    return None


def strip_output_shapes(graph_def: Any) -> int:
    """Remove every ``_output_shapes`` attribute (graph and function nodes alike); how many nodes had one."""
    count = 0
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    for node in nodes:
        if "_output_shapes" in node.attr:
            del node.attr["_output_shapes"]
            count += 1
    return count


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _saved_variables(tf: Any, graph: Any, saver: Any, variables: list[Any], path: str) -> tuple[
        dict[str, Any], dict[str, list[Part]], dict[str, tuple[str, tuple[int, ...]]]]:
    """(whole, parts, expected) for the names the graph's Saver saves."""
    whole: dict[str, Any] = {}
    parts: dict[str, list[Part]] = {}
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for var in variables:
        name, dtype = saved_name(var), tf_dtype_name(var.dtype.base_dtype)
        info = getattr(var, "_save_slice_info", None)
        if info is None:
            whole[name] = var
            expected[name] = (dtype, tuple(int(x) for x in var.shape))
            continue
        parts.setdefault(name, []).append((var, tuple(int(x) for x in info.var_offset)))
        expected[name] = (dtype, tuple(int(x) for x in info.full_shape))
    saved = _names_the_saver_saves(tf, graph, saver)
    if saved is None:
        return whole, parts, expected
    unknown = sorted(saved - expected.keys())
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise MismatchError(f"the Saver of the graph in {path} saves {len(unknown)} names that are no variable's own name: {shown}; "
                            "a rebuild through a .meta needs a Saver that saves variables under their names (the default Saver())")
    keep = saved.__contains__
    return ({n: v for n, v in whole.items() if keep(n)}, {n: p for n, p in parts.items() if keep(n)},
            {n: e for n, e in expected.items() if keep(n)})


def _names_the_saver_saves(tf: Any, graph: Any, saver: Any) -> set[str] | None:
    """The tensor names of the save ops in the Saver's scope; None where they cannot be read as constants."""
    scope = saver.saver_def.filename_tensor_name.rpartition("/")[0]
    names: set[str] = set()
    ops = [op for op in graph.get_operations() if op.type in _SAVE_OPS and op.name.rpartition("/")[0] == scope]
    for op in ops:
        const = op.inputs[1].op
        if const.type != "Const":
            return None
        names.update(x.decode("utf-8") if isinstance(x, bytes) else str(x)
                     for x in np.asarray(tf.make_ndarray(const.get_attr("value"))).reshape(-1))
    return names or None
