"""ckptbridge's native engine for TensorFlow checkpoints.

Reads and writes V2 checkpoints (tensor bundles: ``prefix.index`` +
``prefix.data-NNNNN-of-MMMMM``) and reads V1 ones (one table file, ``v1``) with
NumPy and crc32c only; importing this package never imports TensorFlow.  The
formats are described in docs/bundle-format.md.
"""

from __future__ import annotations

from ..io.ckptfiles import data_path, index_path
from .reader import ENGINE_NAME, BundleReader, is_bundle
from .v1 import V1Reader, is_v1
from .writer import BundleWriter

__all__ = ["BundleReader", "BundleWriter", "V1Reader", "is_bundle", "is_v1", "data_path", "index_path", "ENGINE_NAME"]
