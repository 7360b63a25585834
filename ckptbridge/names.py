"""Name policies: which tensors go through, and under which name.

A :class:`Plan` maps source names to output names and records every name it
drops or swaps and why, so that nothing disappears silently.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from .errors import FormatError

EMA_SUFFIX = "/ExponentialMovingAverage"

# Optimizer state written by tf.compat.v1 optimizers (slot suffixes), TF2 Keras
# optimizers (under optimizer/ or .OPTIMIZER_SLOT), BERT-style AdamWeightDecay
# (adam_m/adam_v), and step counters.
_SLOT_SUFFIXES = (
    "Momentum", "Adam", "Adam_1", "RMSProp", "RMSProp_1", "Adagrad", "AdagradDA",
    "Ftrl", "Ftrl_1", "LAMB", "LAMB_1", "Adadelta", "Adadelta_1", "ProximalAdagrad",
    "adam_m", "adam_v", "AdamW", "AdamW_1", "Nadam", "Nadam_1", "Adamax", "Adamax_1",
)
_OPTIMIZER_PATTERNS = [
    re.compile(r"(^|/)(" + "|".join(re.escape(s) for s in _SLOT_SUFFIXES) + r")$"),
    re.compile(r"(^|/)beta[12]_power(_\d+)?$"),
    re.compile(r"^optimizer/"),
    re.compile(r"/\.OPTIMIZER_SLOT/"),
    re.compile(r"(^|/)global_step$"),
    re.compile(r"^save_counter/\.ATTRIBUTES/VARIABLE_VALUE$"),
    re.compile(r"^(global_step|step)/\.ATTRIBUTES/VARIABLE_VALUE$"),
]


def is_optimizer_state(name: str) -> bool:
    """True for optimizer slots, their accumulators and step counters."""
    return any(p.search(name) for p in _OPTIMIZER_PATTERNS)


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
) -> Plan:
    """Apply include/exclude, --weights-only and --use-ema to ``names``."""
    inc = compile_patterns(include, "--include")
    exc = compile_patterns(exclude, "--exclude")
    present = set(names)
    mapping: dict[str, str] = {}
    dropped: dict[str, str] = {}
    swaps: dict[str, str] = {}
    for name in names:
        if inc and not any(p.search(name) for p in inc):
            dropped[name] = "not matched by --include"
            continue
        if any(p.search(name) for p in exc):
            dropped[name] = "matched by --exclude"
            continue
        if weights_only and is_optimizer_state(name):
            dropped[name] = "optimizer state (--weights-only)"
            continue
        if use_ema and name.endswith(EMA_SUFFIX) and name[: -len(EMA_SUFFIX)] in present:
            dropped[name] = f"its value replaces {name[: -len(EMA_SUFFIX)]} (--use-ema)"
            continue
        src = name
        if use_ema and name + EMA_SUFFIX in present:
            src = name + EMA_SUFFIX
            swaps[name] = src
        mapping[name] = src
    return Plan(mapping, dropped, swaps)
