"""Readable names for checkpoints keyed by object paths: the names layer.

A TF2 checkpoint (``tf.train.Checkpoint``, a SavedModel's ``variables/``) keys
each tensor by the path of attributes that leads to it from the root object:
``layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE``.  Those keys are
what TensorFlow restores by, but they say nothing of the variable to a person.
This module shows such a checkpoint under readable names, and keeps the key of
each in the source's metadata (readable name -> key): under ``original_names``,
with every other name a tensor had before (``import --original-names`` restores
them all), and under ``readable_names``, which only this layer writes and an
export keeps for the names a ``--rename`` left alone, so a plain ``import``
writes exactly those keys back and keeps the user's own renames.

Where a readable name comes from:

* a SavedModel's ``saved_model.pb``: the ``SavedVariable.name`` of the object
  whose node id the checkpoint's object graph gives the key (see
  :mod:`._savedmodel` for why node ids correspond; it is checked here, child by
  child, and saved_model.pb's names are not used if the graphs disagree);
* otherwise, the checkpoint's own ``TrackableObjectGraph``: each serialized
  tensor's ``full_name``, which TensorFlow sets to the variable's name
  (``dense/kernel``; a slot ``Adam/m/dense/kernel``; an EMA
  ``dense/kernel/ExponentialMovingAverage``).

A tensor keeps its key when no name is known for it (an attribute with no
``full_name``, a tensor the graph does not list), when its name would be shared
with another tensor (tf_keras names every metric's variables ``total`` and
``count``), when it equals another tensor's key, or when it is not a name
ckptbridge accepts: two tensors are never merged under one name.

Which sources get readable names is the ``names`` option (:data:`CHOICES`):
"auto" gives them to SavedModel and Hub directories (their keys were never shown
before) and keeps the keys of a plain checkpoint, as earlier releases did;
"readable" gives them to TF2 checkpoints too; "keys" never.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._options import NAMES
from .._source import OBJECT_GRAPH, Source, SourceView
from ..errors import CorruptError, FormatError, option
from ..formats import meta
from ..spec import TensorSpec
from . import _objgraph, _savedmodel

#: what ``names=`` / ``--names`` takes
CHOICES = NAMES
AUTO, READABLE, KEYS = CHOICES
ORIGINAL_NAMES = "original_names"
#: the metadata entry of the names this layer gave (readable name -> checkpoint key), which import writes back
READABLE_NAMES = "readable_names"
#: the metadata entry that says where the names did not come from where they would have (``ls`` prints it)
NOTE = "names_note"
_VARIABLE_VALUE = "VARIABLE_VALUE"


def check(names: str) -> None:
    if names not in CHOICES:
        raise FormatError(f"unknown names choice {names!r}; choose one of {', '.join(CHOICES)}")


def keys_on_import(names: str, by_graph: bool) -> bool:
    """Whether an import writes each readable name's checkpoint key (:data:`READABLE_NAMES`) back.

    "keys" always does, "readable" never; "auto" does for a graph-free import (TensorFlow restores
    a TF2 checkpoint by its keys) and not through a graph, whose variables are matched by name.
    """
    check(names)
    return names == KEYS or (names == AUTO and not by_graph)


def _utf8(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class ReadableSource(SourceView):
    """A checkpoint shown under readable names: name -> checkpoint key (:data:`ORIGINAL_NAMES`)."""

    def __init__(self, inner: Source, keys: Mapping[str, str], note: str | None = None, kind: str | None = None) -> None:
        super().__init__(inner)
        self.kind = kind or inner.kind
        self._key = dict(keys)  # readable name -> key, for every tensor (renamed or not)
        self._name = {k: n for n, k in self._key.items()}
        self.note = note
        self._specs = self._renamed(inner.specs())
        self._opaque = self._renamed(inner.uncarried())

    def _renamed(self, specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        out = [dataclasses.replace(s, name=self._name.get(k, k)) for k, s in specs.items()]
        return {s.name: s for s in sorted(out, key=lambda s: _utf8(s.name))}

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def uncarried(self) -> Mapping[str, TensorSpec]:
        return self._opaque

    def key(self, name: str) -> str:
        """The checkpoint key of tensor ``name``."""
        return self._key.get(name, name)

    def read(self, name: str) -> np.ndarray:
        self.spec(name)
        return self._inner.read(self.key(name))

    def read_blocks(self, name: str, chunk_bytes: int) -> Any:
        return self._inner.read_blocks(self.key(name), chunk_bytes)

    def read_raw(self, name: str) -> bytes | None:
        return self._inner.read_raw(self.key(name))

    def checksum(self, name: str) -> int | None:
        return self._inner.checksum(self.key(name))

    def metadata(self) -> dict[str, Any]:
        doc = dict(self._inner.metadata())
        renamed = {n: k for n, k in self._key.items() if n != k}
        if renamed:
            doc[ORIGINAL_NAMES] = dict(sorted(renamed.items()))
            doc[READABLE_NAMES] = dict(sorted(renamed.items()))
        if self.note:
            doc[NOTE] = self.note
        return doc

    def object_key(self, name: str) -> str:
        return self._inner.object_key(self.key(name))


def candidates(objects: list[_objgraph.ObjectNode], saved: list[_savedmodel.SavedObject] | None) -> dict[str, str]:
    """key -> proposed readable name, for every attribute of the object graph that has one.

    ``saved`` (a SavedModel's objects, by the same node ids) names variables first;
    an attribute's ``full_name`` names the rest.
    """
    out: dict[str, str] = {}
    for node_id, node in enumerate(objects):
        for a in node.attributes:
            name = ""
            if saved is not None and a.name == _VARIABLE_VALUE and node_id < len(saved):
                name = saved[node_id].variable or ""
            out[a.key] = name or a.full_name
    return out


def corresponds(objects: list[_objgraph.ObjectNode], saved: list[_savedmodel.SavedObject]) -> bool:
    """Whether node *i* of the checkpoint's graph is node *i* of the SavedModel's: every child the
    checkpoint lists is the SavedModel's child of the same name and id, and every node with a
    variable's value is a variable."""
    if len(saved) < len(objects):
        return False
    for node, s in zip(objects, saved):
        if not set(node.children) <= set(s.children):
            return False
        if any(a.name == _VARIABLE_VALUE for a in node.attributes) and s.variable is None:
            return False
    return True


def settle(keys: list[str], proposed: Mapping[str, str]) -> dict[str, str]:
    """readable name -> key for every key: the proposed name where it is unique, accepted and not
    another tensor's key; the key itself otherwise."""
    taken = set(keys)
    count: dict[str, int] = {}
    for k in keys:
        n = proposed.get(k)
        if n:
            count[n] = count.get(n, 0) + 1
    out: dict[str, str] = {}
    for k in keys:
        n = proposed.get(k) or k
        if n != k and (count.get(n, 0) > 1 or n in taken or not _acceptable(n)):
            n = k
        out[n] = k
    return out


def _acceptable(name: str) -> bool:
    try:
        meta.check_tensor_name(name, "")
    except CorruptError:
        return False
    return True


def named(src: Source, names: str, saved_model: _savedmodel.SavedModelDir | None = None) -> Source:
    """``src`` (a checkpoint) under the names ``names`` asks for (see the module docstring); a
    SavedModel's or Hub module's checkpoint is shown as that (``kind``) whatever its names."""
    check(names)
    kind = saved_model.kind if saved_model is not None else None
    keys = [*src.specs(), *src.uncarried()]
    as_keys = {k: k for k in keys}
    graph = src.extras().get(OBJECT_GRAPH) if names == READABLE or (names == AUTO and saved_model is not None) else None
    if graph is None:  # keys asked for, or name-based (TF1, a Hub module): its keys are the variables' names already
        return src if kind is None else ReadableSource(src, as_keys, kind=kind)
    try:
        objects = _objgraph.describe(graph)
    except ValueError as e:
        raise CorruptError(f"{src.path}: its object graph is not readable ({e}); "
                           f"{option('names', KEYS)} reads the tensors under their keys") from None
    saved = None
    note = None
    if saved_model is not None and saved_model.graph is not None:
        saved = _savedmodel.read_objects(saved_model.graph)
        if saved is not None and not corresponds(objects, saved):
            saved = None
            note = f"{saved_model.graph}'s object graph does not match its checkpoint's; names are the checkpoint's own"
    return ReadableSource(src, settle(keys, candidates(objects, saved)), note, kind=kind)
