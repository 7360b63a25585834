"""ckptbridge's native engine for TensorFlow V2 checkpoints (tensor bundles).

Reads and writes ``prefix.index`` + ``prefix.data-NNNNN-of-MMMMM`` with NumPy
and crc32c only; importing this package never imports TensorFlow.  The format
is described in docs/bundle-format.md.
"""

from __future__ import annotations

from .reader import ENGINE_NAME, BundleReader, data_path, index_path, is_bundle
from .writer import BundleWriter

__all__ = ["BundleReader", "BundleWriter", "is_bundle", "data_path", "index_path", "ENGINE_NAME"]
