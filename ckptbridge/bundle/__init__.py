"""ckptbridge's native engine for TensorFlow checkpoints.

Reads and writes V2 checkpoints (tensor bundles: ``prefix.index`` +
``prefix.data-NNNNN-of-MMMMM``) and reads V1 ones (one table file, ``v1``) with
NumPy and crc32c only; importing this package never imports TensorFlow.  The
formats are described in docs/bundle-format.md.  The V1 reader is imported on
first use (the engine registry names it by string): a V2 checkpoint never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..io.ckptfiles import data_path, index_path
from .reader import ENGINE_NAME, BundleReader, is_bundle
from .writer import BundleWriter

if TYPE_CHECKING:
    from .v1 import V1Reader, is_v1


def __getattr__(name: str) -> Any:
    if name in ("V1Reader", "is_v1"):
        from . import v1

        return getattr(v1, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BundleReader", "BundleWriter", "V1Reader", "is_bundle", "is_v1", "data_path", "index_path", "ENGINE_NAME"]
