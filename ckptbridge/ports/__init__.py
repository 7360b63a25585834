"""Port maps: the map model (:mod:`.model`), reading and checking the TOML maps in ``maps/``
(:mod:`.parse`), and the views that port a checkpoint (:mod:`.plan`).

The views come from :mod:`.plan` on first use: it imports NumPy and the sources, which
listing the maps (``ckptbridge maps``) does not need."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import CAVEAT_KINDS, FORMAT, TRANSFORMS, Added, Caveat, PortMap, Rule
from .parse import MAPS_DIR, builtin, load, parse, parse_file

if TYPE_CHECKING:
    from .plan import Ported, PortSource, plan_export, plan_import

_FROM_PLAN = ("Ported", "PortSource", "plan_export", "plan_import")


def __getattr__(name: str) -> Any:
    if name in _FROM_PLAN:
        from . import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CAVEAT_KINDS", "FORMAT", "TRANSFORMS", "Added", "Caveat", "PortMap", "Rule", "MAPS_DIR", "builtin", "load", "parse",
           "parse_file", "Ported", "PortSource", "plan_export", "plan_import"]
