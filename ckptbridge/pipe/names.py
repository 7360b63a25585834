"""Name policies: which tensors go through, and under which name.

A :class:`Plan` maps source names to output names and records every name it
drops or swaps and why, so that nothing disappears silently.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping, Sequence

from ..errors import FormatError, option

EMA_SUFFIX = "/ExponentialMovingAverage"

# Optimizer state written by tf.compat.v1 optimizers (slot suffixes), TF2 Keras
# optimizers (under optimizer/ or .OPTIMIZER_SLOT), BERT-style AdamWeightDecay
# (adam_m/adam_v), and step counters; Keras files' optimizer weights (read as
# optimizer/..., or under their HDF5 paths optimizer_weights/... and optimizer/vars/N).
_SLOT_SUFFIXES = (
    "Momentum", "Adam", "Adam_1", "RMSProp", "RMSProp_1", "Adagrad", "AdagradDA",
    "Ftrl", "Ftrl_1", "LAMB", "LAMB_1", "Adadelta", "Adadelta_1", "ProximalAdagrad",
    "adam_m", "adam_v", "AdamW", "AdamW_1", "Nadam", "Nadam_1", "Adamax", "Adamax_1",
)
_OPTIMIZER_PATTERNS = [
    re.compile(r"(^|/)(" + "|".join(re.escape(s) for s in _SLOT_SUFFIXES) + r")$"),
    re.compile(r"(^|/)beta[12]_power(_\d+)?$"),
    re.compile(r"^optimizer/"),
    re.compile(r"^optimizer_weights/"),
    re.compile(r"/\.OPTIMIZER_SLOT/"),
    re.compile(r"(^|/)global_step$"),
    re.compile(r"^save_counter/\.ATTRIBUTES/VARIABLE_VALUE$"),
    re.compile(r"^(global_step|step)/\.ATTRIBUTES/VARIABLE_VALUE$"),
]
# The running totals of compiled Keras metrics (a metric's total and count, a confusion
# matrix...): TF2 checkpoints and SavedModels keep them under keras_api/metrics/, Keras
# files under metrics/<metric>/<i>.  Not model weights, and not the optimizer's either.
_METRIC_PATTERNS = [
    re.compile(r"(^|/)keras_api/metrics/"),
    re.compile(r"^metrics/[^/]+/(vars/)?\d+$"),
]
OPTIMIZER_STATE = "optimizer state"
METRIC_STATE = "metric state"


def is_optimizer_state(name: str) -> bool:
    """True for optimizer slots, their accumulators and step counters."""
    return any(p.search(name) for p in _OPTIMIZER_PATTERNS)


def is_metric_state(name: str) -> bool:
    """True for the variables of compiled Keras metrics (their totals and counts)."""
    return any(p.search(name) for p in _METRIC_PATTERNS)


def training_state(name: str) -> str | None:
    """What a tensor that is not a model weight holds, by its name or checkpoint key:
    :data:`OPTIMIZER_STATE`, :data:`METRIC_STATE`, or None for a weight.  Weights-only leaves both out."""
    if is_metric_state(name):
        return METRIC_STATE
    if is_optimizer_state(name):
        return OPTIMIZER_STATE
    return None


def compile_patterns(patterns: Iterable[str], option: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise FormatError(f"{option} {p!r} is not a valid regular expression ({e})") from None
    return out


@dataclasses.dataclass
class Plan:
    """Which source tensor feeds which output name, and what was left out."""

    #: output name -> source name, in output order
    mapping: dict[str, str]
    #: source name -> why it was left out
    dropped: dict[str, str]
    #: output name -> the EMA source name that replaced it
    ema_swaps: dict[str, str]


def make_plan(
    names: Sequence[str],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    weights_only: bool = False,
    use_ema: bool = False,
    uncarried: Mapping[str, str] | None = None,
    where: str = "",
    state: Collection[str] | Mapping[str, str] = (),
) -> Plan:
    """Apply include/exclude, --weights-only and --use-ema to ``names``.

    ``uncarried`` (name -> dtype) are the source's tensors of a dtype ckptbridge
    cannot carry: they go through the same filters, so that leaving them out is
    reported like any other drop, and any the filters keep is refused by name
    (UncarriedDtypeError, naming ``where``): nothing is left out silently.
    ``state`` names more tensors that weights-only leaves out, whatever their names
    (the caller knows their checkpoint keys are optimizer or metric state): a mapping
    gives each one's :func:`training_state`, a plain collection means optimizer state.
    """
    from .._dtypes import uncarried_error

    inc = compile_patterns(include, option("include"))
    exc = compile_patterns(exclude, option("exclude"))
    opaque = dict(uncarried or {})
    if opaque:
        names = sorted([*names, *opaque], key=lambda n: n.encode("utf-8", "surrogateescape"))
    present = set(names)
    mapping: dict[str, str] = {}
    dropped: dict[str, str] = {}
    swaps: dict[str, str] = {}
    for name in names:
        if inc and not any(p.search(name) for p in inc):
            dropped[name] = "not matched by any include pattern"
            continue
        if any(p.search(name) for p in exc):
            dropped[name] = "matched by an exclude pattern"
            continue
        held = training_state(name) if weights_only else None
        if weights_only and held is None and name in state:
            held = (state.get(name) if isinstance(state, Mapping) else None) or OPTIMIZER_STATE
        if held is not None:
            dropped[name] = f"{held} (weights only)"
            continue
        if use_ema and name.endswith(EMA_SUFFIX) and name[: -len(EMA_SUFFIX)] in present:
            dropped[name] = f"its value replaces {name[: -len(EMA_SUFFIX)]} (EMA)"
            continue
        src = name
        if use_ema and name + EMA_SUFFIX in present:
            src = name + EMA_SUFFIX
            swaps[name] = src
        mapping[name] = src
    kept = {n: opaque[n] for n in mapping.values() if n in opaque}
    if kept:
        raise uncarried_error(where, kept)
    for name in dropped.keys() & opaque.keys():
        dropped[name] += f"; its dtype {opaque[name]} is not carried"
    return Plan(mapping, dropped, swaps)


@dataclasses.dataclass(frozen=True)
class RenameRule:
    """One ``--rename REGEX=REPLACEMENT`` rule: ``re.sub(pattern, replacement, name)``."""

    pattern: re.Pattern[str]
    replacement: str
    text: str

    def apply(self, name: str) -> str:
        try:
            return self.pattern.sub(self.replacement, name)
        except (re.error, IndexError) as e:
            raise FormatError(f"{option('rename')} rule {self.text!r}: the replacement cannot be applied to {name!r} ({e}); "
                              "check its group references") from None


def parse_rename(rule: str) -> RenameRule:
    """Parse ``REGEX=REPLACEMENT``, split at the LAST ``=``.

    So the regex may contain ``=`` (lookarounds such as ``(?<=x)``), the
    replacement may be empty but cannot contain ``=`` (use --rename-file for
    that).  Group references (``\\1``, ``\\g<name>``) work as in ``re.sub``.
    """
    regex, sep, repl = rule.rpartition("=")
    if not sep:
        raise FormatError(f"{option('rename')} rule {rule!r} has no '='; write it as REGEX=REPLACEMENT, e.g. '/weights$=.weight'")
    if not regex:
        raise FormatError(f"{option('rename')} rule {rule!r} has an empty regex before its last '='; write it as REGEX=REPLACEMENT")
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise FormatError(f"{option('rename')} rule {rule!r}: {regex!r} (before the last '=') is not a valid regular expression ({e})") from None
    return RenameRule(pattern, repl, rule)


def compile_rename(regex: str, replacement: str) -> RenameRule:
    """One rule given as a ``(regex, replacement)`` pair (the API's form: the replacement may hold ``=``)."""
    text = f"{regex}={replacement}"
    if not regex:
        raise FormatError(f"{option('rename')} rule {text!r} has an empty regex; give the pattern to replace")
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise FormatError(f"{option('rename')} rule {text!r}: {regex!r} is not a valid regular expression ({e})") from None
    return RenameRule(pattern, replacement, text)


def rename_map(
    names: Sequence[str],
    *,
    rules: Sequence[str | RenameRule] = (),
    exact: dict[str, str] | None = None,
    known: Iterable[str] | None = None,
) -> dict[str, str]:
    """old -> new for every name in ``names``: first ``exact`` (a --rename-file), then ``rules`` in order.

    Two names mapping to one, or a name renamed to "", is an error naming
    them.  ``exact`` keys that are not in ``known`` (all names of the source,
    filtered or not) are an error too: a typo would otherwise pass silently.
    """
    parsed = [r if isinstance(r, RenameRule) else parse_rename(r) for r in rules]
    exact = exact or {}
    universe = set(known) if known is not None else set(names)
    unknown = sorted(k for k in exact if k not in universe)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise FormatError(f"{option('rename_map')} names tensors that do not exist: {shown}; check the names (ckptbridge ls)")
    out: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in names:
        new = exact.get(name, name)
        for r in parsed:
            new = r.apply(new)
        if not new:
            raise FormatError(f"renaming {name!r} gives an empty name; check the {option('rename')} rules")
        if new in taken:
            raise FormatError(f"two tensors would be renamed to {new!r}: {taken[new]!r} and {name!r}; "
                              f"make the {option('rename')} rules tell them apart")
        taken[new] = name
        out[name] = new
    return out
