"""Port planning: a tf-slim net's checkpoint <-> another framework's ``state_dict``, as a view.

A map (:mod:`.model`, read by :mod:`.parse`) and a source make a view the pipe
writes like any other: on export a view under the destination's names and
layouts, on import a view under the slim names, ready for the graph rebuild.

Nothing is dropped without a word: every source tensor is used, skipped by the
map, or optimizer state; every destination tensor is produced exactly once;
anything else is one error that lists every problem.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._source import Source, SourceView
from ..errors import MismatchError
from ..pipe import layout as lay
from ..pipe.names import EMA_SUFFIX, Plan, training_state
from ..pipe.plans import Prepared
from ..spec import TensorSpec
from .model import _SHOWN, PortMap, Rule

# --------------------------------------------------------------------------- transforms


def _not_fc_as_conv(rule: Rule, shape: tuple[int, ...]) -> str:
    kh, kw = rule.kernel
    return f"is {list(shape)}, but a fully connected layer stored as a {kh}x{kw} conv is [{kh}, {kw}, in, out]"


def _transform(rule: Rule, shape: tuple[int, ...]) -> tuple[lay.Transform | None, str | None]:
    """The exact layout change of ``rule`` for a source tensor of ``shape`` (after the class axis), or why it does not fit."""
    if rule.transform == "none":
        return None, None
    if rule.transform == "fc_as_conv":
        if len(shape) != 4 or tuple(shape[:2]) != rule.kernel:
            return None, _not_fc_as_conv(rule, shape)
        h, w, i, o = shape
        return lay.Transform("fc_as_conv", (3, 2, 0, 1), shape, (o, i * h * w)), None
    if rule.transform == "flatten":
        # Keras: a fully connected layer stored as a conv -> Dense [H*W*in, out], flattened in H,W,C order.
        if len(shape) != 4 or tuple(shape[:2]) != rule.kernel:
            return None, _not_fc_as_conv(rule, shape)
        h, w, i, o = shape
        return lay.Transform("flatten", (0, 1, 2, 3), shape, (h * w * i, o)), None
    t = lay.transform_for(rule.transform, shape)
    if t is None:
        return None, f"is {list(shape)}, which does not fit a {rule.transform} kernel"
    return t, None


def _describe(t: lay.Transform | None, classes: str | None) -> str:
    parts = []
    if classes:
        parts.append(classes)
    if t is not None:
        whats = {"fc_as_conv": "fully connected stored as conv [H,W,in,out] -> Linear [out, in*H*W] (C,H,W order)",
                 "flatten": "fully connected stored as conv [H,W,in,out] -> Dense [H*W*in, out] (H,W,C order)"}
        parts.append(f"{whats[t.kind]} {list(t.from_shape)} -> {list(t.to_shape)}" if t.kind in whats else t.describe())
    return "; ".join(parts)


def _shown(names: Sequence[str]) -> str:
    names = list(names)
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _mismatch(pmap: PortMap, path: str, problems: Mapping[str, list[str]]) -> MismatchError:
    parts = [f"{what} ({len(names)}): {_shown(names)}" for what, names in problems.items() if names]
    return MismatchError(f"port map {pmap.name} does not fit {path}: " + "; ".join(parts))


# --------------------------------------------------------------------------- the two views


@dataclasses.dataclass(frozen=True)
class _Entry:
    inner: str | None          # the inner source's tensor (None: a filled tensor)
    transform: lay.Transform | None
    classes: str | None        # "drop" (export: remove the background class) / "insert" (import: add it back) / None
    fill: float = 0.0


class PortSource(SourceView):
    """A view of ``inner`` under the other side's names, layouts and class axis."""

    def __init__(self, inner: Source, entries: Mapping[str, _Entry], specs: Mapping[str, TensorSpec], *, invert: bool) -> None:
        super().__init__(inner)
        self._entries = dict(entries)
        self._specs = {n: specs[n] for n in sorted(specs)}
        self._invert = invert

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> np.ndarray:
        spec = self.spec(name)
        e = self._entries[name]
        if e.inner is None:
            from .._dtypes import numpy_dtype

            return np.full(spec.shape, e.fill, dtype=numpy_dtype(spec.dtype))
        arr = self._inner.read(e.inner)
        if not self._invert:
            if e.classes == "drop":
                arr = np.ascontiguousarray(arr[..., 1:])
            return arr if e.transform is None else e.transform.apply(arr)
        if e.transform is not None:
            arr = e.transform.invert(arr)
        if e.classes == "insert":
            arr = np.concatenate([np.zeros(arr.shape[:-1] + (1,), arr.dtype), arr], axis=-1)
        return arr

    def read_blocks(self, name: str, chunk_bytes: int) -> Any:
        e = self._entries[name]
        if e.inner is None or e.transform is not None or e.classes:
            return None
        return self._inner.read_blocks(e.inner, chunk_bytes)

    def checksum(self, name: str) -> int | None:
        e = self._entries[name]
        return self._inner.checksum(e.inner) if e.inner is not None and e.transform is None and not e.classes else None

    def object_key(self, name: str) -> str:
        return self._entries[name].inner or name

    # The other side's names: the inner source's object graph, records and uncarried tensors do not apply.
    def extras(self) -> dict[str, bytes]:
        return {}

    def uncarried(self) -> Mapping[str, TensorSpec]:
        return {}

    def read_raw(self, name: str) -> bytes | None:
        return None

    def metadata(self) -> dict[str, Any]:
        return {}


@dataclasses.dataclass
class Ported(Prepared):
    """What the pipe needs for a port (``renamed``: source name -> destination name), and what the
    report tells besides."""

    #: output name -> what it was filled with, and why
    added: dict[str, str] = dataclasses.field(default_factory=dict)
    caveats: list[str] = dataclasses.field(default_factory=list)


def _skipped(pmap: PortMap, name: str) -> bool:
    return any(re.search(s, name) for s in pmap.skip)


def plan_export(src: Source, pmap: PortMap) -> Ported:
    """The view of a tf-slim checkpoint (or archive of one) that is the destination's ``state_dict``."""
    specs = src.specs()
    entries: dict[str, _Entry] = {}
    out: dict[str, TensorSpec] = {}
    used: set[str] = set()
    missing: list[str] = []
    misfit: list[str] = []
    ema_swaps: dict[str, str] = {}
    dropped: dict[str, str] = {}
    layout: dict[str, str] = {}
    for r in pmap.rules:
        ema = r.source + EMA_SUFFIX
        read = ema if ema in specs else r.source
        if read not in specs:
            missing.append(r.source)
            continue
        used.update({r.source, ema})
        s = specs[read]
        shape = s.shape
        classes = None
        if r.classes:
            n = shape[-1] if shape else 0
            if n != pmap.source_classes:
                misfit.append(f"{read} has {n} classes on its last axis, the map {pmap.source_classes}")
                continue
            if pmap.source_classes == pmap.dest_classes + 1:
                classes = "drop"
                shape = shape[:-1] + (n - 1,)
        t, why = _transform(r, shape)
        if why is not None:
            misfit.append(f"{read} {why}")
            continue
        entries[r.dest] = _Entry(read, t, classes)
        out[r.dest] = TensorSpec(r.dest, s.dtype, t.to_shape if t is not None else shape)
        if read != r.source:
            ema_swaps[r.dest] = read
            if r.source in specs:
                dropped[r.source] = f"its EMA {read} is read instead"
        if t is not None or classes:
            layout[r.dest] = _describe(t, "background class (index 0 of the class axis) dropped" if classes else None)
    added = _add_exported(pmap, entries, out)
    unused = _unused_on_export(src, specs, pmap, used, dropped)
    if missing or misfit or unused:
        raise _mismatch(pmap, src.path, {"missing from the checkpoint": missing, "does not fit": misfit,
                                         "not used by the map (a different net, or a map that is incomplete)": unused})
    plan = Plan({n: n for n in sorted(out)}, dropped, ema_swaps)
    renamed = {r.source: r.dest for r in pmap.rules if r.dest in out}
    doc = {"port": {"map": pmap.name, "direction": "export", "net": pmap.net, "destination": pmap.destination,
                    "classes": {"source": pmap.source_classes, "destination": pmap.dest_classes}, "caveats": pmap.caveat_lines()}}
    return Ported(PortSource(src, entries, out, invert=False), plan, doc, renamed, layout, added, pmap.caveat_lines())


def _add_exported(pmap: PortMap, entries: dict[str, _Entry], out: dict[str, TensorSpec]) -> dict[str, str]:
    """Add the map's filled tensors to ``entries`` and ``out``; what each was filled with."""
    added: dict[str, str] = {}
    for a in pmap.added:
        if a.like is not None:
            if a.like not in out:
                continue  # its rule failed: reported there
            dtype, shape = out[a.like].dtype, out[a.like].shape
        else:
            assert a.dtype is not None and a.shape is not None
            dtype, shape = a.dtype, a.shape
        entries[a.dest] = _Entry(None, None, None, a.fill)
        out[a.dest] = TensorSpec(a.dest, dtype, shape)
        why = " (the tf-slim net has no such tensor)" if a.check else " (a counter tf-slim does not keep)"
        added[a.dest] = f"filled with {a.fill:g}" + why
    return added


def _unused_on_export(src: Source, specs: Mapping[str, TensorSpec], pmap: PortMap, used: set[str], dropped: dict[str, str]) -> list[str]:
    """The checkpoint's tensors no rule read that are not dropped by design (recorded in ``dropped``)."""
    unused = []
    for name in list(specs) + list(src.uncarried()):
        if name in used:
            continue
        if _skipped(pmap, name):
            dropped[name] = f"skipped by port map {pmap.name}"
        elif (held := training_state(name)) is not None:
            dropped[name] = f"{held} (a port carries weights only)"
        elif name.endswith(EMA_SUFFIX) and name[: -len(EMA_SUFFIX)] in used:
            continue
        else:
            unused.append(name)
    return unused


def plan_import(src: Source, pmap: PortMap, *, num_classes: int | None = None) -> Ported:
    """The view of a destination-style archive (a ``state_dict``) under the tf-slim net's names and layouts.

    ``num_classes`` is the class count of the slim net to build: the map's source
    count by default.  One more than the destination's inserts TensorFlow's
    background class as a row of zeros at index 0; equal to it takes the
    destination's classes as they are.
    """
    classes = pmap.source_classes if num_classes is None else num_classes
    if classes not in (pmap.dest_classes, pmap.dest_classes + 1):
        raise MismatchError(f"port map {pmap.name} carries {pmap.dest_classes} classes; the tf-slim net can have {pmap.dest_classes} "
                            f"or {pmap.dest_classes + 1} (with TensorFlow's background class), not {classes}")
    specs = src.specs()
    # A source that shows readable names (a Keras file: conv2d/0) records the stored ones
    # (layers/conv2d/vars/0) as its original names: a map may name either.
    recorded = src.metadata().get("original_names", {})
    stored = {raw: name for name, raw in recorded.items() if name in specs and isinstance(raw, str)} if isinstance(recorded, dict) else {}

    def find(dest: str) -> str | None:
        return dest if dest in specs else stored.get(dest)

    entries: dict[str, _Entry] = {}
    out: dict[str, TensorSpec] = {}
    used: set[str] = set()
    missing: list[str] = []
    misfit: list[str] = []
    layout: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for r in pmap.rules:
        name = find(r.dest)
        if name is None:
            missing.append(r.dest)
            continue
        used.add(name)
        s = specs[name]
        shape = _source_shape(r, s.shape)
        if shape is None:
            misfit.append(f"{r.dest} is {list(s.shape)}, which a {r.transform} layout cannot come from")
            continue
        t, why = _transform(r, shape)
        if why is not None:
            misfit.append(f"{r.dest} {why}")
            continue
        insert = None
        if r.classes:
            n = shape[-1] if shape else 0
            if n != pmap.dest_classes:
                misfit.append(f"{r.dest} has {n} classes, the map {pmap.dest_classes}")
                continue
            if classes == pmap.dest_classes + 1:
                insert = "insert"
                shape = shape[:-1] + (n + 1,)
        entries[r.source] = _Entry(name, t, insert)
        out[r.source] = TensorSpec(r.source, s.dtype, shape)
        undo = None if t is None else "undo " + _describe(t, None)
        if undo or insert:
            layout[r.source] = "; ".join(x for x in (undo, "background class inserted at index 0 as zeros" if insert else None) if x)
    not_fill = _check_added_on_import(src, pmap, find, used, missing, dropped)
    unused = [n for n in list(specs) + list(src.uncarried()) if n not in used]
    if missing or misfit or unused or not_fill:
        raise _mismatch(pmap, src.path, {
            "missing from the archive": missing, "does not fit": misfit,
            "not used by the map (a different model, or a map that is incomplete)": unused,
            "values the tf-slim net cannot carry (it has no such tensor)": not_fill})
    plan = Plan({n: n for n in sorted(out)}, dropped, {})
    renamed = {e.inner: n for n, e in entries.items() if e.inner is not None}
    return Ported(PortSource(src, entries, out, invert=True), plan, {}, renamed, layout, {}, pmap.caveat_lines())


def _check_added_on_import(src: Source, pmap: PortMap, find: Callable[[str], str | None], used: set[str],
                           missing: list[str], dropped: dict[str, str]) -> list[str]:
    """Check the tensors the export filled (recorded in ``used``, ``missing``, ``dropped``); those that
    hold values the tf-slim net cannot carry."""
    not_fill: list[str] = []
    for a in pmap.added:
        name = find(a.dest)
        if name is None:
            if a.check:
                missing.append(a.dest)
            continue
        used.add(name)
        if not a.check:
            dropped[name] = f"a counter the tf-slim net does not keep (port map {pmap.name})"
            continue
        arr = src.read(name)
        if not np.all(np.asarray(arr, dtype=np.float64) == a.fill):
            not_fill.append(f"{a.dest} (must be all {a.fill:g})")
        else:
            dropped[name] = f"all {a.fill:g}, as the tf-slim net assumes"
    return not_fill


def _source_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The slim shape (after the class axis) a destination tensor of ``shape`` comes from under ``rule``."""
    if rule.transform == "none":
        return shape
    if rule.transform == "conv":
        return (*shape[2:], shape[1], shape[0]) if len(shape) >= 3 else None
    if rule.transform == "dense":
        return (shape[1], shape[0]) if len(shape) == 2 else None
    if rule.transform == "depthwise":
        return None  # [C*M, 1, H, W] does not say M; no built-in map needs it on import
    h, w = rule.kernel
    if rule.transform == "flatten":
        if len(shape) != 2 or shape[0] % (h * w):
            return None
        return (h, w, shape[0] // (h * w), shape[1])
    if len(shape) != 2 or shape[1] % (h * w):
        return None
    return (h, w, shape[1] // (h * w), shape[0])
