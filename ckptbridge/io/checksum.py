"""crc32c, the checksum of every tensor and bundle block, without the ``crc32c`` package's start-up.

``import crc32c`` runs the package's ``__init__``, which imports ``importlib.metadata`` only to set
its ``__version__`` (and with it ``email``, ``zipfile``, ``socket`` and more): about 20 ms of every
command, a tenth of ``ckptbridge ls``.  The function lives in the package's extension module, so it
is loaded from there without the package; where that cannot be done (another layout, a frozen
install), or the package is imported already, the package's own function is used.

A leaf: it imports nothing from ckptbridge.  Callers look :data:`crc32c` up at call time
(``checksum.crc32c(...)``), so a test can count the bytes checksummed by replacing it here.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class _Crc32c(Protocol):
    def __call__(self, data: ReadableBuffer, value: int = 0) -> int: ...


def _from_extension() -> _Crc32c | None:
    """The extension module's ``crc32c``, loaded without running the package's ``__init__``."""
    import importlib.machinery
    import importlib.util
    import os

    try:
        package = importlib.util.find_spec("crc32c")  # finds, does not import, a top-level package
        if package is None or not package.submodule_search_locations:
            return None
        for where in package.submodule_search_locations:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(where, "_crc32c" + suffix)
                if os.path.isfile(path):
                    spec = importlib.util.spec_from_file_location("crc32c._crc32c", path)
                    if spec is None or spec.loader is None:
                        return None
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
                    fn: _Crc32c = module.crc32c
                    return fn
    except (ImportError, OSError, AttributeError, ValueError):
        return None
    return None


def _load() -> _Crc32c:
    loaded = sys.modules.get("crc32c")
    found = None if loaded is not None else _from_extension()
    if found is not None:
        return found
    import crc32c as package

    fn: _Crc32c = package.crc32c
    return fn


#: ``crc32c(data, value=0)``: the crc32c of a buffer, continuing from ``value`` (releases the GIL on large buffers)
crc32c: _Crc32c = _load()
