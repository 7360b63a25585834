"""The verbs' options, grouped by subject as small frozen values.

Reading (:class:`ReadOptions`, what :func:`ckptbridge.read` takes), choosing
(:class:`Select`), renaming (:class:`Rename`), a layout change on export
(:class:`Layout`), all three together (:class:`Naming`), a port map
(:class:`Port`, in the place of a :class:`Naming`), a graph to import
through (:class:`Graph`: a tf-slim net, or a MetaGraphDef) and where
``archive`` runs (:class:`Workers`).  An option that does not apply to a verb
has no place to be passed there.  The standard library only: importing these is cheap.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .errors import FormatError, option

if TYPE_CHECKING:
    from .ports.model import PortMap

#: what one archive tensor may claim before it is refused as a likely memory bomb (64 GiB)
DEFAULT_MAX_TENSOR_BYTES = 64 << 30


def _patterns(value: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise FormatError(f"{what} is a sequence of regular expressions (strings), got {value!r}; wrap one pattern in a list")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How a source is read: what :func:`ckptbridge.read` takes, and the ``read=`` of the other verbs.

    ``engine``: ``"auto"``, ``"native"`` (no TensorFlow) or ``"tf"``; ``verify``: check each
    tensor's checksum as it is read; ``max_tensor_bytes``: an archive tensor claiming more
    is refused when the archive is opened (None: no limit); ``names``: a checkpoint's names
    (``"auto"``, ``"readable"`` or ``"keys"``); ``member``: the checkpoint inside an archive
    of checkpoints that holds several.
    """

    engine: str = "auto"
    verify: bool = True
    max_tensor_bytes: int | None = DEFAULT_MAX_TENSOR_BYTES
    names: str = "auto"
    member: str | None = None


@dataclasses.dataclass(frozen=True)
class Select:
    """Which tensors go through: ``include``/``exclude`` are regular expressions (``re.search``);
    ``weights_only`` drops optimizer and metric state (slots, step counters); ``use_ema`` gives
    each variable the value of its ``ExponentialMovingAverage`` where the source has one."""

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    weights_only: bool = False
    use_ema: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _patterns(self.include, "Select.include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "Select.exclude"))


@dataclasses.dataclass(frozen=True)
class Rename:
    """How names change after the :class:`Select`\\ion: first ``exact`` (old -> new), then ``rules``
    in order, each a ``(regex, replacement)`` pair applied with ``re.sub`` (group references work).

    ``original_names`` (an import only) first restores every name an archive recorded at
    export, undoing its renames too.
    """

    rules: Sequence[tuple[str, str]] = ()
    exact: Mapping[str, str] | None = None
    original_names: bool = False

    def __post_init__(self) -> None:
        rules = self.rules
        if isinstance(rules, (str, tuple)) and len(rules) == 2 and all(isinstance(x, str) for x in rules):
            raise FormatError(f"Rename.rules is a sequence of (regex, replacement) pairs, got one pair {rules!r}; wrap it in a list")
        if not all(isinstance(r, tuple) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in rules):
            raise FormatError(f"Rename.rules is a sequence of (regex, replacement) pairs of strings, got {rules!r}")
        object.__setattr__(self, "rules", tuple(rules))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A kernel layout change on export: ``to="torch"`` stores conv, depthwise and dense kernels
    in PyTorch's layout (an import undoes it by itself).  ``model`` (a tf-slim net name or
    ``package.module:function``, with its ``num_classes``) tells those kernels apart from its
    graph (TensorFlow needed); without it names and ranks decide."""

    to: str = "torch"
    model: str | None = None
    num_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class Naming:
    """The names an export or an import writes: a selection, renames, and (export only) a layout change."""

    select: Select = Select()
    rename: Rename = Rename()
    layout: Layout | None = None


@dataclasses.dataclass(frozen=True)
class Port:
    """A port map, in the place of a :class:`Naming`: a built-in map's name (``"torchvision:vgg16"``),
    a map file, or a :class:`PortMap`.  It decides every name, layout and class.

    ``num_classes`` (an import only) is the slim net's class count where it differs from the
    destination's: one class more gets TensorFlow's background class back as a row of zeros
    (by default the map's, or the :class:`Graph`'s).
    """

    map: str | PortMap
    num_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class Graph:
    """A graph to import through (TensorFlow needed): a tf-slim net built afresh, or a
    MetaGraphDef you already have.  Its variables are matched by name, shape and dtype,
    and the checkpoint is written beside the graph's ``.meta``.

    ``model``: a tf-slim net name (``vgg_16``) or ``package.module:function``; ``num_classes``:
    its logits' classes (default: the archive's logits width, else the net's own);
    ``image_size``: the input size it is built for.  Or ``meta``: a ``.meta`` file (a training
    job's, or what ``export_meta_graph`` wrote), imported as it is: the checkpoint holds what
    its own Saver saves, and the written ``.meta`` is that graph.  ``allow_missing``: leave
    variables the source lacks at their initializers (listed in the report); ``strict``: source
    tensors the graph lacks are an error; ``chunk_bytes``: with ``engine="tf"``, feed variables
    larger than this in row slices (default 64 MiB).
    """

    model: str | None = None
    num_classes: int | None = None
    image_size: int | None = None
    allow_missing: bool = False
    strict: bool = False
    chunk_bytes: int | None = None
    meta: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.meta is None):
            raise FormatError(f"a Graph is built from {option('model')} or imported from {option('meta')}; give one of them"
                              + (", not both" if self.model is not None else ""))
        if self.meta is not None:
            object.__setattr__(self, "meta", os.fspath(self.meta))
            given = [option(k) for k, v in (("num_classes", self.num_classes), ("image_size", self.image_size)) if v is not None]
            if given:
                raise FormatError(f"{' and '.join(given)} size a net that is built; the graph in {self.meta} is built already: "
                                  "leave them out")


@dataclasses.dataclass(frozen=True)
class Workers:
    """Where ``archive`` runs its exports: ``jobs`` local processes (None: one per core; 1: in this
    process), or with ``scheduler`` (``"tcp://host:8786"``) on that Dask cluster, one task per checkpoint.
    Tasks on a cluster read and write by their paths there: give URLs, unless every worker sees the same disk."""

    jobs: int | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.jobs is not None and (not isinstance(self.jobs, int) or self.jobs < 1):
            raise FormatError(f"Workers.jobs is a positive number of processes, got {self.jobs!r}")
        if self.jobs is not None and self.scheduler is not None:
            raise FormatError("Workers takes jobs (local processes) or scheduler (a Dask cluster), not both")
