"""The built-in source kinds of :mod:`ckptbridge.sources`: how each is recognised, and opened.

Checkpoints themselves are found by ``_resolve`` (a directory's latest, a prefix
from one of its files, a V1 file; the engine that reads it): each checkpoint kind
here recognises its case and opens it through the one resolution there, so its
messages are the same whichever kind took the input.  At a URL, ``_remote.open_place``
has already turned a directory into the checkpoint its state file names.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any

from .. import _resolve, formats
from .._lazy import load_object
from .._source import Source
from ..errors import CkptBridgeError, FormatError, NotFoundError, option
from ..io import ckptfiles as _ckptfiles
from ..io import containers as _containers
from ..io.ranged import LocalFile, where
from ..io.remote import redact
from . import KINDS, Input, _readable, _savedmodel

# --------------------------------------------------------------------------- an archive of checkpoints


def recognise_checkpoint_archive(inp: Input) -> bool | None:
    if _containers.container_kind(inp.base) is None or (not inp.remote and os.path.isdir(inp.path)):
        return None
    return True


def open_checkpoint_archive(inp: Input, found: Any) -> Source:
    """The one checkpoint in a tar or zip (``member`` chooses among several), read in place where it can be."""
    if inp.place is None:
        if not os.path.exists(inp.path):
            raise NotFoundError(f"no such file: {inp.path}; check the path")
        _resolve._require_regular(inp.path, "archive")
        archive = _containers.open_container(LocalFile(inp.path), member=inp.member, scratch_dir=inp.scratch_dir)
    else:
        archive = _containers.open_container(inp.place.open(inp.name), member=inp.member, scratch_dir=inp.scratch_dir)
        archive.owner = inp.place
    try:
        prefix, version = _resolve._checkpoint_in_place(archive, "", inp.member, inp.member_key)
        e = _resolve._engine_for(inp.engine, where(archive, prefix), version)
    except BaseException:
        archive.close()
        raise
    # the source owns the archive from here, and closes it on failure
    return _resolve._checkpoint_names(_resolve._open_with(e, prefix, version, verify=inp.verify, place=archive), inp.names, None)


# --------------------------------------------------------------------------- files read as they are: Keras's, our archives


def _refuse_at_url(inp: Input) -> None:
    raise FormatError(f"{redact(inp.path)} is an archive ({os.path.splitext(inp.name)[1]}); ckptbridge reads checkpoints and "
                      f"archives of checkpoints ({', '.join(_containers.CONTAINERS)}) from URLs; download it first")


def _open_file(inp: Input, opener: Callable[..., Source]) -> Source:
    path = inp.path
    if not os.path.exists(path):
        raise NotFoundError(f"no such file: {path}; check the path")
    if os.path.isdir(path):
        raise FormatError(f"{path} is a directory, not an archive file; name the archive file")
    _resolve._require_regular(path, "archive")
    if inp.names != _readable.AUTO:
        raise FormatError(f"{option('names', inp.names)} applies to TensorFlow checkpoints and SavedModels; {path} is an archive, "
                          "whose names are the ones it was written with")
    if not os.access(path, os.R_OK):
        raise CkptBridgeError(f"permission denied: cannot read {path}; check its permissions")
    return opener(path, verify=inp.verify, max_tensor_bytes=inp.max_tensor_bytes)


def recognise_keras(inp: Input) -> bool | None:
    """A Keras file, by its suffix or its content (``formats.keras.detect``: headers only)."""
    named = os.path.splitext(inp.base)[1].lower() in KINDS["keras"].suffixes
    if inp.remote:
        if named:
            _refuse_at_url(inp)
        return None
    if not os.path.isfile(inp.path):
        return None
    return True if named or load_object("ckptbridge.formats.keras:detect")(inp.path) is not None else None


def open_keras(inp: Input, found: Any) -> Source:
    src = _open_file(inp, load_object("ckptbridge.formats.keras:KerasSource"))
    src.label = src.kind  # which Keras file it read: "keras2-model", "keras3-weights"...
    return src


def recognise_archive(inp: Input) -> formats.Format | None:
    fmt = formats.for_path(inp.base)
    if fmt is not None and inp.remote:
        _refuse_at_url(inp)
    return fmt


def open_archive(inp: Input, fmt: formats.Format) -> Source:
    src = _open_file(inp, fmt.open_source)
    src.label = fmt.name
    return src


# --------------------------------------------------------------------------- checkpoints


def recognise_saved_model(inp: Input) -> _savedmodel.SavedModelDir | None:
    return None if inp.remote else _savedmodel.find(inp.path)  # one without its variables is refused


def open_saved_model(inp: Input, saved_model: _savedmodel.SavedModelDir) -> Source:
    return _open_local(inp, saved_model.prefix, saved_model)


def recognise_directory(inp: Input) -> bool | None:
    return True if not inp.remote and os.path.isdir(inp.path) else None


def open_directory(inp: Input, found: Any) -> Source:
    return _open_local(inp, inp.path)


def recognise_checkpoint(inp: Input) -> Any:
    """A V2 prefix or one of its files; locally also a prefix with some files but no index (resolving it says what is missing)."""
    if inp.place is not None:
        prefix, version = _resolve._checkpoint_in_place(inp.place, inp.name, None)
        return (prefix, version) if version == "v2" else None
    path = inp.path
    if os.path.lexists(_ckptfiles.index_path(_ckptfiles.prefix_of(path))):
        return True
    if not os.path.exists(path) and not _ckptfiles.v1_shards(path) and glob.glob(glob.escape(path) + ".*"):
        return True
    return None


def recognise_v1(inp: Input) -> Any:
    """A V1 file (any file left: its reader says what is wrong with one that is not) or a V1 checkpoint's shards."""
    if inp.place is not None:
        return (inp.name, "v1")
    path = inp.path
    return True if (os.path.exists(path) and not os.path.isdir(path)) or _ckptfiles.v1_shards(path) else None


def open_checkpoint(inp: Input, found: Any) -> Source:
    if inp.place is None:
        return _open_local(inp, inp.path)
    prefix, version = found  # at a URL's directory, whose place the source then owns
    e = _resolve._engine_for(inp.engine, where(inp.place, prefix), version)
    return _resolve._checkpoint_names(_resolve._open_with(e, prefix, version, verify=inp.verify, place=inp.place), inp.names, None)


open_v1 = open_checkpoint


def _open_local(inp: Input, path: str, saved_model: _savedmodel.SavedModelDir | None = None) -> Source:
    prefix, version, note = _resolve.resolve_checkpoint(path)
    src = _resolve._open_with(_resolve._engine_for(inp.engine, prefix, version), prefix, version, verify=inp.verify)
    if note is not None:
        src.notes = (*src.notes, note)
    return _resolve._checkpoint_names(src, inp.names, saved_model)
