"""The error types ckptbridge raises.

Every failure the library can foresee is a :class:`CkptBridgeError`; the CLI turns
it into one ``ckptbridge: error: ...`` line and exit status 2.  Subclasses also
subclass the matching built-in so callers can catch either.
"""

from __future__ import annotations

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
]


class CkptBridgeError(Exception):
    """Base class of every error ckptbridge raises on purpose."""


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
