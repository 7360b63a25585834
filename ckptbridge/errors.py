"""The error types ckptbridge raises.

Every failure the library can foresee is a :class:`CkptBridgeError`; the CLI turns
it into one ``ckptbridge: error: ...`` line and exit status 2.  Subclasses also
subclass the matching built-in so callers can catch either.

A message that names the option which gets past it names it in the library's
own terms (``pass force=True to overwrite it``); the command line shows the same
message with its flag (``pass --force to overwrite it``).  Messages mark the
option with :func:`option`, and :meth:`CkptBridgeError.render` spells it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = [
    "CkptBridgeError",
    "NotFoundError",
    "FormatError",
    "CorruptError",
    "MismatchError",
    "UnsafeArchiveError",
    "UncarriedDtypeError",
    "OutputExistsError",
    "MissingDependencyError",
    "RemoteError",
    "RemotePermissionError",
    "StateFileError",
]


_OPEN, _SEP, _CLOSE = "\ue000", "\ue002", "\ue001"  # private-use characters: repr() escapes them in names
_MARK = re.compile(f"{_OPEN}([a-z_]+)(?:{_SEP}([^{_CLOSE}]*))?{_CLOSE}")


def option(key: str, value: object = None) -> str:
    """A mark in a message for the option ``key`` (an API keyword) set to ``value``.

    Rendered as the keyword for library callers (``option("force", True)`` ->
    ``force=True``, ``option("engine", "tf")`` -> ``engine='tf'``,
    ``option("exclude")`` -> ``exclude``) and as a flag by the command line.
    """
    return _OPEN + key + ("" if value is None else _SEP + str(value)) + _CLOSE


def api_spelling(key: str, value: str | None) -> str:
    """How the Python API names an option: its keyword, with the value where one is given."""
    if value is None:
        return key
    return f"{key}={value}" if value in ("True", "False") else f"{key}={value!r}"


def render(message: str, spell: Callable[[str, str | None], str] = api_spelling) -> str:
    """``message`` with every :func:`option` mark spelled by ``spell(key, value)``."""
    return _MARK.sub(lambda m: spell(m.group(1), m.group(2)), message)


class CkptBridgeError(Exception):
    """Base class of every error ckptbridge raises on purpose."""

    def __str__(self) -> str:
        return render(super().__str__())

    def render(self, spell: Callable[[str, str | None], str]) -> str:
        """The message with its options spelled by ``spell`` (the CLI passes its flags)."""
        return render(super().__str__(), spell)


class NotFoundError(CkptBridgeError, FileNotFoundError):
    """A path, checkpoint or tensor that was asked for does not exist."""


class FormatError(CkptBridgeError, ValueError):
    """A file is not of a format ckptbridge reads, or an option names an unknown one."""


class CorruptError(FormatError):
    """A file claims to be of a known format but its bytes are damaged."""


class MismatchError(CkptBridgeError, ValueError):
    """Names, shapes or dtypes on two sides do not agree."""


class UnsafeArchiveError(FormatError):
    """An archive asks for something ckptbridge refuses to do (pickle, external storage...)."""


class UncarriedDtypeError(FormatError):
    """Tensors whose dtype ckptbridge cannot carry (``variant``...) were asked for.

    ``tensors`` maps each such tensor's name to its dtype.  Nothing is dropped
    silently: leaving them out is the caller's explicit choice (an exclude filter).
    """

    def __init__(self, message: str, tensors: dict[str, str]) -> None:
        super().__init__(message)
        self.tensors = dict(tensors)


class OutputExistsError(CkptBridgeError, FileExistsError):
    """The destination exists and ``force`` was not given."""


class MissingDependencyError(CkptBridgeError, ImportError):
    """An optional dependency (TensorFlow, safetensors...) is needed but not installed."""


class RemoteError(CkptBridgeError, ConnectionError):
    """A remote read failed, after its retries where a retry could help."""


class RemotePermissionError(CkptBridgeError, PermissionError):
    """The server refused access to a remote object (HTTP 401/403, or the storage library's PermissionError)."""


class StateFileError(CkptBridgeError):
    """The checkpoint was published but its directory's state file could not be updated."""
