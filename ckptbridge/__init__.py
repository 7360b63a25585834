"""ckptbridge: TensorFlow (TF-Slim) checkpoints to NumPy archives and back, exactly.

The public API is five verbs — :func:`read`, :func:`export`, :func:`rebuild`,
:func:`diff`, :func:`verify` — and the error types.  Importing ckptbridge does
not import TensorFlow; the verbs import it only when a path needs it.
"""

from __future__ import annotations

from ._api import Reader, diff, export, read, rebuild, verify
from ._spec import TensorSpec
from .convert import DiffReport, Report, VerifyReport
from .errors import (
    CkptBridgeError,
    CorruptError,
    FormatError,
    MismatchError,
    MissingDependencyError,
    NotFoundError,
    OutputExistsError,
    UnsafeArchiveError,
)

__version__ = "0.1.0"

__all__ = [
    "read",
    "export",
    "rebuild",
    "diff",
    "verify",
    "Reader",
    "TensorSpec",
    "Report",
    "DiffReport",
    "VerifyReport",
    "CkptBridgeError",
    "CorruptError",
    "FormatError",
    "MismatchError",
    "MissingDependencyError",
    "NotFoundError",
    "OutputExistsError",
    "UnsafeArchiveError",
    "__version__",
]
