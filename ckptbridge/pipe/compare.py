"""diff and verify: walk two sources, or one, through the same Source interface."""

from __future__ import annotations

import numpy as np

from .. import _dtypes
from .._dtypes import uncarried_error
from .._source import OBJECT_GRAPH, Source
from ..errors import CorruptError
from ..io.progress import bar
from ..reports import DiffReport, VerifyReport
from ..sources import _objgraph
from ..spec import TensorSpec


def diff_sources(a: Source, b: Source, *, atol: float = 0.0, rtol: float = 0.0, progress: bool | None = False,
                 graphs: bool = True) -> DiffReport:
    """Compare every tensor of ``a`` and ``b`` by name, those of a dtype not carried included
    (by their stored bytes: an engine that cannot get at them is an error, never a silent pass),
    and, with ``graphs``, their TF2 object graphs as restore uses them (see :func:`diff_graphs`)."""
    graph_diffs, graph_objects = diff_graphs(a, b) if graphs else ([], None)
    sa, sb = {**a.specs(), **a.uncarried()}, {**b.specs(), **b.uncarried()}
    opaque = a.uncarried().keys() | b.uncarried().keys()
    only_a = sorted(set(sa) - set(sb))
    only_b = sorted(set(sb) - set(sa))
    common = sorted(set(sa) & set(sb))
    spec_diffs = {}
    value_diffs: dict[str, tuple[int, float | None]] = {}
    raw_diffs: dict[str, str] = {}
    compared_raw = 0
    pbar = bar(sum(sa[n].nbytes for n in common), "comparing", progress)
    try:
        for name in common:
            if sa[name].dtype != sb[name].dtype or sa[name].shape != sb[name].shape:
                spec_diffs[name] = (sa[name], sb[name])
                continue
            if name in opaque:
                if _raw(a, name, sa[name]) != _raw(b, name, sb[name]):
                    raw_diffs[name] = sa[name].dtype
                compared_raw += 1
                continue
            d = _value_diff(a.read(name), b.read(name), atol, rtol)
            if d is not None:
                value_diffs[name] = d
            pbar.update(sa[name].nbytes)
    finally:
        pbar.close()
    return DiffReport(only_a, only_b, spec_diffs, value_diffs, len(common), raw_diffs, compared_raw, graph_diffs, graph_objects)


def diff_graphs(a: Source, b: Source) -> tuple[list[str], int | None]:
    """How the TF2 object graphs of ``a`` and ``b`` differ for ``tf.train.Checkpoint`` restore, one
    sentence each, and how many objects both have (None when neither side has a graph).

    A graph on one side only is a difference: restoring by object from the other side gets nothing.
    Each side's attribute keys are read as that side names its tensors (an archive's graph is keyed
    by the archive's names, a readable-names view shows a checkpoint's keys by readable names).
    """
    ga, gb = a.extras().get(OBJECT_GRAPH), b.extras().get(OBJECT_GRAPH)
    if ga is None and gb is None:
        return [], None
    if ga is None or gb is None:
        here, other = ("A", "B") if gb is None else ("B", "A")
        return [f"object graph: only {here} has a TF2 object graph; {other} has none, so tf.train.Checkpoint "
                f"restores no object from {other} (its tensors still load by name)"], 0
    na, nb = _graph_names(a), _graph_names(b)
    if ga == gb and na == nb:
        return [], _objgraph.count_reachable(ga)
    return _objgraph.compare(ga, gb, _objgraph.key_names(ga, na), _objgraph.key_names(gb, nb))


def _graph_names(source: Source) -> dict[str, str]:
    """Object-graph key -> the name the source shows, for every tensor it holds."""
    return {source.object_key(n): n for n in [*source.specs(), *source.uncarried()]}


def _raw(source: Source, name: str, spec: TensorSpec) -> bytes:
    """The stored bytes of a tensor of a dtype not carried, or the error that says this engine cannot read them."""
    raw = source.read_raw(name)
    if raw is None:
        raise uncarried_error(source.path, {name: spec.dtype})
    return raw


def _value_diff(x: np.ndarray, y: np.ndarray, atol: float, rtol: float) -> tuple[int, float | None] | None:
    x, y = _dtypes.comparable(x), _dtypes.comparable(y)
    if x.dtype == np.dtype(object):
        n = int(sum(1 for p, q in zip(x.reshape(-1), y.reshape(-1)) if bytes(p) != bytes(q)))
        return (n, None) if n else None
    if x.tobytes() == y.tobytes():
        return None
    if x.dtype == np.bool_:
        n = int(np.count_nonzero(x != y))
        return (n, None) if n else None
    xf = x.astype(np.complex128 if x.dtype.kind == "c" else np.float64)
    yf = y.astype(xf.dtype)
    if x.dtype.kind in "iu":
        # Exact integer distance: through float64, int64 values past 2**53 that differ would compare equal.
        big, small = np.maximum(x, y).astype(np.uint64), np.minimum(x, y).astype(np.uint64)
        absdiff = (big - small).astype(np.float64)  # modulo 2**64, so exact for every pair
    else:
        with np.errstate(invalid="ignore"):  # inf - inf
            absdiff = np.abs(xf - yf)
    # From the float64 copies, so that bfloat16 (dtype kind "V") NaNs count too.
    both_nan = np.isnan(xf) & np.isnan(yf)
    if atol == 0 and rtol == 0:
        # Exact mode: bit patterns decide (so -0.0 vs 0.0 and NaN payloads count).
        bad = x.reshape(-1).view(np.uint8).reshape(x.size, -1) != y.reshape(-1).view(np.uint8).reshape(y.size, -1)
        bad = bad.any(axis=1).reshape(x.shape)
    else:
        with np.errstate(invalid="ignore"):
            bad = ~((absdiff <= atol + rtol * np.abs(yf)) | both_nan)
    n = int(np.count_nonzero(bad))
    if n == 0:
        return None
    with np.errstate(invalid="ignore"):
        finite = absdiff[bad & ~np.isnan(absdiff)]
    return n, float(finite.max()) if finite.size else float("nan")


def verify_source(source: Source, *, progress: bool | None = False) -> VerifyReport:
    """Read every tensor (sources check their checksums as they read)."""
    specs = source.specs()
    opaque = source.uncarried()
    pbar = bar(sum(s.nbytes for s in specs.values()), "verifying", progress)
    checked = 0
    try:
        for name, spec in specs.items():
            try:
                source.read(name)
            except CorruptError as e:
                return VerifyReport(source.path, checked, False, name, str(e))
            checked += 1
            pbar.update(spec.nbytes)
        for name, spec in opaque.items():
            try:
                _raw(source, name, spec)
            except CorruptError as e:
                return VerifyReport(source.path, checked, False, name, str(e), checked_raw=checked - len(specs))
            checked += 1
    finally:
        pbar.close()
    has = source.origin().engine is not None or bool(source.metadata().get("tensors"))
    return VerifyReport(source.path, checked, True, has_checksums=has, checked_raw=len(opaque))


