"""What the verbs return: :class:`Report` (export, rebuild, save), :class:`DiffReport`
and :class:`VerifyReport`."""

from __future__ import annotations

import dataclasses

from .spec import TensorSpec

__all__ = ["Report", "DiffReport", "VerifyReport", "ArchiveEntry", "ArchiveReport"]


@dataclasses.dataclass
class Report:
    """What a conversion did: every name written, dropped or swapped."""

    output: str
    written: list[str]
    dropped: dict[str, str]
    ema_swaps: dict[str, str]
    nbytes: int
    #: graph variables the archive did not have (left at their initializer; rebuild only)
    missing: list[str] = dataclasses.field(default_factory=list)
    #: old name -> new name for every tensor renamed (--rename, --rename-file, --original-names)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)
    #: output name -> the layout change made to it, or why a kernel-like tensor was left alone (--layout)
    layout: dict[str, str] = dataclasses.field(default_factory=dict)
    #: True when nothing was written (--dry-run)
    dry_run: bool = False
    #: what became of a TF2 object graph that could not be carried as it was (rewritten, or left out and why)
    object_graph: str | None = None
    #: the port map used (export(port=...), rebuild(port=...)), or None
    port: str | None = None
    #: output name -> what it was filled with, for tensors the destination needs and the source lacks (ports)
    added: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the architecture differences the port map declares, which no weight can fix
    caveats: list[str] = dataclasses.field(default_factory=list)
    #: what finding the source decided that the user should know (a state file's path not followed)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: output name -> the crc32c of its bytes as written, which the read-back found in the output (empty without one)
    checksums: dict[str, int] = dataclasses.field(default_factory=dict)
    #: ``"crc32c:<8 hex digits>"`` of the output file's bytes, whole, where it came without an extra pass over
    #: them (an output at a URL: computed as it was read for the upload); None for a local output
    checksum: str | None = None
    #: bytes of the output file at a URL; None for a local output
    size: int | None = None
    #: the ETag the store gave the object at a URL, where it gives one
    etag: str | None = None


@dataclasses.dataclass
class DiffReport:
    """How two sets of tensors differ."""

    only_a: list[str]
    only_b: list[str]
    #: name -> (spec in a, spec in b) where shape or dtype differ
    spec_diffs: dict[str, tuple[TensorSpec, TensorSpec]]
    #: name -> (number of differing elements, max abs difference or None for strings/bools)
    value_diffs: dict[str, tuple[int, float | None]]
    compared: int
    #: tensors of a dtype ckptbridge does not carry whose stored bytes differ: name -> dtype
    raw_diffs: dict[str, str] = dataclasses.field(default_factory=dict)
    #: how many of ``compared`` were compared as stored bytes (dtypes not carried)
    compared_raw: int = 0
    #: how the TF2 object graphs differ for restore (objects, children, attributes and their keys,
    #: slot links; a graph on one side only), one sentence each
    graph_diffs: list[str] = dataclasses.field(default_factory=list)
    #: how many graph objects both sides have; None when neither side has an object graph
    graph_objects: int | None = None

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.spec_diffs or self.value_diffs or self.raw_diffs or self.graph_diffs)


@dataclasses.dataclass
class VerifyReport:
    """The outcome of checking every tensor's checksum."""

    path: str
    checked: int
    ok: bool
    bad: str | None = None
    message: str | None = None
    has_checksums: bool = True
    #: how many of ``checked`` are of a dtype not carried, checked as stored bytes
    checked_raw: int = 0




@dataclasses.dataclass
class ArchiveEntry:
    """One checkpoint of an ``archive`` run: what became of it."""

    #: the checkpoint (its path or URL, without credentials)
    source: str
    #: its output
    output: str
    #: "done" (archived now), "skipped" (its output is up to date), "failed", "incomplete" (still being written),
    #: or "todo" (a dry run)
    status: str
    #: why it failed or is incomplete
    error: str | None = None
    tensors: int = 0
    nbytes: int = 0
    #: its path below the destination (the manifest's key)
    rel: str = ""


@dataclasses.dataclass
class ArchiveReport:
    """What an ``archive`` run did, checkpoint by checkpoint."""

    #: where the manifest is
    manifest: str
    entries: list[ArchiveEntry] = dataclasses.field(default_factory=list)

    def _with(self, status: str) -> list[ArchiveEntry]:
        return [e for e in self.entries if e.status == status]

    @property
    def done(self) -> list[ArchiveEntry]:
        return self._with("done")

    @property
    def skipped(self) -> list[ArchiveEntry]:
        return self._with("skipped")

    @property
    def failed(self) -> list[ArchiveEntry]:
        return self._with("failed")

    @property
    def incomplete(self) -> list[ArchiveEntry]:
        return self._with("incomplete")

    @property
    def todo(self) -> list[ArchiveEntry]:
        """What a dry run would archive."""
        return self._with("todo")
