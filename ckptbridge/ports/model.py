"""The port map model: what a map (a TOML file, format 1; ``docs/porting.md``) says, as frozen dataclasses.

A map names the tf-slim net, the destination model, the rules that take each
slim tensor to one destination tensor (a name, an exact layout transform, the
class axis), the tensors the destination needs that the source lacks (filled
with a constant), and the architecture differences that no weight can fix.
Reading and checking a map is :mod:`.parse`; turning one, with a source, into
the view the pipe writes is :mod:`.plan`.

A leaf: it imports nothing from ckptbridge.
"""

from __future__ import annotations

import dataclasses

FORMAT = 1
TRANSFORMS = ("none", "conv", "depthwise", "dense", "fc_as_conv", "flatten")
CAVEAT_KINDS = ("padding", "pooling", "epsilon", "other")
_SHOWN = 12  # names shown per kind of problem


@dataclasses.dataclass(frozen=True)
class Caveat:
    """An architecture difference that weights cannot fix."""

    kind: str
    text: str
    fix: str | None = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """One slim tensor -> one destination tensor."""

    source: str
    dest: str
    transform: str = "none"
    classes: bool = False
    kernel: tuple[int, int] = (1, 1)


@dataclasses.dataclass(frozen=True)
class Added:
    """A destination tensor the source lacks, filled with ``fill``."""

    dest: str
    fill: float
    like: str | None = None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    #: on import: the destination's value must equal ``fill`` (else it cannot be carried); False: dropped, reported
    check: bool = True


@dataclasses.dataclass(frozen=True)
class PortMap:
    """One tf-slim net <-> one destination model."""

    name: str
    net: str
    destination: str
    description: str
    image_size: int
    source_classes: int
    dest_classes: int
    skip: tuple[str, ...]
    caveats: tuple[Caveat, ...]
    rules: tuple[Rule, ...]
    added: tuple[Added, ...]
    path: str

    def caveat_lines(self) -> list[str]:
        return [f"{c.kind}: {c.text}" + (f" (to match TensorFlow: {c.fix})" if c.fix else "") for c in self.caveats]
