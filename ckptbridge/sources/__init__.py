"""Source kinds, one registry tried in order: what a path or URL the user typed is.

Each kind of source is one :class:`Kind`: its name, one line for help texts and
docs, a ``recognise`` function and an ``open`` function.  ``_resolve.open_source``
hands each kind in turn an :class:`Input` (where the input is: a local path, or a
name at a place, a URL's directory; and how to read it), and the first kind whose
``recognise`` returns something opens it with what it returned.  The kind is
decided there, once, and carried on the opened source
(:attr:`~ckptbridge._source.Source.opened_by`).  Adding a kind (an orbax checkpoint,
a new directory layout) is its module plus one :func:`register` call.

``recognise(input)`` reads as little as it can (a suffix, a header through
:meth:`Input.head`, whether a file exists) and returns None for anything not of
its kind; it raises only to refuse what is of its kind but cannot be read (a
SavedModel without its variables), which ends the search.  The same function sees
local paths and remote places: a kind that reads one file reads it through
:meth:`Input.open_file`, a :class:`~ckptbridge.io.ranged.RangedFile` either way.
``open(input, found)`` returns the :class:`~ckptbridge._source.Source`.

Functions are named as ``"module:function"`` strings and imported on first use,
so importing this package imports no reader.  The built-in kinds, in the order
they are tried, are :func:`kinds`; a registered kind goes ahead of the last three,
which take whatever is left (any directory, any prefix with files, any file).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._lazy import load_object
from ..io.ranged import LocalFile, where

if TYPE_CHECKING:
    from .._source import Source
    from ..io.ranged import Place, RangedFile

__all__ = ["Input", "Kind", "register", "unregister", "kinds", "recognise", "named_by_suffix", "KINDS"]


@dataclasses.dataclass(frozen=True)
class Input:
    """What a kind is asked to recognise and open: where it is and how to read it."""

    #: the local path, or the URL as given (messages show :attr:`shown`, which has no credentials)
    path: str
    #: the place a URL points into (its directory); None for a local path.  The source opened there owns it.
    place: Place | None = None
    #: the name inside :attr:`place` (a file, a checkpoint prefix); "" for a local path
    name: str = ""
    #: the reading options of ``ckptbridge.read``
    engine: str = "auto"
    verify: bool = True
    max_tensor_bytes: int | None = None
    names: str = "auto"
    #: the checkpoint to open inside an archive of checkpoints; only kinds with :attr:`Kind.members` see one
    member: str | None = None
    #: how messages name the ``member`` option (``diff`` has two)
    member_key: str = "member"
    #: where what must be unpacked goes (None: the system temp)
    scratch_dir: str | None = None
    progress: bool | None = False

    @property
    def remote(self) -> bool:
        return self.place is not None

    @property
    def shown(self) -> str:
        """How messages name the input: the local path, or the place and name (without credentials)."""
        return self.path if self.place is None else where(self.place, self.name)

    @property
    def base(self) -> str:
        """The input's last name: the local path, or the name at the place (for suffixes)."""
        return self.path if self.place is None else self.name

    def is_file(self) -> bool:
        """Whether the input is a regular file (a local one) or a file at its place."""
        if self.place is None:
            return os.path.isfile(self.path)
        return bool(self.name) and self.place.exists(self.name)

    def open_file(self) -> RangedFile:
        """The input as a file read by ranges, local or remote; the caller closes it."""
        return LocalFile(self.path) if self.place is None else self.place.open(self.name)

    def head(self, n: int) -> bytes:
        """The file's first ``n`` bytes (all of a shorter one); b"" for anything that is not a readable file."""
        from ..errors import CkptBridgeError

        try:
            if not self.is_file():
                return b""
            with self.open_file() as f:
                return f.pread(0, min(n, f.size))
        except (OSError, CkptBridgeError):
            return b""


@dataclasses.dataclass(frozen=True)
class Kind:
    """One source kind's entry in the registry."""

    #: short name, what :func:`kinds` lists and the opened source's ``opened_by``: "checkpoint", "saved-model"...
    name: str
    #: one line for help texts and docs
    description: str
    #: ``"module:function"`` or the function ``(Input) -> found | None``: what of this kind the input is
    #: (any value but None), or None; raises only to refuse an input of this kind that cannot be read
    recognise: str | Callable[[Input], Any]
    #: ``"module:function"`` or the function ``(Input, found) -> Source``
    open: str | Callable[[Input, Any], Source]
    #: whether it holds several checkpoints and opens the one ``member`` names (an archive of checkpoints)
    members: bool = False
    #: suffixes, lower case with the dot, that name a file of this kind whatever its bytes (``.keras``)
    suffixes: tuple[str, ...] = ()

    def open_source(self, inp: Input, found: Any) -> Source:
        """The source ``inp`` is, as this kind opens it (``found``: what :attr:`recognise` returned)."""
        src: Source = load_object(self.open)(inp, found)
        src.opened_by = self.name
        return src


#: name -> kind, in the order inputs are tried
KINDS: dict[str, Kind] = {}

#: the built-in kinds that take whatever is left; :func:`register` puts a new kind ahead of them
GENERIC = ("directory", "checkpoint", "v1")


def register(kind: Kind, *, before: str | None = None) -> Kind:
    """Add a source kind, tried ahead of ``before`` (default: ahead of :data:`GENERIC`, so a
    checkpoint's directory, prefix or file is not taken for a V1 file first).  A name twice is refused."""
    from ..errors import FormatError

    if kind.name in KINDS:
        raise FormatError(f"a source kind named {kind.name!r} is already registered")
    if any(s != s.lower() or not s.startswith(".") for s in kind.suffixes):
        raise FormatError(f"source kind {kind.name!r}: suffixes must be lower case and start with a dot, got {kind.suffixes!r}")
    order = list(KINDS)
    if before is None:
        at = next((i for i, n in enumerate(order) if n in GENERIC), len(order))
    elif before in KINDS:
        at = order.index(before)
    else:
        raise FormatError(f"no source kind named {before!r} to register {kind.name!r} before; the kinds: {', '.join(order)}")
    entries = list(KINDS.items())
    entries.insert(at, (kind.name, kind))
    KINDS.clear()
    KINDS.update(entries)
    return kind


def unregister(name: str) -> None:
    """Remove a registered kind (tests that register their own)."""
    KINDS.pop(name, None)


def kinds() -> tuple[str, ...]:
    """The name of every kind, in the order inputs are tried."""
    return tuple(KINDS)


def recognise(inp: Input) -> tuple[Kind, Any] | None:
    """The first kind that recognises ``inp`` and what it found; None where none does.

    With ``inp.member`` given, only kinds that hold several checkpoints (:attr:`Kind.members`) are tried."""
    for kind in KINDS.values():
        if inp.member is not None and not kind.members:
            continue
        found = load_object(kind.recognise)(inp)
        if found is not None:
            return kind, found
    return None


def named_by_suffix(path: str) -> Kind | None:
    """The kind whose :attr:`Kind.suffixes` name ``path`` (``.keras``), whether or not it exists."""
    ext = os.path.splitext(path)[1].lower()
    return next((k for k in KINDS.values() if ext in k.suffixes), None)


def _builtin(name: str, description: str, *, members: bool = False, suffixes: tuple[str, ...] = ()) -> None:
    """A built-in kind, appended: its functions are ``recognise_<name>`` and ``open_<name>`` of ``_kinds``."""
    fn = name.replace("-", "_")
    KINDS[name] = Kind(name, description, f"ckptbridge.sources._kinds:recognise_{fn}", f"ckptbridge.sources._kinds:open_{fn}",
                       members=members, suffixes=suffixes)


_builtin("checkpoint-archive", "a .tar, .tar.gz/.tgz or .zip holding checkpoints (member= picks one), local or at a URL", members=True)
_builtin("keras", "Keras weights and models, read only: Keras 2 HDF5 (save_weights, save), Keras 3 .weights.h5, .keras zips; "
         "recognised by content", suffixes=(".keras",))
_builtin("archive", "an archive ckptbridge writes (.npz, .h5, .safetensors: ckptbridge.formats), by its suffix")
_builtin("saved-model", "a SavedModel or TF1 Hub module directory, read through its variables/variables checkpoint under readable names")
_builtin("directory", "a directory of checkpoints: the one its 'checkpoint' state file names where whole, else the newest complete one")
_builtin("checkpoint", "a V2 checkpoint: its prefix (PREFIX.index beside its .data-* shards) or one of its files, local or at a URL")
_builtin("v1", "a V1 checkpoint: one table file, or shards named PREFIX-?????-of-NNNNN, local or at a URL")
