"""Weight layouts: TensorFlow's kernel layouts to PyTorch's, and back, exactly.

TensorFlow stores a conv kernel as ``[H, W, in, out]`` (HWIO), a depthwise
kernel as ``[H, W, C, M]`` and a dense kernel as ``[in, out]``; PyTorch wants
``[out, in, H, W]``, ``[C*M, 1, H, W]`` (a grouped conv with ``groups=C``) and
``[out, in]``.  Each change is a transpose followed by a reshape, so it moves
bytes and never touches a value: the round trip is bit-exact.

A :class:`Transform` records the permutation and both shapes.  Archives keep
one per changed tensor in their metadata (``"layout"``), and importing such an
archive undoes it from that record alone.

Which tensors are conv, depthwise or dense is decided either from a tf-slim
graph (the ops that consume each variable: ``Conv2D``, ``DepthwiseConv2dNative``,
``MatMul``...; :mod:`ckptbridge.tf.kernels` builds the graph and hands its verdicts
to :func:`choose`) or, without one, from rank and name conventions.  This module
imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CorruptError, FormatError
from ..spec import STRING, TensorSpec

LAYOUTS = ("torch",)

CONV = "conv"
DEPTHWISE = "depthwise"
DENSE = "dense"

# The last path component that marks a kernel, by convention (tf-slim, Keras).
_KERNEL_NAMES = {"weights", "kernel", "pointwise_weights", "pointwise_kernel"}
_DEPTHWISE_NAMES = {"depthwise_weights", "depthwise_kernel"}
_TF2_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_EMA_SUFFIX = "/ExponentialMovingAverage"

@dataclasses.dataclass(frozen=True)
class Transform:
    """``transpose(perm)`` then ``reshape(to_shape)``; inverted from the same record."""

    kind: str
    perm: tuple[int, ...]
    from_shape: tuple[int, ...]
    to_shape: tuple[int, ...]

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """The array in the target layout (a fresh C-contiguous array)."""
        if tuple(arr.shape) != self.from_shape:
            raise FormatError(f"layout {self.kind}: expected shape {list(self.from_shape)}, got {list(arr.shape)}")
        return np.ascontiguousarray(np.transpose(arr, self.perm)).reshape(self.to_shape)

    def invert(self, arr: np.ndarray) -> np.ndarray:
        """Undo :meth:`apply`: back to ``from_shape``, bit for bit."""
        if tuple(arr.shape) != self.to_shape:
            raise FormatError(f"layout {self.kind}: expected shape {list(self.to_shape)}, got {list(arr.shape)}")
        mid = tuple(self.from_shape[p] for p in self.perm)
        return np.ascontiguousarray(np.transpose(arr.reshape(mid), np.argsort(self.perm)))

    def describe(self) -> str:
        what = {CONV: "conv HWIO->OIHW", DEPTHWISE: "depthwise HWCM->[C*M,1,H,W]", DENSE: "dense [in,out]->[out,in]"}.get(self.kind, self.kind)
        return f"{what} {list(self.from_shape)} -> {list(self.to_shape)}"

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, "perm": list(self.perm), "from_shape": list(self.from_shape), "to_shape": list(self.to_shape)}

    @classmethod
    def from_record(cls, rec: Any, where: str) -> Transform:
        """Parse and check a metadata record (archives are not trusted)."""
        try:
            kind = str(rec["kind"])
            perm = tuple(int(x) for x in rec["perm"])
            src = tuple(int(x) for x in rec["from_shape"])
            dst = tuple(int(x) for x in rec["to_shape"])
        except (KeyError, TypeError, ValueError):
            raise CorruptError(f"{where}: layout record {rec!r} is not readable; the archive is damaged") from None
        if sorted(perm) != list(range(len(src))) or any(d < 0 for d in src + dst) or math.prod(src) != math.prod(dst):
            raise CorruptError(f"{where}: layout record {rec!r} is inconsistent (perm {list(perm)}, shapes {list(src)} -> {list(dst)}); "
                               "the archive is damaged")
        return cls(kind, perm, src, dst)


def transform_for(kind: str, shape: tuple[int, ...]) -> Transform | None:
    """The torch-layout transform of a tensor of ``kind`` and ``shape``, if it has one."""
    r = len(shape)
    if kind == DENSE and r == 2:
        return Transform(DENSE, (1, 0), shape, (shape[1], shape[0]))
    if kind == CONV and 3 <= r <= 5:
        perm = (r - 1, r - 2) + tuple(range(r - 2))
        return Transform(CONV, perm, shape, tuple(shape[p] for p in perm))
    if kind == DEPTHWISE and r == 4:
        h, w, c, m = shape
        return Transform(DEPTHWISE, (2, 3, 0, 1), shape, (c * m, 1, h, w))
    return None


def _base_name(name: str) -> str:
    for suffix in (_TF2_SUFFIX, _EMA_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def kind_by_convention(name: str, spec: TensorSpec) -> tuple[str | None, str]:
    """(kind or None, why) from rank and the name's last component."""
    if spec.dtype == STRING:
        return None, "string tensor"
    last = _base_name(name).rsplit("/", 1)[-1]
    r = len(spec.shape)
    if last in _DEPTHWISE_NAMES:
        return (DEPTHWISE, f"named {last}, rank 4") if r == 4 else (None, f"named {last} but rank {r}")
    if last in _KERNEL_NAMES:
        if r == 2:
            return DENSE, f"named {last}, rank 2"
        if 3 <= r <= 5:
            return CONV, f"named {last}, rank {r}"
        return None, f"named {last} but rank {r}"
    return None, "name is not a kernel's"


def choose(names: Mapping[str, TensorSpec], *, graph: dict[str, tuple[str | None, str]] | None = None) -> dict[str, tuple[Transform | None, str]]:
    """name -> (transform or None, why) for every candidate tensor.

    ``names`` maps the tensor's TensorFlow name (after EMA and filters, before
    renames) to its spec.  With ``graph``, graph variables are decided by the
    graph; names the graph does not have (EMA shadows, slots) follow the
    variable they belong to, else the conventions.
    """
    out: dict[str, tuple[Transform | None, str]] = {}
    for name, spec in names.items():
        if graph is not None and (name in graph or _base_name(name) in graph):
            kind, why = graph[name] if name in graph else graph[_base_name(name)]
        else:
            kind, why = kind_by_convention(name, spec)
            if graph is not None:
                why = f"not in the graph; {why}"
        t = transform_for(kind, spec.shape) if kind is not None else None
        if kind is not None and t is None:
            why = f"{why}, but shape {list(spec.shape)} does not fit {kind}"
        out[name] = (t, why)
    return out


def records(transforms: Mapping[str, Transform]) -> dict[str, Any]:
    """The archive metadata entry for a set of applied transforms (by output name)."""
    return {"convention": "torch", "tensors": {n: t.to_record() for n, t in transforms.items()}}


def parse_records(doc: Mapping[str, Any], where: str) -> dict[str, Transform]:
    """The transforms an archive records (archive name -> transform); empty if none."""
    rec = doc.get("layout")
    if rec is None:
        return {}
    if not isinstance(rec, dict) or not isinstance(rec.get("tensors"), dict):
        raise CorruptError(f"{where}: layout metadata is not readable; the archive is damaged")
    if rec.get("convention") not in LAYOUTS:
        raise CorruptError(f"{where}: unknown layout convention {rec.get('convention')!r}; written by a newer ckptbridge? upgrade ckptbridge")
    return {str(n): Transform.from_record(r, f"{where}: tensor {n!r}") for n, r in rec["tensors"].items()}


def check_layout(layout: str | None) -> None:
    if layout is not None and layout not in LAYOUTS:
        raise FormatError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
