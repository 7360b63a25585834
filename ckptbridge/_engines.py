"""Checkpoint engines, one registry: what reads and writes TensorFlow checkpoints.

Each :class:`Engine` names its source and sink classes (``"module:Class"``,
imported on first use, so TensorFlow is imported only when its engine is picked),
the checkpoint versions it reads, and what archive metadata records of it.
``"auto"`` is not an engine but a rule: the first engine of :data:`ENGINES`, in
order, that reads the checkpoint's version (writing: the first one).  ``--engine``
takes its choices and help from here; ``_resolve`` opens through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._lazy import load_object
from .errors import FormatError
from .io import ckptfiles as _ckptfiles

if TYPE_CHECKING:
    from ._source import Sink, Source
    from .io.ranged import Place

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Engine:
    """One checkpoint engine's entry."""

    #: what ``engine=`` / ``--engine`` takes
    name: str
    #: what an archive's metadata records as the engine that read its checkpoint
    label: str
    #: one line for help texts and docs
    description: str
    #: checkpoint versions it reads: "v2" (``.index`` + ``.data-*``), "v1" (one table file)
    reads: tuple[str, ...]
    #: ``Source(prefix, place=None)`` (the native one also takes ``verify=``), for the first version of ``reads``
    source: str
    #: ``Sink(prefix, force=..., max_shard_bytes=..., update_state=...)``
    sink: str
    #: what it needs beyond ckptbridge ("TensorFlow"), for messages; None for nothing
    needs: str | None = None
    #: how to install what it needs
    install: str | None = None
    #: whether its source checks checksums itself as it reads (takes ``verify=``)
    verifies: bool = False
    #: version -> another source class, for versions ``source`` does not read ("v1": the native V1 reader)
    sources: tuple[tuple[str, str], ...] = ()

    def source_for(self, version: str) -> str:
        """The source class that reads ``version``."""
        return dict(self.sources).get(version, self.source)


#: name -> engine, in the order "auto" tries them
ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine("native", "native", "ckptbridge's own readers and writer, no TensorFlow needed (V2 and V1 checkpoints; writes V2)",
               ("v2", "v1"), "ckptbridge.bundle.reader:BundleReader", "ckptbridge.bundle.sink:NativeCheckpointSink", verifies=True,
               sources=(("v1", "ckptbridge.bundle.v1:V1Reader"),)),
        Engine("tf", "tensorflow", "TensorFlow's tf.train.load_checkpoint and SaveV2 (V1 and V2 checkpoints)", ("v2", "v1"),
               "ckptbridge.tf.engine:TfCheckpointSource", "ckptbridge.tf.engine:TfCheckpointSink",
               needs="TensorFlow", install="pip install 'ckptbridge[tf]'"),
    )
}


def choices() -> tuple[str, ...]:
    """Every value ``engine=`` accepts: "auto", then the engines."""
    return (AUTO, *ENGINES)


def help_text() -> str:
    """One line for ``--engine``: what each choice means."""
    order = ", then ".join(ENGINES)
    parts = [f"{e.name}: {e.description}" for e in ENGINES.values()]
    return f"checkpoint engine; {AUTO} (default): the first of {order} that reads the checkpoint; " + "; ".join(parts)


def check(engine: str) -> None:
    if engine not in choices():
        raise FormatError(f"unknown engine {engine!r}; choose one of {', '.join(choices())}")


def for_reading(engine: str, version: str) -> list[Engine]:
    """The engines to try, in order, for reading a checkpoint of ``version`` ("v1"/"v2"); empty if none can."""
    check(engine)
    if engine == AUTO:
        return [e for e in ENGINES.values() if version in e.reads]
    e = ENGINES[engine]
    return [e] if version in e.reads else []


def for_writing(engine: str) -> Engine:
    """The engine that writes a checkpoint for ``engine`` ("auto": the first)."""
    check(engine)
    return next(iter(ENGINES.values())) if engine == AUTO else ENGINES[engine]


def open_source(e: Engine, prefix: str, *, verify: bool = True, version: str | None = None, place: Place | None = None) -> Source:
    """``e``'s source for the checkpoint at ``prefix``; ``version`` defaults to what its files say
    (``_ckptfiles.version_of``: "v2" where ``prefix.index`` exists, else "v1").

    With ``place`` (a local directory, an archive, a remote prefix), ``prefix`` is the
    checkpoint's name inside it, ``version`` must be given, and the source owns the place."""
    if place is not None and version is None:
        raise ValueError("a checkpoint in a place needs its version")
    cls: Callable[..., Source] = load_object(e.source_for(version or _ckptfiles.version_of(prefix)))
    kw: dict[str, Any] = {} if place is None else {"place": place}
    if e.verifies:
        kw["verify"] = verify
    src = cls(prefix, **kw)
    src.engine = e.name  # carried, so nothing has to ask later which engine a source came from
    return src


def open_sink(e: Engine, prefix: str, **kw: Any) -> Sink:
    cls: Callable[..., Sink] = load_object(e.sink)
    return cls(prefix, **kw)
