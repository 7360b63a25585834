"""Classes named by ``"module:Name"`` strings, imported on first use: what the registries hold.

A registry line names its classes this way so that reading the registry (for a
suffix, for the command line's help) imports no heavy dependency.  A leaf: it
imports nothing from ckptbridge.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_object(ref: str | Any) -> Any:
    """``"package.module:Name"`` imported now; anything else (a class itself) is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def refers_to(ref: str | Any, obj: object) -> bool:
    """Whether ``obj`` is an instance of the class ``ref`` names (or is), without importing anything."""
    for cls in type(obj).__mro__:
        if ref is cls or ref == f"{cls.__module__}:{cls.__qualname__}":
            return True
    return False
