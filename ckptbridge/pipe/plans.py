"""Handing weights to another framework: renames and layout changes around the pipe.

Both are done by a :class:`MappedSource` that shows a source's tensors under
new names and in a new layout, so the pipe (``_pipe.transfer``) and the
graph rebuild (``tf.slim.plan_graph_import``) take it like any other source.

Order of the name policies, on export: include/exclude, --weights-only and
--use-ema act on the checkpoint's own names; then --rename-file, then each
--rename rule in order.  The layout is chosen from the checkpoint's names (or
its graph), before renames.  On import: --original-names first (restoring the
names recorded at export), then include/exclude/--use-ema, then the renames,
then the names layer undone: a name the names layer gave (``readable_names``,
see ``_readable``) that no rename touched, on export or import, goes back to
its checkpoint key unless ``names`` keeps it (``_readable.keys_on_import``);
a recorded layout is always undone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._source import Source, SourceView
from ..errors import CorruptError, FormatError, option
from ..formats import meta
from ..sources import _readable
from ..spec import TensorSpec
from . import layout as lay
from .names import Plan, RenameRule, make_plan, training_state
from .names import rename_map as _rename_map

ORIGINAL_NAMES = _readable.ORIGINAL_NAMES
READABLE_NAMES = _readable.READABLE_NAMES


class MappedSource(SourceView):
    """A view of ``inner``: out name -> (inner name, transform, direction).

    ``keys`` gives, for an out name, the inner name whose object-graph entry it
    is (an EMA swap reads X/ExponentialMovingAverage for X, but it is still X);
    by default the inner name it reads.
    """

    def __init__(
        self,
        inner: Source,
        entries: Mapping[str, tuple[str, lay.Transform | None, bool]],
        keys: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(inner)
        self._entries = dict(entries)
        self._keys = dict(keys or {})
        specs = inner.specs()
        out = {}
        for name in sorted(self._entries):
            src, t, invert = self._entries[name]
            s = specs[src]
            shape = s.shape if t is None else (t.from_shape if invert else t.to_shape)
            out[name] = TensorSpec(name, s.dtype, shape)
        self._specs = out

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> np.ndarray:
        self.spec(name)
        src, t, invert = self._entries[name]
        arr = self._inner.read(src)
        if t is None:
            return arr
        return t.invert(arr) if invert else t.apply(arr)

    def read_blocks(self, name: str, chunk_bytes: int) -> Any:
        """Stream renamed tensors as the inner source does; transformed ones are read whole."""
        src, t, _ = self._entries[name]
        return self._inner.read_blocks(src, chunk_bytes) if t is None else None

    def checksum(self, name: str) -> int | None:
        src, t, _ = self._entries[name]
        return self._inner.checksum(src) if t is None else None

    def object_key(self, name: str) -> str:
        """The key under which the inner source's TF2 object graph knows tensor ``name``."""
        return self._inner.object_key(self._keys.get(name, self._entries[name][0]))

    # The inner source's records, uncarried tensors and their bytes are keyed by its own names, not these.
    def uncarried(self) -> Mapping[str, TensorSpec]:
        return {}

    def read_raw(self, name: str) -> bytes | None:
        return None

    def metadata(self) -> dict[str, Any]:
        return {}


@dataclasses.dataclass
class Prepared:
    """What the pipe needs, and what the report tells."""

    source: Source
    plan: Plan
    #: entries for the archive's metadata document
    metadata: dict[str, Any]
    #: old name -> new name, for every name that changed
    renamed: dict[str, str]
    #: output name -> what was done to its layout (or why a kernel-like tensor was left alone)
    layout: dict[str, str]


def _renames(names: Sequence[str], known: Sequence[str], rename: Sequence[str | RenameRule], rename_map: Mapping[str, str] | None) -> dict[str, str]:
    if rename_map is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in rename_map.items()):
        raise FormatError("the exact renames must map tensor names (strings) to new names (strings)")
    exact = dict(rename_map) if rename_map else None
    return _rename_map(names, rules=rename, exact=exact, known=known)


def _original_names(doc: Mapping[str, Any], where: str, entry: str = ORIGINAL_NAMES) -> dict[str, str]:
    """The archive's record of names before export renamed them (``entry``: all of them, or those of
    the names layer), checked as its tensor names are: they become checkpoint keys and are printed."""
    what, one = ("original names", "original name") if entry == ORIGINAL_NAMES else ("checkpoint keys of the readable names", "checkpoint key")
    rec = doc.get(entry, {})
    if not isinstance(rec, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rec.items()):
        raise CorruptError(f"{where}: the recorded {what} are not readable; the archive is damaged")
    for name, original in rec.items():
        meta.check_tensor_name(name, f"{where}: recorded {what}")
        meta.check_tensor_name(original, f"{where}: recorded {one} of {name!r}")
    return rec


def prepare_export(
    src: Source,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    weights_only: bool = False,
    use_ema: bool = False,
    rename: Sequence[str | RenameRule] = (),
    rename_map: Mapping[str, str] | None = None,
    layout: str | None = None,
    model: str | None = None,
    num_classes: int | None = None,
) -> Prepared:
    """Plan an export with renames and an optional layout change (see module docstring)."""
    lay.check_layout(layout)
    if model is not None and layout is None:
        raise FormatError(f"{option('model')} on export only tells {option('layout')} which tensors are conv, depthwise or dense; "
                          f"add {option('layout', 'torch')}")
    specs = src.specs()
    prior = src.metadata()
    prior_layout = lay.parse_records(prior, src.path)
    prior_orig = _original_names(prior, src.path)
    prior_readable = _original_names(prior, src.path, READABLE_NAMES)
    opaque = src.uncarried()
    # Optimizer and metric state is told by the checkpoint's key where a readable name hides it (a SavedModel's
    # optimizer "iteration", a TF2 slot "Adam/m/dense/kernel"): the object key, or the recorded original.
    state = {n: why for n in [*specs, *opaque] if (why := training_state(src.object_key(n)) or training_state(prior_orig.get(n, n)))}
    plan0 = make_plan(list(specs), include=include, exclude=exclude, weights_only=weights_only, use_ema=use_ema,
                      uncarried={n: s.dtype for n, s in opaque.items()}, where=src.path, state=state)
    ren = _renames(list(plan0.mapping), list(specs), rename, rename_map)

    choices: dict[str, tuple[lay.Transform | None, str]] = {}
    if layout is not None:
        already = sorted(n for n in plan0.mapping.values() if n in prior_layout)
        if already:
            raise FormatError(f"{src.path} is already in {layout} layout ({', '.join(already[:3])}...); export it without {option('layout')}")
        cand = {dst: dataclasses.replace(specs[s], name=dst) for dst, s in plan0.mapping.items()}
        graph = None
        if model is not None:
            from ..tf.kernels import graph_kinds  # TensorFlow only when a net is named

            graph = graph_kinds(model, num_classes, dict(specs))
        choices = lay.choose(cand, graph=graph)

    entries: dict[str, tuple[str, lay.Transform | None, bool]] = {}
    keys: dict[str, str] = {}
    records: dict[str, lay.Transform] = {}
    originals: dict[str, str] = {}
    readable: dict[str, str] = {}  # the names layer's names no rename touched: import writes their keys back
    described: dict[str, str] = {}
    for dst, s in plan0.mapping.items():
        new = ren[dst]
        t, why = choices.get(dst, (None, ""))
        entries[new] = (s, t, False)
        keys[new] = dst
        if t is not None:
            records[new] = t
            described[new] = f"{t.describe()} ({why})"
        elif layout is not None and len(specs[s].shape) >= 2:
            described[new] = f"unchanged ({why})"
        if s in prior_layout:
            records[new] = prior_layout[s]  # carried over from an archive already in that layout
        orig = prior_orig.get(dst, dst)
        if orig != new:
            originals[new] = orig
        if new == dst and dst in prior_readable:
            readable[new] = prior_readable[dst]
    doc: dict[str, Any] = {}
    if originals:
        doc[ORIGINAL_NAMES] = originals
    if readable:
        doc[READABLE_NAMES] = readable
    if layout is not None or records:
        doc["layout"] = lay.records(records)
    plan = Plan({n: n for n in entries}, dict(plan0.dropped), {ren[k]: v for k, v in plan0.ema_swaps.items()})
    renamed = {old: new for old, new in ren.items() if old != new}
    return Prepared(MappedSource(src, entries, keys), plan, doc, renamed, described)


def prepare_import(
    src: Source,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    weights_only: bool = False,
    use_ema: bool = False,
    rename: Sequence[str | RenameRule] = (),
    rename_map: Mapping[str, str] | None = None,
    original_names: bool = False,
    names: str = _readable.AUTO,
    by_graph: bool = False,
) -> Prepared:
    """Plan an import that undoes a recorded layout and applies renames (see module docstring).

    ``names`` says whether the names layer's readable names go back to their checkpoint keys
    (``by_graph``: the names are matched to a graph's variables), as ``_readable.keys_on_import``.
    """
    if original_names and names == _readable.READABLE:
        raise FormatError(f"{option('original_names')} restores the names recorded at export, the checkpoint keys among them; "
                          f"{option('names', _readable.READABLE)} keeps the readable ones: give one of them")
    specs = src.specs()
    doc = src.metadata()
    inverse = lay.parse_records(doc, src.path)
    for name, record in inverse.items():
        if name in specs and specs[name].shape != record.to_shape:
            raise CorruptError(f"{src.path}: tensor {name!r} is {list(specs[name].shape)} but its layout record says {list(record.to_shape)}; "
                               "the archive is damaged")
    recorded = _original_names(doc, src.path) if original_names else {}
    # without original_names, each readable name that no rename touches goes back to its key (below)
    keys_back = _original_names(doc, src.path, READABLE_NAMES) if not original_names and _readable.keys_on_import(names, by_graph) else {}
    stage: dict[str, str] = {}  # name after --original-names -> archive name
    for name in specs:
        restored = recorded.get(name, name)
        if restored in stage:
            raise FormatError(f"two tensors of {src.path} restore to the same original name {restored!r}: {stage[restored]!r} and {name!r}")
        stage[restored] = name
    plan0 = make_plan(list(stage), include=include, exclude=exclude, weights_only=weights_only, use_ema=use_ema,
                      uncarried={n: s.dtype for n, s in src.uncarried().items()}, where=src.path)
    ren = _renames(list(plan0.mapping), list(stage), rename, rename_map)
    entries: dict[str, tuple[str, lay.Transform | None, bool]] = {}
    keys: dict[str, str] = {}
    described: dict[str, str] = {}
    renamed: dict[str, str] = {}
    final: dict[str, str] = {}  # name after the renames -> the name written
    by_out: dict[str, str] = {}
    for dst in plan0.mapping:
        new = ren[dst]
        out = keys_back.get(dst, new) if new == dst else new
        if out in by_out:
            raise FormatError(f"two tensors of {src.path} would be written as {out!r}: {stage[by_out[out]]!r} and {stage[dst]!r}; "
                              f"rename one of them, or keep the readable names with {option('names', _readable.READABLE)}")
        final[dst] = out
        by_out[out] = dst
    for dst, s in plan0.mapping.items():
        archive_name = stage[s]
        new = final[dst]
        t = inverse.get(archive_name)
        entries[new] = (archive_name, t, True)
        keys[new] = stage[dst]
        if t is not None:
            described[new] = f"undo {t.describe()}"
        if new != stage[dst]:
            renamed[stage[dst]] = new
    dropped = {stage.get(k, k): v for k, v in plan0.dropped.items()}
    plan = Plan({n: n for n in entries}, dropped, {final[k]: stage[v] for k, v in plan0.ema_swaps.items()})
    return Prepared(MappedSource(src, entries, keys), plan, {}, renamed, described)
