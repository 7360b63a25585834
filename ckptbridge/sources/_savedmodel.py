"""SavedModel and TF1 Hub module directories: where their weights are, and what the SavedModel names them.

A SavedModel directory holds its graph (``saved_model.pb``), and its weights as
an ordinary V2 checkpoint at ``variables/variables``.  A TF1 Hub module
(``tfhub_module.pb`` beside them) is a TF1 SavedModel with the same layout.

A TF2 SavedModel (``tf.saved_model.save``, tf_keras ``model.save(dir)``) also
holds a ``SavedObjectGraph``: one ``SavedObject`` per trackable object, and for
each variable a ``SavedVariable`` whose ``name`` is the variable's own name
(``dense/kernel``).  Its checkpoint keys are object paths
(``layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE``) in the checkpoint's
``TrackableObjectGraph``.  Both graphs are built from one node list
(tensorflow/python/saved_model/save.py: ``_SaveableView`` and the
``TrackableSaver`` share one ``_AugmentedGraphView``, and the SavedModel only
appends function nodes after the trackable ones), so node *i* of one is node *i*
of the other; :mod:`._readable` checks that on every read, child by child.

This module finds the directory's checkpoint and parses ``saved_model.pb`` with
the project's wire helpers, no TensorFlow and no protobuf package: it reads just
the path SavedModel -> MetaGraphDef -> SavedObjectGraph -> SavedObject ->
SavedVariable.name and the children, skipping the (often large) GraphDef without
decoding it (slices of the file's bytes, no copies); the parse is bounded by
:data:`MAX_FIELDS`.  Field numbers are those of tensorflow/core/protobuf/
saved_model.proto, meta_graph.proto and saved_object_graph.proto.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

from ..errors import CorruptError, FormatError
from ..io import ckptfiles as _ckptfiles
from ..io.wire import _Bad, iter_fields, to_int32

SAVED_MODEL_PB = "saved_model.pb"
SAVED_MODEL_PBTXT = "saved_model.pbtxt"
HUB_MODULE_PB = "tfhub_module.pb"
#: where a SavedModel keeps its weights, relative to its directory
VARIABLES = os.path.join("variables", "variables")

# SavedModel
_META_GRAPHS = 2
# MetaGraphDef
_OBJECT_GRAPH_DEF = 7
# SavedObjectGraph
_NODES = 1
# SavedObject
_CHILDREN, _VARIABLE = 1, 7
# ObjectReference
_REF_NODE_ID, _REF_LOCAL_NAME = 1, 2
# SavedVariable
_VAR_NAME = 6

#: A protocol buffer is at most 2 GiB; a larger saved_model.pb is not one.
MAX_BYTES = (2 << 30) - 1
#: How many protobuf fields of the object graph are read before the file is refused as hostile: as many
#: as _objgraph reads of the checkpoint's graph (ResNet50's SavedModel, 3,026 objects, has about 20,000),
#: and a bound on the memory the parse takes.
MAX_FIELDS = 2_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class SavedObject:
    """What ckptbridge reads of one ``SavedObject``."""

    #: (local name, node id) of each child, in order
    children: tuple[tuple[str, int], ...]
    #: ``SavedVariable.name`` if the object is a variable, else None
    variable: str | None


@dataclasses.dataclass(frozen=True)
class SavedModelDir:
    """A SavedModel (or TF1 Hub module) directory that was given where a checkpoint was expected."""

    directory: str
    #: "saved-model" or "hub-module"
    kind: str
    #: the checkpoint prefix of its weights (``<dir>/variables/variables``)
    prefix: str

    @property
    def graph(self) -> str | None:
        """Its binary ``saved_model.pb``, or None (a ``saved_model.pbtxt`` only)."""
        p = os.path.join(self.directory, SAVED_MODEL_PB)
        return p if os.path.isfile(p) else None


def find(path: str) -> SavedModelDir | None:
    """The SavedModel or Hub module directory ``path`` is, or None when it is not one.

    Raises FormatError for one without a complete ``variables/variables`` checkpoint:
    such a model keeps no weights ckptbridge can read (or they were not copied).
    """
    if not os.path.isdir(path):
        return None
    if not any(os.path.isfile(os.path.join(path, n)) for n in (SAVED_MODEL_PB, SAVED_MODEL_PBTXT)):
        return None
    kind = "hub-module" if os.path.isfile(os.path.join(path, HUB_MODULE_PB)) else "saved-model"
    prefix = os.path.join(path, VARIABLES)
    if not _ckptfiles.complete_v2(prefix):
        what = "a TF1 Hub module" if kind == "hub-module" else "a SavedModel"
        raise FormatError(f"{path} is {what} with no complete variables checkpoint ({prefix}.index and its data files), so no weights to read; "
                          "if it was copied without its variables/ directory, copy that too (a model frozen into constants has none)")
    return SavedModelDir(path, kind, prefix)


def read_objects(path: str) -> list[SavedObject] | None:
    """The ``SavedObjectGraph`` of the first meta graph that has one in ``saved_model.pb`` at ``path``;
    None when none has (a TF1 SavedModel or Hub module).  CorruptError if the file is not a readable SavedModel."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise _Bad(f"it is {size:,} bytes, more than a protocol buffer can be ({MAX_BYTES:,})")
            data = f.read(MAX_BYTES + 1)
        if not data:
            raise _Bad("it is empty")
        return _objects(memoryview(data))
    except _Bad as e:
        raise CorruptError(f"{path} is not a readable SavedModel ({e}); the SavedModel is damaged "
                           f"(its weights alone, under their checkpoint keys: pass its {VARIABLES})") from None
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror or e}") from None


def _objects(buf: memoryview) -> list[SavedObject] | None:
    budget = [MAX_FIELDS]
    saw_meta_graph = False
    for number, wire, value in _counted(buf, budget):
        if number != _META_GRAPHS:
            continue
        if wire != 2:
            raise _Bad("a meta graph is not a message")
        saw_meta_graph = True
        graph = None
        for n2, w2, v2 in _counted(_message(value), budget):
            if n2 == _OBJECT_GRAPH_DEF:
                if w2 != 2:
                    raise _Bad("the object graph is not a message")
                graph = _message(v2)  # the last one wins (protobuf's rule for a singular message)
        if graph is not None:
            return _saved_objects(graph, budget)
    if not saw_meta_graph:
        raise _Bad("it has no meta graph")
    return None


def _saved_objects(buf: memoryview, budget: list[int]) -> list[SavedObject]:
    out = []
    for number, wire, body in _counted(buf, budget):
        if number != _NODES:
            continue
        if wire != 2:
            raise _Bad("an object of the object graph is not a message")
        children: list[tuple[str, int]] = []
        variable = None
        for n1, w1, value in _counted(_message(body), budget):
            if n1 in (_CHILDREN, _VARIABLE) and w1 != 2:
                raise _Bad(f"field {n1} of an object is not a message")
            if n1 == _CHILDREN:
                children.append(_reference(_message(value), budget))
            elif n1 == _VARIABLE:
                variable = ""
                for n2, w2, v2 in _counted(_message(value), budget):
                    if n2 == _VAR_NAME:
                        variable = _text(v2, w2)
        out.append(SavedObject(tuple(children) if children else (), variable))
    for o in out:
        for _, node in o.children:
            if not 0 <= node < len(out):
                raise _Bad(f"reference to object {node}, but the graph has {len(out)}")
    return out


def _reference(buf: memoryview, budget: list[int]) -> tuple[str, int]:
    node, name = 0, ""
    for number, wire, value in _counted(buf, budget):
        if number == _REF_NODE_ID:
            if wire != 0:
                raise _Bad("a node id is not a varint")
            node = to_int32(_varint(value))
        elif number == _REF_LOCAL_NAME:
            name = _text(value, wire)
    return name, node


def _text(value: int | memoryview, wire: int) -> str:
    if wire != 2:
        raise _Bad("a string field is not length-delimited")
    try:
        return bytes(_message(value)).decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("a name is not UTF-8") from None


def _message(value: int | memoryview) -> memoryview:
    """A length-delimited field's bytes (the callers have checked its wire type is 2)."""
    if isinstance(value, int):
        raise _Bad("a message field is not length-delimited")
    return value


def _varint(value: int | memoryview) -> int:
    """A varint field's value (the callers have checked its wire type is 0)."""
    if not isinstance(value, int):
        raise _Bad("a varint field is length-delimited")
    return value


def _counted(buf: memoryview, budget: list[int]) -> Iterator[tuple[int, int, int | memoryview]]:
    """:func:`iter_fields`, charging each field to ``budget`` (shared by one parse)."""
    for field in iter_fields(buf):
        budget[0] -= 1
        if budget[0] < 0:
            raise _Bad(f"more than {MAX_FIELDS:,} protobuf fields in its object graph, more than ckptbridge reads")
        yield field
