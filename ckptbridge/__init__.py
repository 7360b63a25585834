"""ckptbridge: TensorFlow (TF-Slim) checkpoints to NumPy archives and back, exactly.

The public API: :func:`read` (lazy) and :func:`load` (eager) for any checkpoint or
archive, :func:`save` for a dict of arrays, :func:`export` and :func:`rebuild`
between checkpoints and archives, :func:`assign` and :func:`init_fn` into the
variables of a model you already have, :func:`diff`, :func:`verify`, :func:`archive`
(many checkpoints), their options as
small values (:class:`ReadOptions`, :class:`Select`, :class:`Rename`,
:class:`Layout`, :class:`Naming`, :class:`Port`, :class:`Graph`, :class:`Workers`), and the error
types.  Importing ckptbridge does not import TensorFlow; the verbs import it only
when a path needs it.
"""

from __future__ import annotations

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m ...` is importing this package: if it is the command line, its handlers go in first
    from .io import signals as _signals

    if _signals.started_as_command():
        _signals.install_cli_handlers()

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    CkptBridgeError,
    CorruptError,
    FormatError,
    MismatchError,
    MissingDependencyError,
    NotFoundError,
    OutputExistsError,
    RemoteError,
    RemotePermissionError,
    StateFileError,
    UncarriedDtypeError,
    UnsafeArchiveError,
)

# The verbs and report types import NumPy, h5py and the rest (0.7 s): they load on
# first use, so the command line can install its signal handlers before that
# (a Ctrl-C during start-up then ends with one line, not a traceback).
_LAZY = {
    "read": "._api", "export": "._api", "rebuild": "._api", "diff": "._api", "verify": "._api", "Reader": "._api",
    "save": "._api", "load": "._api", "assign": "._assign", "init_fn": "._assign", "port_maps": "._api", "port_map": "._api",
    "PortMap": ".ports", "match_tensorflow": ".ports.match",
    "ReadOptions": "._options", "Select": "._options", "Rename": "._options", "Layout": "._options", "Naming": "._options",
    "Port": "._options", "Graph": "._options", "Workers": "._options", "archive": "._archive",
    "ArchiveReport": ".reports", "ArchiveEntry": ".reports",
    "TensorSpec": ".spec", "Report": ".reports", "DiffReport": ".reports", "VerifyReport": ".reports",
}

if TYPE_CHECKING:
    from ._api import Reader, diff, export, load, port_map, port_maps, read, rebuild, save, verify
    from ._archive import archive
    from ._assign import assign, init_fn
    from ._options import Graph, Layout, Naming, Port, ReadOptions, Rename, Select, Workers
    from .ports import PortMap
    from .ports.match import match_tensorflow
    from .reports import ArchiveEntry, ArchiveReport, DiffReport, Report, VerifyReport
    from .spec import TensorSpec


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "read",
    "load",
    "save",
    "export",
    "rebuild",
    "diff",
    "verify",
    "assign",
    "init_fn",
    "archive",
    "port_maps",
    "port_map",
    "PortMap",
    "match_tensorflow",
    "Reader",
    "ReadOptions",
    "Select",
    "Rename",
    "Layout",
    "Naming",
    "Port",
    "Graph",
    "Workers",
    "TensorSpec",
    "Report",
    "DiffReport",
    "VerifyReport",
    "ArchiveReport",
    "ArchiveEntry",
    "CkptBridgeError",
    "CorruptError",
    "FormatError",
    "MismatchError",
    "MissingDependencyError",
    "NotFoundError",
    "OutputExistsError",
    "RemoteError",
    "RemotePermissionError",
    "StateFileError",
    "UncarriedDtypeError",
    "UnsafeArchiveError",
    "__version__",
]
