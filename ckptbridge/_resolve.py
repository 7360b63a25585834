"""From a path or URL the user typed to a source or sink, through the registries.

Where the bytes are comes first: a URL (``_remote``) resolves to a place and the
name in it.  What they are is the source-kind registry's (``ckptbridge.sources``):
the first kind that recognises the input opens it, and is carried on the source.
Archives are chosen by suffix from the format registry (``formats``), and an
unknown output suffix is an error that lists the registry's suffixes.  A
checkpoint is resolved here to its prefix (a directory's latest complete
checkpoint, ``.index``/``.data``/``.meta`` files, or a V1 single file) and opened
by an engine of the engine registry (``_engines``), which the checkpoint kinds
(``sources._kinds``) share; a SavedModel or TF1 Hub module directory is read
through its ``variables/variables`` checkpoint, under readable names
(``_savedmodel``, ``_readable``: :func:`_checkpoint_names`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import stat
from typing import Any

from . import _engines, formats, sources
from ._source import Sink, Source
from .bundle._table import FOOTER_SIZE as _FOOTER
from .bundle._table import has_magic
from .errors import FormatError, MissingDependencyError, NotFoundError, option
from .io import ckptfiles as _ckptfiles
from .io import containers as _containers
from .io import state as _state
from .io.ranged import Place, where
from .io.remote import is_url
from .sources import _readable, _savedmodel


def archive_kind(path: str) -> str | None:
    """The registered archive format's name for a path's suffix; None for anything else."""
    fmt = formats.for_path(path)
    return None if fmt is None else fmt.name


def require_archive_format(path: str) -> formats.Format:
    """The archive format for a path's suffix, or FormatError listing the registry's suffixes."""
    return formats.require_for_path(path)


def _state_prefix(directory: str) -> tuple[str | None, str | None]:
    """(the prefix the directory's state file names, inside the directory, or None; the path it
    names where that was outside the directory, else None)."""
    state = _state.read_state(directory)  # a malformed or non-regular state file is an error, never a guess
    if state is None or not state.model_checkpoint_path:
        return None, None
    named = state.model_checkpoint_path
    prefix, elsewhere = _state.confined(directory, named)
    return prefix, named if elsewhere else None


def _require_regular(path: str, what: str) -> None:
    """Refuse anything but a regular file before it is opened (a FIFO would block the open forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's own check or open reports it
    if not stat.S_ISREG(mode):
        kind = _state.describe_mode(mode)
        raise FormatError(f"{what} {path} is {kind}, not a regular file; ckptbridge reads only regular files, copy it to one first")


def latest_in_directory(directory: str) -> tuple[str, str | None]:
    """The latest complete checkpoint in a directory, and a note for the user or None.

    The ``checkpoint`` state file is trusted only when the prefix it names is
    whole (a training job may be writing the next one); otherwise the newest
    complete prefix by modification time wins.  A path the state file names
    outside the directory is never followed (``_state.confined``): its base
    name is looked for in the directory, and the note says so.
    """
    named, foreign = _state_prefix(directory)
    prefix = _newest_in(directory, named)
    if prefix is None:
        refusal = _not_a_checkpoint(directory)
        if refusal is not None:
            raise FormatError(refusal)
        from .io.atomic import previous_kept_in

        kept = previous_kept_in(directory)
        if kept:
            raise NotFoundError(f"no complete checkpoint in directory {directory}: a forced replace was killed midway, and the previous "
                                f"checkpoint is whole in {os.path.dirname(kept[-1])}; move its files back into {directory}")
        if foreign is not None:
            raise NotFoundError(f"no checkpoint found in directory {directory}: its 'checkpoint' file names {foreign!r}, outside the directory, "
                                f"which ckptbridge does not follow, and {_shown_prefix(named or directory)} is not in it; "
                                "pass the checkpoint prefix instead")
        raise NotFoundError(f"no checkpoint found in directory {directory} (no 'checkpoint' file and no *.index); pass the checkpoint prefix instead")
    note = None
    if foreign is not None:
        instead = (f"read {_shown_prefix(prefix)} from the directory instead" if prefix == named else
                   f"{_shown_prefix(named or directory)} is not in it either, so read its latest complete checkpoint, {_shown_prefix(prefix)}")
        note = (f"the 'checkpoint' file in {directory} names {foreign!r}, outside the directory, which ckptbridge does not follow; "
                + instead)
    return prefix, note


def _shown_prefix(prefix: str) -> str:
    """A prefix as messages show it; one with an empty base name (``dir/``) is said to be one."""
    return prefix if os.path.basename(prefix) else f"{prefix} (a prefix with an empty base name, as Saver.save(sess, {prefix!r}) writes)"


def _newest_in(directory: str, named: str | None) -> str | None:
    """The state file's prefix where it is whole, else the newest complete V2 prefix, else the newest V1 file; None if none."""
    if named and (_ckptfiles.complete_v2(named) or os.path.isfile(named)):
        return named
    sharded = _ckptfiles.v1_pattern_prefix(named) if named else None
    if sharded is not None and _ckptfiles.v1_shards(sharded):
        return sharded  # a sharded V1 checkpoint, named by its shards' pattern (model.ckpt-?????-of-00003)
    candidates = []
    indexes = glob.glob(os.path.join(glob.escape(directory), "*" + _ckptfiles.INDEX))
    empty = _ckptfiles.index_path(os.path.join(directory, ""))  # Saver.save(sess, "dir/") writes dir/.index, which * skips
    for index in [*indexes, *([empty] if os.path.isfile(empty) else [])]:
        prefix = index[: -len(_ckptfiles.INDEX)]
        if _ckptfiles.complete_v2(prefix):
            candidates.append((os.path.getmtime(index), prefix))
    if candidates:
        return max(candidates)[1]
    for pattern in ("*.ckpt", "*.ckpt-*"):
        matched = glob.glob(os.path.join(glob.escape(directory), pattern))
        files = [p for p in matched if os.path.isfile(p) and os.path.splitext(p)[1] not in (_ckptfiles.META, _ckptfiles.INDEX)]
        if files:
            return max(files, key=os.path.getmtime)
    return None


# A SavedModel directory: its graph (one of the first two), files beside it, its weights a checkpoint at variables/variables.
_SAVED_MODEL_GRAPHS = ("saved_model.pb", "saved_model.pbtxt")
_SAVED_MODEL_FILES = (*_SAVED_MODEL_GRAPHS, "keras_metadata.pb", "fingerprint.pb")


def _not_a_checkpoint(path: str) -> str | None:
    """What to say when ``path``, given where a checkpoint was expected, is a SavedModel (its
    directory or one of its files) or another TensorFlow graph file; None otherwise."""
    is_dir = os.path.isdir(path)
    if is_dir or os.path.basename(path) in _SAVED_MODEL_FILES:
        directory = path if is_dir else os.path.dirname(path)
        if not any(os.path.isfile(os.path.join(directory, n)) for n in _SAVED_MODEL_GRAPHS):
            return None
        if is_dir:
            _savedmodel.find(path)  # one without weights says so
            return f"{path} is a SavedModel directory, not a checkpoint prefix; open it as a source, which reads its variables/"
        return f"{path} is a SavedModel's {os.path.basename(path)}, not a checkpoint; pass the SavedModel's directory {directory or '.'}"
    if os.path.isfile(path) and os.path.splitext(path)[1].lower() in (".pb", ".pbtxt"):
        return (f"{path} is a TensorFlow graph (a protocol buffer), not a checkpoint: a frozen graph holds its weights as constants, which "
                "ckptbridge does not read; pass the checkpoint it was made from")
    return None


def resolve_checkpoint(path: str) -> tuple[str, str, str | None]:
    """(prefix, version, note) for a checkpoint path: version is "v2" or "v1"; the note, for the
    user, says where a directory's state file was not followed (None: nothing to say)."""
    refusal = None if os.path.isdir(path) else _not_a_checkpoint(path)
    if refusal is not None:
        raise FormatError(refusal)
    note = None
    if os.path.isdir(path):
        path, note = latest_in_directory(path)
    path = _ckptfiles.prefix_of(path)
    if os.path.lexists(_ckptfiles.index_path(path)):
        _require_regular(_ckptfiles.index_path(path), "checkpoint index")
    if os.path.isfile(_ckptfiles.index_path(path)):
        for shard in _ckptfiles.data_shards(path):
            _require_regular(shard, "checkpoint data file")
        return path, "v2", note
    if os.path.exists(path) and not os.path.isdir(path):
        _require_regular(path, "checkpoint file")
        return path, "v1", note
    shards = _ckptfiles.v1_shards(path)
    if shards:
        for shard in shards:
            _require_regular(shard, "checkpoint file")
        return path, "v1", note  # a sharded V1 checkpoint
    from .io.atomic import previous_kept

    kept = previous_kept(path)
    if kept is not None:
        raise NotFoundError(f"no checkpoint at {path}: a forced replace of it was killed midway, and the previous checkpoint "
                            f"is whole in {os.path.dirname(kept)}; move its files back into {os.path.dirname(os.path.abspath(path))}")
    raise NotFoundError(f"no checkpoint at {path} (looked for {os.path.basename(_ckptfiles.index_path(path))} and a V1 file); check the path")


# --- where the bytes are: a URL -> (Place, name inside it); what they are: the source kinds --------


def _remote_place(url: str, progress: bool | None) -> tuple[Place, str]:
    from .io.remote import open_place  # the standard library only; fsspec is imported by open_place

    return open_place(url, progress=progress)


def _is_table(place: Place, relpath: str) -> bool:
    """Whether a file of ``place`` ends with the table magic number (a V1 checkpoint or an index)."""
    with place.open(relpath) as f:
        return f.size >= _FOOTER and has_magic(f.pread(f.size - 8, 8))


def _checkpoint_in_place(place: Place, name: str, member: str | None, member_key: str = "member") -> tuple[str, str]:
    """(prefix, version) of the checkpoint ``name`` names in ``place``; with ``name`` empty, the one
    checkpoint the place holds (``member`` chooses among several)."""
    if name:
        prefix = _ckptfiles.strip_file_suffix(name)
        if place.exists(_ckptfiles.index_path(prefix)):
            return prefix, "v2"
        return name, "v1"
    names = list(_containers.names_in(place))
    found = _ckptfiles.checkpoints_among(names, lambda n: _is_table(place, n))
    if member is not None:
        want = _ckptfiles.strip_file_suffix(member.strip("/"))
        chosen = [c for c in found if c[0] == want]
        if not chosen:
            listed = ", ".join(p for p, _ in found) or "none"
            raise NotFoundError(f"{place.name} holds no checkpoint {member!r}; the checkpoints in it: {listed}")
        return chosen[0]
    if not found:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise NotFoundError(f"no checkpoint in {place.name} (no V2 .index with its data, no V1 file); it holds: {shown or 'nothing'}")
    if len(found) > 1:
        raise FormatError(f"{place.name} holds {len(found)} checkpoints: {', '.join(p for p, _ in found)}; "
                          f"choose one with {option(member_key)}")
    return found[0]


def _engine_for(engine: str, prefix: str, version: str) -> _engines.Engine:
    chosen = _engines.for_reading(engine, version)
    if not chosen:
        able = _engines.for_reading(_engines.AUTO, version)
        need = f" (needs {able[0].install})" if able and able[0].install else ""
        raise FormatError(f"{prefix} is a {version.upper()} checkpoint, which the {engine} engine does not read; "
                          f"use {' or '.join(option('engine', e.name) for e in able)}{need}")
    return chosen[0]


def _open_with(e: _engines.Engine, prefix: str, version: str, *, verify: bool, place: Place | None = None) -> Source:
    try:
        src = _engines.open_source(e, prefix, verify=verify, version=version, place=place)
        src.label = e.label
        return src
    except MissingDependencyError as err:
        if e.needs is None:
            raise
        only = _engines.for_reading(_engines.AUTO, version) == [e]
        what = f"a {version.upper()} checkpoint" if only else f"this checkpoint with {option('engine', e.name)}"
        shown = prefix if place is None else where(place, prefix)
        raise MissingDependencyError(f"reading {what} ({shown}) needs {e.needs}; install it with: {e.install}") from err


def open_source(path: str, *, engine: str = "auto", verify: bool = True, max_tensor_bytes: int | None = None,
                member: str | None = None, scratch_dir: str | None = None, member_key: str = "member",
                names: str = _readable.AUTO, progress: bool | None = False) -> Source:
    """A lazy source for what ``path`` is, by the first source kind (``ckptbridge.sources``) that
    recognises it: a checkpoint, a SavedModel or Hub module directory, an archive, a Keras file, an
    archive of checkpoints (``member``: which checkpoint inside, where it holds several); a local
    path or a URL, which first resolves to a place and the name in it.

    What must be unpacked (a compressed archive's members) goes to temporary space
    in ``scratch_dir`` (None: the system temp), removed when the source closes.
    ``member_key``: the option messages name for ``member`` (``diff`` has two).
    ``names`` picks a checkpoint's names (``_readable``); ``progress``: a bar of the bytes
    fetched from a URL (None: when stderr is a terminal)."""
    _engines.check(engine)
    _readable.check(names)
    if path.startswith("file://"):
        path = path[len("file://"):]
    inp = sources.Input(path, engine=engine, verify=verify, max_tensor_bytes=max_tensor_bytes, names=names, member=member,
                        member_key=member_key, scratch_dir=scratch_dir, progress=progress)
    if not is_url(path):
        return _open_input(inp)
    place, name = _remote_place(path, progress)
    try:
        return _open_input(dataclasses.replace(inp, place=place, name=name))
    except BaseException:
        place.close()  # a source opened there owned it and closed it already: closing twice is safe
        raise


def _open_input(inp: sources.Input) -> Source:
    found = sources.recognise(inp)
    if found is not None:
        kind, what = found
        return kind.open_source(inp, what)
    if inp.member is not None:
        shown = inp.path if inp.place is None else inp.place.name
        raise FormatError(f"{option(inp.member_key)} chooses a checkpoint inside an archive ({', '.join(_containers.CONTAINERS)}); "
                          f"{shown} is not one")
    raise NotFoundError(f"no such file or checkpoint: {inp.shown}; check the path")


def _checkpoint_names(src: Source, names: str, saved_model: _savedmodel.SavedModelDir | None) -> Source:
    """The opened checkpoint under the names asked for; closed again if naming fails."""
    try:
        return _readable.named(src, names, saved_model)
    except BaseException:
        src.close()
        raise


def source_label(source: Source) -> str:
    """What archive metadata records as the engine that read ``source``: what opened it set it (the
    checkpoint engine's label "native", "tensorflow"; the archive format's name; a Keras file's kind
    "keras2-model"), else the source's kind."""
    return source.label or source.kind


def open_archive_sink(path: str, *, fmt: formats.Format | None = None, compress: bool = False, force: bool = False,
                      source: str | None = None, scratch_dir: str | None = None, progress: bool | None = False) -> Sink:
    """A sink for ``fmt``, the archive format the caller resolved ``path`` to already (by default the
    registry's format for its suffix).  At a URL, the format's sink writes into ``scratch_dir`` (None: the
    system temp) and the verified file is uploaded (``formats._url``; ``progress``: a bar of the upload)."""
    fmt = fmt or formats.require_for_path(path)
    if is_url(path):
        from .formats._url import UrlSink

        return UrlSink(path, fmt, compress=compress, force=force, source=source, scratch_dir=scratch_dir, progress=progress)
    return fmt.open_sink(path, compress=compress, force=force, source=source)


def open_checkpoint_sink(prefix: str, *, engine: str = "auto", force: bool = False, max_shard_bytes: int | None = None, **kw: Any) -> Sink:
    """A graph-free checkpoint writer: the engine asked for ("auto": the first of the registry, native)."""
    e = _engines.for_writing(engine)
    if formats.for_path(prefix) is not None:
        raise FormatError(f"output {prefix} looks like an archive; import writes a checkpoint prefix such as out/model.ckpt")
    known = sources.named_by_suffix(prefix)
    if known is not None:
        raise FormatError(f"output {prefix} is named as a {os.path.splitext(prefix)[1]} file, which ckptbridge reads but does not write; "
                          "import writes a checkpoint prefix such as out/model.ckpt")
    return _engines.open_sink(e, prefix, force=force, max_shard_bytes=max_shard_bytes, **kw)
