"""Archive formats, one registry keyed by suffix.

Each archive format is one module with a source class and a sink class, and one
:class:`Format` line in :data:`FORMATS` below: its name, its suffixes, where its
classes live, what it can hold and a one-line description.  Resolution
(``_resolve``), the dry-run check (``_api``) and the command line's help all read
this table, so adding a format is its module plus its line here (or a
:func:`register` call).  An output suffix the table does not know is an error
that lists :func:`suffixes`, never a guess.  Files that other programs write and
ckptbridge only reads (Keras's) are source kinds (:mod:`ckptbridge.sources`), not formats.

Classes are named as ``"module:Class"`` strings and imported on first use, so
importing ckptbridge (or this package) imports no format's dependencies (h5py,
safetensors) until a path needs them.  This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .._lazy import load_object

if TYPE_CHECKING:
    from .._dtypes import DType
    from .._source import Sink, Source
    from ..spec import TensorSpec


def _carried(d: DType) -> bool:
    return d.carried


def _has_safetensors_code(d: DType) -> bool:
    return d.carried and d.safetensors is not None


class _OpensSource(Protocol):
    """How a registered source class is constructed (:attr:`Format.source`)."""

    def __call__(self, path: str, *, verify: bool, max_tensor_bytes: int | None) -> Source: ...


@dataclasses.dataclass(frozen=True)
class Holds:
    """What a format can store.  Anything else is refused by name before a byte is written."""

    #: which dtypes of the one table (``_dtypes``): a predicate on its entries
    dtypes: Callable[[DType], bool] = _carried
    #: tensor names, in a few words (every format also refuses empty names and control characters)
    names: str = "any UTF-8 name without control characters"

    def dtype_names(self) -> tuple[str, ...]:
        """The canonical names of the dtypes this format holds, in TensorFlow's enum order."""
        from .. import _dtypes

        return tuple(n for n in _dtypes.CARRIED if self.dtypes(_dtypes.BY_NAME[n]))


@dataclasses.dataclass(frozen=True)
class Format:
    """One archive format's entry in the registry."""

    #: short name, also the source's ``kind`` and what ``ls`` shows: "npz", "hdf5"...
    name: str
    #: file-name suffixes, lower case with the dot; the first is the one help texts show first
    suffixes: tuple[str, ...]
    #: the :class:`~ckptbridge._source.Source` class, ``"module:Class"`` (imported on first use) or the class;
    #: constructed as ``Source(path, verify=..., max_tensor_bytes=...)``
    source: str | type[Source]
    #: the :class:`~ckptbridge._source.Sink` class, likewise; constructed as
    #: ``Sink(path, force=..., source=...)`` plus ``compress=`` where :attr:`compression` is set
    sink: str | type[Sink]
    #: one line for help texts and docs
    description: str
    holds: Holds = Holds()
    #: what ``compress=True`` does ("deflate"...), None where the format has no compression
    compression: str | None = None
    #: ``"module:function"`` ``(specs, path)`` that refuses, before anything is written, what the
    #: format cannot hold beyond :attr:`holds` (reserved names...); None for none
    check: str | Callable[..., None] | None = None

    def open_source(self, path: str, *, verify: bool = True, max_tensor_bytes: int | None = None) -> Source:
        cls: _OpensSource = load_object(self.source)
        return cls(path, verify=verify, max_tensor_bytes=max_tensor_bytes)

    def open_sink(self, path: str, *, compress: bool = False, force: bool = False, source: str | None = None) -> Sink:
        kw: dict[str, Any] = {"force": force, "source": source}
        if self.compression is not None:
            kw["compress"] = compress
        elif compress:
            from ..errors import FormatError

            raise FormatError(f"{self.name} archives are not compressed ({path}); write .npz or .h5 to compress")
        cls: Callable[..., Sink] = load_object(self.sink)
        return cls(path, **kw)

    def check_specs(self, specs: Iterable[TensorSpec], path: str) -> None:
        """Refuse, naming every tensor, what this format cannot hold (what opening its sink would refuse)."""
        from ..errors import FormatError

        specs = list(specs)
        if self.check is not None:
            load_object(self.check)(specs, path)
        held = set(self.holds.dtype_names())
        bad = [s for s in specs if s.dtype not in held]
        if bad:
            shown = ", ".join(f"{s.name!r} ({s.dtype})" for s in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise FormatError(f"{len(bad)} tensor(s) cannot be stored in {self.name} ({path}), which holds only "
                              f"{', '.join(sorted(held))}: {shown}; leave them out or choose another format")


#: name -> entry, in the order help texts list them
FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a format (h5py's ``register_driver``).  A suffix another format has is refused."""
    from ..errors import FormatError

    if fmt.name in FORMATS:
        raise FormatError(f"an archive format named {fmt.name!r} is already registered")
    if not fmt.suffixes or any(s != s.lower() or not s.startswith(".") for s in fmt.suffixes):
        raise FormatError(f"format {fmt.name!r}: suffixes must be lower case and start with a dot, got {fmt.suffixes!r}")
    taken = {s: f.name for f in FORMATS.values() for s in f.suffixes}
    clash = [s for s in fmt.suffixes if s in taken]
    if clash:
        raise FormatError(f"format {fmt.name!r}: suffix {clash[0]} already belongs to {taken[clash[0]]}")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove a registered format (tests that register their own)."""
    FORMATS.pop(name, None)


def suffixes() -> tuple[str, ...]:
    """Every suffix an archive may have, in registry order."""
    return tuple(s for f in FORMATS.values() for s in f.suffixes)


def for_path(path: str) -> Format | None:
    """The format a path's suffix names (case-insensitive); None for any other suffix."""
    ext = os.path.splitext(path)[1].lower()
    for f in FORMATS.values():
        if ext in f.suffixes:
            return f
    return None


def require_for_path(path: str) -> Format:
    """The format of an archive path, or FormatError listing the suffixes the registry knows."""
    from ..errors import FormatError

    fmt = for_path(path)
    if fmt is None:
        raise FormatError(f"cannot tell the archive format of {path}: its suffix must be one of {', '.join(sorted(suffixes()))}")
    return fmt


register(Format(
    "npz", (".npz",), "ckptbridge.formats.npz:NpzSource", "ckptbridge.formats.npz:NpzSink",
    "NumPy's zip of .npy members (np.load reads it); every dtype, tagged where NumPy lacks it",
    Holds(names="UTF-8 names without control characters, not ckptbridge's two reserved member names"),
    compression="deflate",
))
register(Format(
    "hdf5", (".h5", ".hdf5"), "ckptbridge.formats.hdf5:Hdf5Source", "ckptbridge.formats.hdf5:Hdf5Sink",
    "HDF5 file, one dataset per tensor under its name's groups (h5py reads it); every dtype, tagged where NumPy lacks it",
    Holds(names="UTF-8 names without control characters, of at most 32 dimensions"),
    compression="gzip",
))
register(Format(
    "safetensors", (".safetensors",), "ckptbridge.formats.safetensors:SafetensorsSource",
    "ckptbridge.formats.safetensors:SafetensorsSink",
    "the safetensors file PyTorch, JAX and Hugging Face load; only dtypes with a safetensors code (no strings, complex128, quantized)",
    Holds(dtypes=_has_safetensors_code, names="UTF-8 names without control characters, not '__metadata__'"),
    check="ckptbridge.formats.safetensors:check_specs",
))
