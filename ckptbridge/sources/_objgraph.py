"""The TF2 object graph, kept true to the tensors that are written.

A TF2 checkpoint (``tf.train.Checkpoint``) stores a ``TrackableObjectGraph``
proto under ``_CHECKPOINTABLE_OBJECT_GRAPH``: nodes for the trackable objects
(root, model, layers, variables, optimizer), each with its children by local
name, its serialized tensors (attributes, each naming the checkpoint key that
holds its value) and, on a legacy optimizer, slot-variable references.
TensorFlow restores by walking that graph and reading each attribute's key,
so a graph that names a key the checkpoint lacks makes ``restore`` fail
(``KeyError`` inside TensorFlow), even with ``expect_partial()``.

When a conversion filters or renames tensors, :func:`carry` rewrites the graph
through the name plan: each attribute's key becomes its output name, an
attribute whose key is not written is dropped, and objects left without a
checkpoint value anywhere below them are pruned, with the references to them.
Everything this module does not interpret (unknown fields, ``full_name``,
local names, registered-saver records) is copied byte for byte.  Where the
graph cannot be made true, :func:`carry` returns no graph and says why.

Pure Python on the project's own wire helpers: no TensorFlow, no protobuf.
Field numbers are those of tensorflow/core/protobuf/trackable_object_graph.proto.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from ..io.wire import _Bad, field_bytes, field_varint, get_varint, to_int32

# TrackableObjectGraph
_NODES = 1
# TrackableObject
_CHILDREN, _ATTRIBUTES, _SLOT_VARIABLES, _REGISTERED_SAVER, _HAS_VALUES = 1, 2, 3, 4, 5
# ObjectReference
_REF_NODE_ID, _REF_LOCAL_NAME = 1, 2
# SerializedTensor
_ATTR_NAME, _ATTR_FULL_NAME, _ATTR_CHECKPOINT_KEY = 1, 2, 3
# SlotVariableReference
_SLOT_ORIGINAL, _SLOT_NAME, _SLOT_VARIABLE = 1, 2, 3
# RegisteredSaver
_SAVER_NAME = 1
# google.protobuf.BoolValue
_BOOL_VALUE = 1


#: What separates an object's path from its attribute in a TF2 checkpoint key (``dense/kernel/.ATTRIBUTES/VARIABLE_VALUE``).
_ATTRIBUTES_PART = "/.ATTRIBUTES/"

#: How many protobuf fields a graph may have before it is left out rather than rewritten:
#: about 250,000 variables' worth, and a bound on the memory a hostile archive's graph can take.
MAX_FIELDS = 2_000_000


class Unusable(Exception):
    """The graph cannot be made to describe the tensors written; the message says why."""


# --- the wire, with every field's original bytes kept --------------------------------


@dataclasses.dataclass(slots=True)
class _Field:
    number: int
    wire: int
    value: int | bytes  # int for varints and fixed widths, bytes for length-delimited
    raw: bytes  # the field exactly as it was encoded, tag included

    @property
    def data(self) -> bytes:
        """A length-delimited field's bytes (its wire type checked by the caller)."""
        if isinstance(self.value, int):
            raise _Bad(f"field {self.number} is not length-delimited")
        return bytes(self.value)

    @property
    def varint(self) -> int:
        """A varint field's value (its wire type checked by the caller)."""
        if not isinstance(self.value, int):
            raise _Bad(f"field {self.number} is not a varint")
        return self.value


def _fields(buf: bytes, budget: list[int] | None = None) -> list[_Field]:
    """Split a message into fields, keeping each one's original bytes (for verbatim copies).

    ``budget`` (a one-item list) is the number of fields still allowed, shared by the calls of one parse.
    """
    out: list[_Field] = []
    pos, n = 0, len(buf)
    while pos < n:
        if budget is not None:
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooBig
        start = pos
        tag, pos = get_varint(buf, pos, n)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Bad("field number 0")
        value: int | bytes
        if wire == 0:
            value, pos = get_varint(buf, pos, n)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > n:
                raise _Bad("truncated fixed-width field")
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = get_varint(buf, pos, n)
            if length > n - pos:
                raise _Bad("length-delimited field runs past its message")
            value = buf[pos:pos + length]
            pos += length
        else:
            raise _Bad(f"unsupported wire type {wire}")
        out.append(_Field(number, wire, value, buf[start:pos]))
    return out


def _last(fields: list[_Field], number: int, wire: int) -> _Field | None:
    """The field that wins for a singular scalar: the last occurrence (proto3 semantics)."""
    found = None
    for f in fields:
        if f.number == number:
            if f.wire != wire:
                raise _Bad(f"field {number} has wire type {f.wire}, expected {wire}")
            found = f
    return found


def _node_id(fields: list[_Field], number: int, count: int) -> int:
    f = _last(fields, number, 0)
    v = 0 if f is None else to_int32(f.varint)
    if not 0 <= v < count:
        raise _Bad(f"reference to node {v}, but the graph has {count} nodes")
    return v


def _text(f: _Field | None) -> str:
    if f is None:
        return ""
    try:
        return f.data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("a string field is not UTF-8") from None


def _bool_value(value: bool) -> bytes:
    return field_bytes(_HAS_VALUES, field_varint(_BOOL_VALUE, 1) if value else b"")


# --- the graph --------------------------------------------------------------------------


@dataclasses.dataclass
class _Attr:
    field: _Field
    parts: list[_Field]
    key: str


@dataclasses.dataclass
class _Node:
    fields: list[_Field]
    children: dict[int, int]  # index in fields -> child node id
    attrs: dict[int, _Attr]  # index in fields -> attribute
    slots: dict[int, tuple[int, int]]  # index in fields -> (original variable id, slot variable id)
    saver: str | None  # the registered saver's name, if the object has one


class _TooBig(Exception):
    """More than MAX_FIELDS fields."""


def _parse(payload: bytes) -> tuple[list[_Field], list[_Node]]:
    budget = [MAX_FIELDS]
    top = _fields(payload, budget)
    raw_nodes = [f for f in top if f.number == _NODES]
    if any(f.wire != 2 for f in raw_nodes):
        raise _Bad("a node is not a message")
    count = len(raw_nodes)
    if count == 0:
        raise _Bad("the graph has no nodes")
    nodes = []
    for rn in raw_nodes:
        fields = _fields(rn.data, budget)
        node = _Node(fields, {}, {}, {}, None)
        for i, f in enumerate(fields):
            if f.number in (_CHILDREN, _ATTRIBUTES, _SLOT_VARIABLES, _REGISTERED_SAVER, _HAS_VALUES) and f.wire != 2:
                raise _Bad(f"field {f.number} of a node is not a message")
            if f.number == _CHILDREN:
                node.children[i] = _node_id(_fields(f.data, budget), _REF_NODE_ID, count)
            elif f.number == _ATTRIBUTES:
                parts = _fields(f.data, budget)
                node.attrs[i] = _Attr(f, parts, _text(_last(parts, _ATTR_CHECKPOINT_KEY, 2)))
            elif f.number == _SLOT_VARIABLES:
                parts = _fields(f.data, budget)
                node.slots[i] = (_node_id(parts, _SLOT_ORIGINAL, count), _node_id(parts, _SLOT_VARIABLE, count))
            elif f.number == _REGISTERED_SAVER:
                node.saver = _text(_last(_fields(f.data, budget), _SAVER_NAME, 2)) or "?"
        nodes.append(node)
    return top, nodes


def checkpoint_keys(payload: bytes) -> list[str]:
    """Every checkpoint key the graph's attributes name, in node order (ValueError if unreadable)."""
    try:
        _, nodes = _parse(payload)
    except _Bad as e:
        raise ValueError(str(e)) from None
    except _TooBig:
        raise ValueError(f"more than {MAX_FIELDS} fields") from None
    return [a.key for node in nodes for a in node.attrs.values()]


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One serialized tensor of an object: its attribute name (``VARIABLE_VALUE``), TensorFlow's
    ``full_name`` for it (``dense/kernel``; may be empty) and its checkpoint key."""

    name: str
    full_name: str
    key: str


@dataclasses.dataclass(frozen=True)
class ObjectNode:
    """What the names layer reads of one object: its children (local name, node id) and its attributes."""

    children: tuple[tuple[str, int], ...]
    attributes: tuple[Attribute, ...]


def describe(payload: bytes) -> list[ObjectNode]:
    """The graph's objects, by node id, for naming tensors (ValueError if unreadable)."""
    try:
        _, nodes = _parse(payload)
        out = []
        for n in nodes:
            children = []
            for i, child in n.children.items():
                ref = _fields(n.fields[i].data)
                children.append((_text(_last(ref, _REF_LOCAL_NAME, 2)), child))
            attrs = tuple(Attribute(_text(_last(a.parts, _ATTR_NAME, 2)), _text(_last(a.parts, _ATTR_FULL_NAME, 2)), a.key)
                          for a in n.attrs.values())
            out.append(ObjectNode(tuple(children), attrs))
        return out
    except _Bad as e:
        raise ValueError(str(e)) from None
    except _TooBig:
        raise ValueError(f"more than {MAX_FIELDS} fields") from None


def _with_values(seeds: set[int], edges: Mapping[int, list[int]]) -> set[int]:
    """``seeds`` and every node above one of them through ``edges`` (node -> its children)."""
    parents: dict[int, list[int]] = {}
    for p, kids in edges.items():
        for c in kids:
            parents.setdefault(c, []).append(p)
    out, todo = set(seeds), list(seeds)
    while todo:
        for p in parents.get(todo.pop(), ()):
            if p not in out:
                out.add(p)
                todo.append(p)
    return out


def _had_values(nodes: list[_Node]) -> set[int]:
    """Nodes TensorFlow marks has_checkpoint_values (util.py: attributes, slots or a saver, and their ancestors)."""
    seeds = {i for i, n in enumerate(nodes) if n.attrs or n.slots or n.saver is not None}
    return _with_values(seeds, {i: list(n.children.values()) for i, n in enumerate(nodes)})


def parts(described: set[str], held: set[str]) -> dict[str, dict[str, str]]:
    """For each attribute key the graph names: the keys of the tensors that hold its value, each with
    its suffix after the attribute's key ("" for a variable's one tensor).

    Most attributes are one tensor under their own key.  An object saved through one
    SaveableObject of several tensors (a lookup table: attribute ``table``, key
    ``t/.ATTRIBUTES/table``) is listed once, and its tensors are written under that key plus
    each tensor's local name (``-keys``, ``-values``): TensorFlow restores them by that
    concatenation (restore.py, ``_extract_saveable_name`` and the saveable's spec names).
    A held key goes to the longest attribute key it extends by a suffix without ``/`` (local
    names are escaped, so they have none) and is nobody's part if it is an attribute's own key.
    Raises :class:`_TooBig` past MAX_FIELDS steps.
    """
    out: dict[str, dict[str, str]] = {k: {k: ""} for k in described if k in held}
    # A part's attribute key ends in the part's last segment, after the same directory: group the
    # keys not held by directory, and try only the lengths the group has (longest first), so
    # the work is bounded by MAX_FIELDS however the keys are made.
    groups: dict[str, dict[int, set[str]]] = {}
    for k in described - held:
        groups.setdefault(k[:k.rfind("/") + 1], {}).setdefault(len(k), set()).add(k)
    budget = MAX_FIELDS
    for h in sorted(held - described):
        group = groups.get(h[:h.rfind("/") + 1])
        if group is None:
            continue
        budget -= len(group)
        if budget < 0:
            raise _TooBig
        for n in sorted((n for n in group if n < len(h)), reverse=True):
            if h[:n] in group[n]:
                out.setdefault(h[:n], {})[h] = h[n:]
                break
    return out


def rewrite(payload: bytes, keys: Mapping[str, str], restorable: bool = False,
            held: Iterable[str] | None = None) -> tuple[bytes, str | None]:
    """The graph with each attribute's key renamed through ``keys`` (graph key -> output name).

    ``held`` is every graph key the source holds, written or not (default: those of ``keys``);
    an attribute whose value is several tensors (see :func:`parts`) is kept only if all of
    them are written, renamed alike.  Attributes not written are dropped, and objects with no
    checkpoint value left below them are pruned (the root always stays; objects
    that never had a value stay unless all their parents go).  Returns the payload
    itself when nothing changes, else the new bytes and a sentence saying what
    was pruned.  Raises :class:`Unusable` where that cannot give a true graph, and,
    with ``restorable`` (the graph goes into a checkpoint), where a key would lose
    its ``/.ATTRIBUTES/`` part, which TensorFlow's restore parses (an archive's
    graph may: it is keyed by the archive's names, and an import maps them back).
    """
    try:
        top, nodes = _parse(payload)
    except _Bad as e:
        raise Unusable(f"it is not a readable TrackableObjectGraph ({e})") from None
    except _TooBig:
        raise Unusable(f"it has more than {MAX_FIELDS:,} protobuf fields, more than ckptbridge checks") from None
    described = {a.key for n in nodes for a in n.attrs.values()}
    try:
        of = parts(described, set(keys) if held is None else set(held) | set(keys))
    except _TooBig:
        raise Unusable(f"matching its keys to the tensors takes more than {MAX_FIELDS:,} steps, more than ckptbridge checks") from None
    new_key, partly = _new_keys(of, keys)
    _check_restorable(new_key, restorable)
    if all(new_key.get(k) == k for k in described):
        return payload, None
    savers = sorted({n.saver for n in nodes if n.saver is not None})
    if savers:
        raise Unusable(f"objects in it use registered savers ({', '.join(savers[:3])}), whose tensors it does not list, "
                       "so it cannot be pruned or renamed")
    if not new_key:
        raise Unusable("it describes none of the tensors written")
    kept = _Kept(nodes, new_key)
    result = bytearray()
    it = iter([_encode(nodes[old], old, kept, new_key) for old in sorted(kept.keep)])
    for f in top:
        if f.number == _NODES:
            body = next(it, None)
            if body is not None:
                result += field_bytes(_NODES, body)
        else:
            result += f.raw
    return bytes(result), _summary(len(kept.keep), len(nodes), len(described), new_key, partly, of, keys)


def _new_keys(of: Mapping[str, Mapping[str, str]], keys: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(attribute key -> its new key, for every attribute whose tensors are all written; the attributes
    only some of whose tensors are written)."""
    new_key: dict[str, str] = {}
    partly = []
    for k, tensors in of.items():
        written = [h for h in tensors if h in keys]
        if len(written) < len(tensors):
            if written:
                partly.append(k)
            continue
        prefixes = {keys[h][:len(keys[h]) - len(sfx)] for h, sfx in tensors.items() if keys[h].endswith(sfx)}
        if len(prefixes) != 1 or not all(keys[h].endswith(sfx) for h, sfx in tensors.items()):
            shown = ", ".join(f"{h!r} -> {keys[h]!r}" for h in sorted(tensors))
            raise Unusable(f"the tensors of its object attribute {k!r} are renamed apart ({shown}); TensorFlow finds them as one key "
                           f"plus each one's suffix ({', '.join(repr(s) for s in sorted(tensors.values()))}), so rename them alike")
        new_key[k] = prefixes.pop()
    return new_key, partly


def _check_restorable(new_key: Mapping[str, str], restorable: bool) -> None:
    """With ``restorable``, Unusable if a new key lacks the ``/.ATTRIBUTES/`` part restore parses."""
    lost = sorted(k for k in new_key if _ATTRIBUTES_PART not in new_key[k])
    if lost and restorable:
        raise Unusable(f"{len(lost)} of the keys it would name lack {_ATTRIBUTES_PART!r} ({lost[0]!r} -> {new_key[lost[0]]!r}), "
                       f"the part by which TensorFlow's object-based restore finds each object (trackable_utils.extract_object_name); "
                       "an import with the original names recorded at export writes the checkpoint keys back")


class _Kept:
    """What of the graph stays when only the attributes in ``new_key`` are written: per node its kept
    attributes and live slot links, the nodes with a value (``now``), those kept, and their new ids."""

    def __init__(self, nodes: list[_Node], new_key: Mapping[str, str]) -> None:
        before = _had_values(nodes)
        self.attrs = {i: {j for j, a in n.attrs.items() if a.key in new_key} for i, n in enumerate(nodes)}
        valued = {i for i in range(len(nodes)) if self.attrs[i]}
        # A slot variable restores through its optimizer and the variable it is a slot of:
        # both stay while the slot's value is written, even if their own values are not.
        live = {i: {j for j, (_, s) in n.slots.items() if s in valued} for i, n in enumerate(nodes)}
        self.slots = live
        seeds = valued | {i for i in live if live[i]} | {nodes[i].slots[j][0] for i in live for j in live[i]}
        children = {i: list(n.children.values()) for i, n in enumerate(nodes)}
        self.now = _with_values(seeds, children)
        # Objects that never held a value (a Dropout layer) are kept as TensorFlow wrote them,
        # unless every object that referred to them goes.
        referred = {c for kids in children.values() for c in kids}
        keep = self.now | {0} | {i for i in range(len(nodes)) if i not in before and i not in referred}
        todo = list(keep)
        while todo:
            for c in children[todo.pop()]:
                if c not in keep and c not in before:
                    keep.add(c)
                    todo.append(c)
        self.keep = keep
        self.new_id = {old: new for new, old in enumerate(sorted(keep))}


def _encode(n: _Node, old: int, kept: _Kept, new_key: Mapping[str, str]) -> bytes:
    """Kept node ``old``: its references renumbered, its kept attributes rekeyed, has_checkpoint_values
    made true, everything else byte for byte."""
    new_id = kept.new_id
    out = bytearray()
    for i, f in enumerate(n.fields):
        if i in n.children:
            if n.children[i] in new_id:
                out += _renumber(f, _REF_NODE_ID, n.children[i], new_id[n.children[i]])
        elif i in n.attrs:
            if i in kept.attrs[old]:
                out += _rekey(n.attrs[i], new_key[n.attrs[i].key])
        elif i in n.slots:
            if i in kept.slots[old] and n.slots[i][0] in new_id:
                orig, slot = n.slots[i]
                f = _renumbered(f, _SLOT_ORIGINAL, orig, new_id[orig])
                out += _renumber(f, _SLOT_VARIABLE, slot, new_id[slot])
        elif f.number == _HAS_VALUES:
            if not any(g.number == _HAS_VALUES for g in n.fields[:i]):
                was = [g for g in n.fields if g.number == _HAS_VALUES]
                same = len(was) == 1 and _flag(f) == (old in kept.now)
                out += f.raw if same else _bool_value(old in kept.now)
        else:
            out += f.raw
    return bytes(out)


def _summary(kept: int, count: int, described: int, new_key: Mapping[str, str], partly: list[str],
             of: Mapping[str, Mapping[str, str]], keys: Mapping[str, str]) -> str:
    """The sentence saying what :func:`rewrite` changed."""
    dropped_keys = described - len(new_key) - len(partly)
    renamed = sum(1 for k, v in new_key.items() if v != k)
    what = []
    if kept < count:
        what.append(f"pruned to {kept} of its {count} objects")
    if dropped_keys:
        what.append(f"{dropped_keys} value{'s' if dropped_keys != 1 else ''} not written left out")
    if partly:
        what.append(f"{len(partly)} value{'s' if len(partly) != 1 else ''} only partly written left out ({partly[0]!r}: "
                    f"{', '.join(repr(h) for h in sorted(of[partly[0]]) if h not in keys)} not written)")
    if renamed:
        what.append(f"{renamed} key{'s' if renamed != 1 else ''} renamed")
    return "rewritten to match the tensors written: " + ", ".join(what)


def _flag(f: _Field) -> bool:
    """The value of a google.protobuf.BoolValue field."""
    v = _last(_fields(f.data), _BOOL_VALUE, 0)
    return v is not None and v.varint != 0


def _renumbered(f: _Field, number: int, old: int, value: int) -> _Field:
    raw = _renumber(f, number, old, value)
    return f if raw is f.raw else _Field(f.number, f.wire, _fields(raw)[0].value, raw)


def _renumber(f: _Field, number: int, old: int, value: int) -> bytes:
    """Field ``f`` (a sub-message) with its int32 field ``number`` changed from ``old`` to ``value``, the rest kept."""
    if old == value:
        return f.raw
    parts = _fields(f.data)
    return field_bytes(f.number, _replace(parts, number, field_varint(number, value) if value else b""))


def _rekey(attr: _Attr, key: str) -> bytes:
    if key == attr.key:
        return attr.field.raw
    return field_bytes(_ATTRIBUTES, _replace(attr.parts, _ATTR_CHECKPOINT_KEY, field_bytes(_ATTR_CHECKPOINT_KEY, key.encode("utf-8"))))


def _replace(parts: list[_Field], number: int, encoded: bytes) -> bytes:
    """The message with every occurrence of field ``number`` replaced by ``encoded``, at the first one's place."""
    out = bytearray()
    done = False
    for p in parts:
        if p.number != number:
            out += p.raw
        elif not done:
            out += encoded
            done = True
    if not done:
        out += encoded
    return bytes(out)


def key_map(
    mapping: Mapping[str, str],
    ema_swaps: Mapping[str, str],
    object_key: Callable[[str], str] | None = None,
) -> dict[str, str]:
    """Graph checkpoint key -> output name, for every output of a name plan.

    ``mapping`` is the plan's output name -> source name.  An EMA swap writes
    X from the values of X/ExponentialMovingAverage, but the variable the graph
    calls X is still X, so a swapped output keeps its own name.
    ``object_key`` gives the key the source's object graph uses for one of the
    source's names (a renaming view knows its inner names); by default the name.
    """
    out = {}
    for dst, src in mapping.items():
        name = dst if dst in ema_swaps else src
        out[object_key(name) if object_key is not None else name] = dst
    return out


def carry(payload: bytes, keys: Mapping[str, str], restorable: bool = False,
          held: Iterable[str] | None = None) -> tuple[bytes | None, str | None]:
    """(graph to write or None, a note for the report or None when carried unchanged); see :func:`rewrite`."""
    try:
        return rewrite(payload, keys, restorable, held)
    except Unusable as e:
        return None, (f"left out: {e}; tf.train.Checkpoint cannot restore the output by object "
                      "(tf.train.load_checkpoint and name-based restore still work)")


# --- comparing two graphs by what restore uses ------------------------------------------

#: How many path segments a difference shows before it elides the rest (a hostile chain is deep).
_SHOWN_SEGMENTS = 24


#: How restore first reached an object: the root, ("child", parent, name) or ("slot", original variable, optimizer, name).
_Via = tuple[Literal["root"]] | tuple[Literal["child"], int, str] | tuple[Literal["slot"], int, int, str]


class _Walk:
    """One graph as restore walks it: from the root through children, and through the slot links of an
    optimizer from the variables they belong to.  Objects it cannot reach are never restored into."""

    def __init__(self, payload: bytes, key: Callable[[str], str]) -> None:
        _, nodes = _parse(payload)
        self.children: list[list[tuple[str, int]]] = []
        #: (optimizer, original variable, slot name) -> slot variable
        self.links: dict[tuple[int, int, str], int] = {}
        #: node -> the slot links it is the optimizer or the original variable of
        self.by_end: dict[int, list[tuple[int, int, str]]] = {}
        for i, n in enumerate(nodes):
            kids = [(_text(_last(_fields(n.fields[j].data), _REF_LOCAL_NAME, 2)), c)
                    for j, c in n.children.items()]
            self.children.append(sorted(kids))
            for j, (orig, var) in n.slots.items():
                link = (i, orig, _text(_last(_fields(n.fields[j].data), _SLOT_NAME, 2)))
                self.links.setdefault(link, var)
                for end in {orig, i}:
                    self.by_end.setdefault(end, []).append(link)
        self.attrs = [tuple(sorted((_text(_last(a.parts, _ATTR_NAME, 2)), key(a.key)) for a in n.attrs.values())) for n in nodes]
        self.savers = [n.saver for n in nodes]
        # How each reachable object was first reached, breadth first with children by name (the same
        # for any node order): ("child", parent, name) or ("slot", original variable, optimizer, name).
        self.via: dict[int, _Via] = {0: ("root",)}
        todo, at = [0], 0
        while at < len(todo):
            i = todo[at]
            at += 1
            for name, c in self.children[i]:
                if c not in self.via:
                    self.via[c] = ("child", i, name)
                    todo.append(c)
            for opt, orig, name in self.by_end.get(i, ()):
                var = self.links[(opt, orig, name)]
                if opt in self.via and orig in self.via and var not in self.via:
                    self.via[var] = ("slot", orig, opt, name)
                    todo.append(var)

    def path(self, i: int, depth: int = 0) -> str:
        """``dense/kernel``, ``(root)``, or a slot variable as TensorFlow keys it
        (``dense/kernel/.OPTIMIZER_SLOT/optimizer/m``); past _SHOWN_SEGMENTS segments, ``…``."""
        segments: list[str] = []
        while True:
            how = self.via[i]
            if how[0] == "root":
                break
            if len(segments) >= _SHOWN_SEGMENTS:
                segments.append("…")
                break
            if how[0] == "slot":
                _, orig, opt, name = how
                segments.append("…" if depth > 2 else
                                f"{self.path(orig, depth + 1)}/.OPTIMIZER_SLOT/{self.path(opt, depth + 1)}/{name}")
                break
            _, i, child = how
            segments.append(child)
        return "/".join(reversed(segments)) or "(root)"


def _attr_list(attrs: tuple[tuple[str, str], ...]) -> str:
    if not attrs:
        return "no attributes"
    shown = ", ".join(f"{n!r} -> {k}" for n, k in attrs[:2])
    return f"attribute{'s' if len(attrs) != 1 else ''} {shown}" + (f" and {len(attrs) - 2} more" if len(attrs) > 2 else "")


def compare(a: bytes, b: bytes, key_a: Callable[[str], str], key_b: Callable[[str], str]) -> tuple[list[str], int]:
    """How two graphs differ for restore, one sentence per difference, and how many objects match.

    Objects are matched as restore would match them: the roots, then children of matched objects by
    local name, then slot variables of matched optimizers by matched variable and slot name; so node
    order and re-serialization do not count, and an object reached by two names (a Keras layer) that
    loses one is one difference.  For each matched object: its children, its attributes' names and
    checkpoint keys (through ``key_a``/``key_b``, the keys as each side names its tensors), its slot
    links and its registered saver.  An object restore reaches on one side only is a difference;
    objects it cannot reach are not compared.  An unreadable graph is one difference.
    """
    walks: list[_Walk] = []
    for side, payload, key in (("A", a, key_a), ("B", b, key_b)):
        try:
            walks.append(_Walk(payload, key))
        except _Bad as e:
            return [f"object graph: {side}'s cannot be compared: it is not a readable TrackableObjectGraph ({e})"], 0
        except _TooBig:
            return [f"object graph: {side}'s cannot be compared: it has more than {MAX_FIELDS:,} protobuf fields, more than ckptbridge checks"], 0
    wa, wb = walks
    out: list[tuple[str, str]] = []  # (path, sentence)
    pa, pb = _match(wa, wb, out)
    covered: set[tuple[str, int]] = set()  # slot variables whose missing link is already a line
    for x, y in pa.items():
        path = wa.path(x)
        for here, w, other, mine, theirs, mapped in (("A", wa, wb, x, y, pa), ("B", wb, wa, y, x, pb)):
            _one_sided_links(out, covered, path, here, w, other, mine, theirs, mapped)
        if wa.attrs[x] != wb.attrs[y]:
            _attribute_differences(out, path, wa.attrs[x], wb.attrs[y])
        if wa.savers[x] != wb.savers[y]:
            out.append((path, f"registered saver {wa.savers[x]!r} in A, {wb.savers[y]!r} in B"))
    for here, w, mapped, there in (("A", wa, pa, "B"), ("B", wb, pb, "A")):
        for i in w.via:
            if i not in mapped and (here, i) not in covered:
                out.append((w.path(i), f"object only in {here} ({_attr_list(w.attrs[i])}); {there} has no object there"))
    out.sort()
    return [f"object graph: {path}: {what}" for path, what in out], len(pa)


def _match(wa: _Walk, wb: _Walk, out: list[tuple[str, str]]) -> tuple[dict[int, int], dict[int, int]]:
    """A's node -> B's node and back, matched as restore matches them (see :func:`compare`); a child
    or slot variable that would match an object already matched to another is a line in ``out``."""
    pa: dict[int, int] = {0: 0}  # A's node -> B's node
    pb: dict[int, int] = {0: 0}

    def pair(x: int, y: int) -> bool:
        """Match x (in A) with y (in B); False where either is matched to another object."""
        if x in pa or y in pb:
            return pa.get(x) == y
        pa[x], pb[y] = y, x
        todo.append(x)
        return True

    todo, at = [0], 0
    while at < len(todo):
        x = todo[at]
        at += 1
        y = pa[x]
        ca, cb = dict(reversed(wa.children[x])), dict(reversed(wb.children[y]))
        for name in sorted(ca.keys() & cb.keys()):
            if not pair(ca[name], cb[name]):
                out.append((wa.path(x), f"child {name!r} is {wa.path(ca[name])} in A, {wb.path(cb[name])} in B"))
        for opt, orig, name in wa.by_end.get(x, ()):
            if opt in pa and orig in pa and (pa[opt], pa[orig], name) in wb.links:
                u, v = wa.links[(opt, orig, name)], wb.links[(pa[opt], pa[orig], name)]
                if not pair(u, v):
                    out.append((wa.path(opt), f"slot variable {name!r} of {wa.path(orig)} is {wa.path(u)} in A, {wb.path(v)} in B"))
    return pa, pb


def _one_sided_links(out: list[tuple[str, str]], covered: set[tuple[str, int]], path: str, here: str,
                     w: _Walk, other: _Walk, mine: int, theirs: int, mapped: Mapping[int, int]) -> None:
    """The children names and slot links matched object ``mine`` (on side ``here``, walked by ``w``) has
    and its match ``theirs`` lacks; a slot variable whose link is missing goes into ``covered``."""
    kids, others = dict(reversed(w.children[mine])), dict(other.children[theirs])
    for name in sorted(kids.keys() - others.keys()):
        if kids[name] in mapped:  # a second name for an object both have: only the name is lost
            out.append((path, f"child {name!r} only in {here} (the object {'B' if here == 'A' else 'A'} reaches "
                              f"as {other.path(mapped[kids[name]])})"))
    for opt, orig, name in w.by_end.get(mine, ()):
        var = w.links[(opt, orig, name)]
        if opt == mine and orig in mapped and (theirs, mapped[orig], name) not in other.links and var in w.via:
            out.append((path, f"slot variable {name!r} of {w.path(orig)} (-> {w.path(var)}) only in {here}"))
            covered.add((here, var))


def _attribute_differences(out: list[tuple[str, str]], path: str, a: tuple[tuple[str, str], ...], b: tuple[tuple[str, str], ...]) -> None:
    """How two matched objects' (attribute name, checkpoint key) lists differ."""
    da, db = dict(a), dict(b)
    for name in sorted(da.keys() | db.keys()):
        ka, kb = da.get(name), db.get(name)
        if ka is None or kb is None:
            out.append((path, f"attribute {name!r} (key {ka or kb}) only in {'A' if kb is None else 'B'}"))
        elif ka != kb:
            out.append((path, f"attribute {name!r} has key {ka} in A, {kb} in B"))
    if len(da) != len(a) or len(db) != len(b):
        out.append((path, f"attributes of repeated names: {len(a)} in A, {len(b)} in B"))


def count_reachable(payload: bytes) -> int:
    """How many objects restore reaches in the graph (0 if it cannot be read)."""
    try:
        return len(_Walk(payload, lambda k: k).via)
    except (_Bad, _TooBig):
        return 0


def key_names(payload: bytes, names: Mapping[str, str]) -> Callable[[str], str]:
    """Graph key -> the name its side shows (``names``: object key -> name, for every tensor held).

    An attribute whose value is several tensors (see :func:`parts`) maps to the common prefix of its
    tensors' names; a key no tensor holds stays as it is."""
    if all(k == v for k, v in names.items()):
        return lambda k: k
    try:
        _, nodes = _parse(payload)
        of = parts({a.key for n in nodes for a in n.attrs.values()}, set(names))
    except (_Bad, _TooBig):
        return lambda k: names.get(k, k)
    out = {}
    for k, tensors in of.items():
        prefixes = {names[h][:len(names[h]) - len(sfx)] for h, sfx in tensors.items() if names[h].endswith(sfx)}
        if len(prefixes) == 1 and all(names[h].endswith(sfx) for h, sfx in tensors.items()):
            out[k] = prefixes.pop()
    return lambda k: out.get(k, k)

