"""Every checkpoint under a directory, a glob or a URL prefix: what ``archive`` converts.

A directory is walked; each directory of it is asked of the source-kind registry
(:mod:`ckptbridge.sources`) first, so a SavedModel is one checkpoint whatever it
holds.  Elsewhere the files of one directory are grouped into checkpoints by name
(:func:`ckptbridge.io.ckptfiles.checkpoints_among`: a V2 index with its data, a V1
table).  A checkpoint still being written is found too, and said to be incomplete:
an index whose data shards are not all there, data shards without their index, a
TensorFlow save's ``_temp`` directory.

Each checkpoint found carries its identity: every file's size and mtime (locally)
or ETag (at a URL), which the archive's manifest compares on the next run.  At a
URL a prefix is listed once, recursively (``fs.find``), and only files whose name
cannot say what they are are read (the last 8 bytes of a V1 candidate).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import CkptBridgeError, FormatError, NotFoundError
from ..io import ckptfiles as _ckptfiles
from ..io.atomic import TMP_SUFFIX
from ..io.manifest import object_tag

#: a file's identity: its size, and its mtime in nanoseconds (local) or its ETag (at a URL)
Identity = tuple[int, str]

#: a directory a TensorFlow save writes its shards into before merging them (``model.ckpt-5_temp/``, ``..._temp_<uuid>``)
_TF_TEMP = re.compile(r"_temp(_[0-9a-f]{32})?(/part-\d+)?$")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclasses.dataclass(frozen=True)
class Found:
    """One checkpoint found: where it is, where its output goes, and what it is made of."""

    #: what ``export`` opens: a local prefix, V1 file or SavedModel directory, or a URL
    source: str
    #: its path below the destination, without the format's suffix ("/"-separated)
    rel: str
    #: each of its files (relative to the checkpoint's directory) -> its identity
    files: dict[str, Identity]
    #: why it cannot be converted yet (still being written), or None
    incomplete: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(size for size, _ in self.files.values())


def is_pattern(path: str) -> bool:
    return _GLOB_CHARS.search(path) is not None


def discover(source: str, *, skip: Callable[[str], bool] = lambda p: False) -> list[Found]:
    """Every checkpoint ``source`` names or holds, complete or not, sorted by :attr:`Found.rel`.

    ``source``: a checkpoint (prefix, one of its files, a V1 file, a SavedModel), a directory
    (walked), a glob, or a URL (a checkpoint or a prefix, listed recursively).  ``skip(path)``
    prunes a local directory from the walk (the destination, when it lies inside a source).
    """
    from ..io.remote import is_url

    found = _remote(source) if is_url(source) else _local(source, skip)
    return sorted(found, key=lambda f: f.rel)


# --------------------------------------------------------------------------- grouping one directory's files


def _group(names: dict[str, Identity], is_table: Callable[[str], bool]) -> Iterator[tuple[str, list[str], str | None]]:
    """(prefix, its files, why incomplete or None) for each checkpoint among one directory's files."""
    listed = [n for n in names if TMP_SUFFIX not in n and not n.startswith(".")]
    taken: set[str] = set()
    for prefix, version in _ckptfiles.checkpoints_among(listed, is_table):
        if version == "v1":
            files = [n for n in listed if n == prefix or _ckptfiles.is_v1_shard_of(n, prefix)]
            taken.update(files)
            yield prefix, files, None
            continue
        files = [n for n in listed if n == prefix + _ckptfiles.INDEX or _is_data_of(n, prefix)]
        taken.update(files)
        yield prefix, files, _missing_shards(prefix, files)
    for n in listed:  # an index alone, or data alone: a save under way (or an interrupted copy)
        if n in taken:
            continue
        if n.endswith(_ckptfiles.INDEX) or _ckptfiles.DATA_RE.search(n):
            prefix = _ckptfiles.strip_file_suffix(n)
            files = [m for m in listed if m == prefix + _ckptfiles.INDEX or _is_data_of(m, prefix)]
            taken.update(files)
            why = "its data shards are not there yet" if n.endswith(_ckptfiles.INDEX) else "its .index is not there yet"
            yield prefix, files, why


def _is_data_of(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".data-") and _ckptfiles.DATA_RE.fullmatch(name[len(prefix):]) is not None


def _missing_shards(prefix: str, files: list[str]) -> str | None:
    shards = [f for f in files if f != prefix + _ckptfiles.INDEX]
    counts = set()
    for f in shards:
        m = _ckptfiles.DATA_RE.search(f)
        if m:
            counts.add(int(m.group(1)))
    if len(counts) != 1:
        return "its data shards disagree on their count" if counts else "its data shards are not there yet"
    (count,) = counts
    if len(shards) != count:
        return f"{len(shards)} of its {count} data shards are there"
    return None


# --------------------------------------------------------------------------- local


def _stat(path: str) -> Identity:
    st = os.stat(path)
    return st.st_size, str(st.st_mtime_ns)


def _local(source: str, skip: Callable[[str], bool]) -> list[Found]:
    if is_pattern(source) and not os.path.lexists(source):
        return _local_glob(source, skip)
    if os.path.isdir(source):
        kind = _kind_of(source)
        if kind is not None:
            return [kind if isinstance(kind, Found) else _saved_model(source, os.path.basename(os.path.normpath(source)))]
        top = os.path.normpath(source)
        return list(_walk(top, os.path.basename(top) if os.path.basename(top) not in ("", ".", "..") else "", skip))
    one = _local_checkpoint(source)
    if one is None:
        raise NotFoundError(f"no checkpoint at {source} (no prefix with an .index, no V1 file, no directory); check the path")
    return [one]


def _kind_of(directory: str) -> Found | bool | None:
    """Whether the source-kind registry takes ``directory`` for a SavedModel (True), refuses it as one
    without its weights (an incomplete :class:`Found`), or takes it for a plain directory (None)."""
    from . import Input, recognise

    try:
        hit = recognise(Input(directory))
    except FormatError as e:  # a SavedModel without a complete variables checkpoint: being written, or copied in part
        return Found(directory, "", {}, incomplete=str(e))
    return True if hit is not None and hit[0].name == "saved-model" else None


def _saved_model(directory: str, rel: str) -> Found:
    files: dict[str, Identity] = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, directory).replace(os.sep, "/")] = _stat(p)
    return Found(directory, rel, files)


def _walk(top: str, base: str, skip: Callable[[str], bool]) -> Iterator[Found]:
    from ..io.ranged import LocalPlace

    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = "/".join(p for p in (base, os.path.relpath(dirpath, top).replace(os.sep, "/")) if p not in ("", "."))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not skip(os.path.join(dirpath, d)))
        if dirpath != top:
            kind = _kind_of(dirpath)
            if isinstance(kind, Found):
                yield dataclasses.replace(kind, rel=rel_dir)
                dirnames[:] = []
                continue
            if kind:
                yield _saved_model(dirpath, rel_dir)
                dirnames[:] = []
                continue
        if _TF_TEMP.search(dirpath):
            if filenames:
                yield Found(dirpath, rel_dir, {}, incomplete="a TensorFlow save still under way (its temporary directory)")
            dirnames[:] = []
            continue
        names = {n: _stat(os.path.join(dirpath, n)) for n in filenames if os.path.isfile(os.path.join(dirpath, n))}
        place = LocalPlace(dirpath)
        yield from _founds(names, functools.partial(_is_table, place), functools.partial(os.path.join, dirpath), rel_dir)


def _founds(names: dict[str, Identity], is_table: Callable[[str], bool], where: Callable[[str], str], rel_dir: str) -> Iterator[Found]:
    for prefix, files, why in _group(names, is_table):
        rel = f"{rel_dir}/{prefix}" if rel_dir else prefix
        yield Found(where(prefix), rel, {f: names[f] for f in files}, incomplete=why)


def _is_table(place: Any, name: str) -> bool:
    from .._resolve import _is_table as is_table

    try:
        return bool(is_table(place, name))
    except (OSError, CkptBridgeError):
        return False


def _local_checkpoint(path: str) -> Found | None:
    """The one checkpoint a local path names (a prefix, one of its files, a V1 file), or None."""
    prefix = _ckptfiles.prefix_of(path)
    directory, base = os.path.split(prefix)
    directory = directory or os.curdir
    if not os.path.isdir(directory):
        return None
    names = {n: _stat(os.path.join(directory, n)) for n in os.listdir(directory)
             if (n == base or n.startswith(base + ".") or n.startswith(base + "-")) and os.path.isfile(os.path.join(directory, n))}
    from ..io.ranged import LocalPlace

    place = LocalPlace(directory)
    for f in _founds(names, lambda n: _is_table(place, n), lambda p: os.path.join(directory, p), ""):
        if f.rel == base:
            return f
    return None


def _local_glob(pattern: str, skip: Callable[[str], bool]) -> list[Found]:
    """Every checkpoint a glob matches; outputs mirror the paths below the pattern's first wildcard's directory."""
    static = _static_dir(pattern)
    found: dict[str, Found] = {}
    for match in sorted(glob.glob(pattern, recursive=True)):
        if skip(match):
            continue
        if os.path.isdir(match):
            items = _local(match, skip)
        else:
            one = _local_checkpoint(match)
            items = [one] if one is not None else []
        for f in items:
            rel = os.path.relpath(f.source, static).replace(os.sep, "/")
            found.setdefault(rel, dataclasses.replace(f, rel=rel))
    if not found:
        raise NotFoundError(f"{pattern} matches no checkpoint; check the pattern (quote it, so the shell leaves it to ckptbridge)")
    return list(found.values())


def _static_dir(pattern: str) -> str:
    parts = pattern.split(os.sep)
    fixed = []
    for p in parts:
        if is_pattern(p):
            break
        fixed.append(p)
    return os.sep.join(fixed) or os.curdir


# --------------------------------------------------------------------------- at a URL


def _remote(url: str) -> list[Found]:
    from ..io.remote import RemotePlace, _filesystem, redact

    fs, path, query, http = _filesystem(url)
    shown = redact(url)
    if http:
        raise FormatError(f"{shown}: plain HTTP cannot list; archive takes s3://, gs:// or another listable URL prefix")
    root = path.rstrip("/")
    if is_pattern(root):
        return _remote_glob(fs, root, shown)
    single = _remote_checkpoint(fs, root, shown)
    if single is not None:
        return [single]
    listing = _find(fs, root)
    if not listing:
        raise NotFoundError(f"no checkpoint at {shown} (nothing below it); check the URL")
    base = "" if "/" not in root.strip("/") else root.rsplit("/", 1)[-1]
    display = shown.rstrip("/")
    by_dir: dict[str, dict[str, Identity]] = {}
    for rel, ident in listing.items():
        d, _, n = rel.rpartition("/")
        by_dir.setdefault(d, {})[n] = ident
    found: list[Found] = []
    for d, names in sorted(by_dir.items()):
        if _TF_TEMP.search(d):
            found.append(Found(f"{display}/{d}", "/".join(p for p in (base, d) if p), {}, incomplete="a TensorFlow save still under way "
                                                                                                       "(its temporary directory)"))
            continue
        place = RemotePlace(fs, f"{root}/{d}" if d else root, f"{display}/{d}" if d else display, http=False, progress=False)
        rel_dir = "/".join(p for p in (base, d) if p)
        src_dir = f"{display}/{d}" if d else display
        found.extend(_founds(names, functools.partial(_is_table, place), functools.partial(_join_url, src_dir), rel_dir))
    return found


def _join_url(directory: str, name: str) -> str:
    return f"{directory}/{name}"


def _find(fs: Any, root: str) -> dict[str, Identity]:
    """Every file below ``root``, by its path relative to it, with its identity (one recursive listing)."""
    try:
        entries = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    out: dict[str, Identity] = {}
    for p, info in entries.items():
        p = str(p).rstrip("/")
        if info.get("type", "file") != "file" or not p.startswith(root + "/"):
            continue
        out[p[len(root) + 1:]] = (int(info.get("size") or 0), object_tag(info))
    return out


def _remote_checkpoint(fs: Any, path: str, shown: str) -> Found | None:
    """The one checkpoint a URL names (its prefix, one of its files, a V1 file), or None for a prefix to list."""
    prefix = _ckptfiles.strip_file_suffix(path)
    directory, _, base = prefix.rpartition("/")
    if not base or not fs.exists(prefix + _ckptfiles.INDEX) and not fs.isfile(prefix):
        return None
    try:
        entries = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return None
    names = {str(e["name"]).rsplit("/", 1)[-1]: (int(e.get("size") or 0), object_tag(e)) for e in entries if e.get("type") == "file"}
    names = {n: v for n, v in names.items() if n == base or n.startswith(base + ".") or n.startswith(base + "-")}
    from ..io.remote import RemotePlace

    sdir = shown.rstrip("/").rsplit("/", 1)[0]
    place = RemotePlace(fs, directory, sdir, http=False, progress=False)
    for f in _founds(names, lambda n: _is_table(place, n), lambda p: f"{sdir}/{p}", ""):
        if f.rel == base:
            return f
    return None


def _remote_glob(fs: Any, pattern: str, shown: str) -> list[Found]:
    """Every checkpoint whose files a URL's glob matches (``s3://b/runs/*/model.ckpt-*000.index``), mirrored
    below the pattern's last directory without a wildcard; each matched directory is listed once."""
    from ..io.remote import RemotePlace

    static = pattern.split("/")
    keep = next(i for i, part in enumerate(static) if is_pattern(part))
    base = "/".join(static[:keep])
    shown_base = "/".join(shown.rstrip("/").split("/")[: len(shown.rstrip("/").split("/")) - (len(static) - keep)])
    wanted: dict[str, set[str]] = {}
    for m in fs.glob(pattern):
        d, _, n = str(m).rstrip("/").rpartition("/")
        wanted.setdefault(d, set()).add(_ckptfiles.strip_file_suffix(n))
    found: list[Found] = []
    for d, prefixes in sorted(wanted.items()):
        entries = fs.ls(d, detail=True)
        names = {str(e["name"]).rsplit("/", 1)[-1]: (int(e.get("size") or 0), object_tag(e)) for e in entries if e.get("type") == "file"}
        rel_dir = d[len(base) + 1:] if d.startswith(base + "/") else ""
        src_dir = f"{shown_base}/{rel_dir}" if rel_dir else shown_base
        place = RemotePlace(fs, d, src_dir, http=False, progress=False)
        found += [f for f in _founds(names, functools.partial(_is_table, place), functools.partial(_join_url, src_dir), rel_dir)
                  if f.rel.rsplit("/", 1)[-1] in prefixes]
    if not found:
        raise NotFoundError(f"{shown} matches no checkpoint; check the pattern (quote it, so the shell leaves it to ckptbridge)")
    return found
