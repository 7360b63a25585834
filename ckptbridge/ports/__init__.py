"""Port maps: the map model (:mod:`.model`), reading and checking the TOML maps in ``maps/``
(:mod:`.parse`), and the views that port a checkpoint (:mod:`.plan`)."""

from .model import CAVEAT_KINDS, FORMAT, TRANSFORMS, Added, Caveat, PortMap, Rule
from .parse import MAPS_DIR, builtin, load, parse, parse_file
from .plan import Ported, PortSource, plan_export, plan_import

__all__ = ["CAVEAT_KINDS", "FORMAT", "TRANSFORMS", "Added", "Caveat", "PortMap", "Rule", "MAPS_DIR", "builtin", "load", "parse",
           "parse_file", "Ported", "PortSource", "plan_export", "plan_import"]
