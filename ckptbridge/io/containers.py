"""Where the bytes are, part two: checkpoints inside ``.tar``, ``.tar.gz``/``.tgz`` and ``.zip`` archives.

The tf-slim model zoo ships ``vgg_16_2016_08_28.tar.gz`` holding ``vgg_16.ckpt``;
people zip a V2 prefix to mail it.  An archive of checkpoints opens as a
:class:`~ckptbridge.io.ranged.Place` whose files are its members:

- an uncompressed tar member and a stored zip member are read **in place, by
  range** (a member is an offset+size view of the outer file, local or remote):
  nothing is copied;
- a compressed tar (gzip) and a deflated zip member cannot be read by range, so
  they are unpacked, as one stream, into **bounded temporary space**: a
  directory beside the output (or the system temp), checked against free space
  before each member, registered with the process's ledger of temporaries
  (``_atomic``) so an error, Ctrl-C or SIGTERM removes it, and removed when the
  place closes.

A member whose name is absolute or has a ``..`` component, or a link whose
target leaves the archive, is refused before anything is read or unpacked: one
:class:`~ckptbridge.errors.UnsafeArchiveError` names it.  Links inside the
archive are followed to their target member.

What a crafted archive can cost is bounded by its bytes: a gzip of several
members is read to its end (as ``gzip -d`` reads it); member names are at most
:data:`MAX_NAME_BYTES` long and :data:`MAX_NAME_DEPTH` segments deep, tar's
extended headers at most ``_MAX_EXT_HEADER``; a zip's directory must describe
members that lie, without overlapping, in the bytes before it, and that can
inflate to what they claim.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import io
import os
import posixpath
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import IO, TYPE_CHECKING

from ..errors import CkptBridgeError, CorruptError, FormatError, NotFoundError, UnsafeArchiveError
from . import atomic as _atomic
from .ranged import LocalFile, Place, RangedFile
from .signals import raise_if_signalled, signals_deferred

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["CONTAINERS", "container_kind", "open_container", "ArchivePlace", "Scratch", "RESERVE_BYTES", "stage"]

#: Unpacking stops with an error rather than leave less than this much free space on the scratch file system.
RESERVE_BYTES = 64 << 20
#: Read-ahead over the outer file: unpacking a stream reads large ranges; scanning the headers
#: of a tar read in place, or a zip's directory, small ones (each header costs one ranged read).
_STREAM_READ_AHEAD = 1 << 20
_SCAN_READ_AHEAD = 64 << 10
_COPY_BYTES = 4 << 20
#: The longest member name taken, in bytes (Linux's PATH_MAX: no file system path is longer), and the
#: most path segments in one: each unpacked directory costs a mkdir, and a name of 10,000 segments is crafted.
MAX_NAME_BYTES = 4096
MAX_NAME_DEPTH = 128
#: tarfile reads a pax extended header or a GNU long name whole into memory: a crafted .tar.gz can
#: claim gigabytes of one.  Real ones hold a long name and a few attributes.
_MAX_EXT_HEADER = 1 << 20
#: How far past a tar's end a .tar.gz is read to reach the end of its gzip (records pad it by up to 10 KiB).
_GZIP_TAIL = 1 << 20
#: Deflate cannot expand more than 1032:1; a zip member claiming more is crafted.
_MAX_DEFLATE_RATIO = 1100


@dataclasses.dataclass
class _Member:
    """A member file: ``(offset, size)`` of the outer file, or a local path it was unpacked to."""

    size: int
    offset: int | None = None
    path: str | None = None


class MemberFile(RangedFile):
    """An offset+size view of another ranged file (an uncompressed tar member, a stored zip member)."""

    def __init__(self, outer: RangedFile, offset: int, size: int, name: str) -> None:
        self.outer, self.offset, self.size, self.name = outer, offset, size, name

    def pread(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise ValueError(f"bad range ({offset}, {n}) of {self.name}")
        if offset + n > self.size:
            raise FormatError(f"{self.name} is truncated: needed bytes {offset}..{offset + n} of a {self.size}-byte member")
        return self.outer.pread(self.offset + offset, n)

    def block_hint(self) -> int | None:
        return self.outer.block_hint()

    def stream(self, ranges: Iterable[tuple[int, int]]) -> Generator[bytes, None, None]:
        """The outer file's :meth:`~RangedFile.stream` of the ranges, moved to the member (a tar over HTTP fetches ahead too)."""
        def inside() -> Iterator[tuple[int, int]]:
            for offset, n in ranges:
                if offset < 0 or n < 0:
                    raise ValueError(f"bad range ({offset}, {n}) of {self.name}")
                if offset + n > self.size:
                    raise FormatError(f"{self.name} is truncated: needed bytes {offset}..{offset + n} of a {self.size}-byte member")
                yield self.offset + offset, n

        return self.outer.stream(inside())


class ArchivePlace(Place):
    """The files of a tar or zip archive: members read by range or unpacked to scratch space."""

    def __init__(self, name: str, outer: RangedFile, members: dict[str, _Member], scratch: Scratch | None) -> None:
        self.name = name
        self._outer = outer
        self.owner: Place | None = None  # the place the outer file came from (a remote directory), closed with this one
        self._members = members
        self._scratch = scratch

    def files(self) -> list[str]:
        """Every member file's relative path, sorted."""
        return sorted(self._members)

    def _get(self, relpath: str) -> _Member:
        m = self._members.get(relpath.strip("/"))
        if m is None:
            raise NotFoundError(f"{self.name} has no member {relpath}")
        return m

    def open(self, relpath: str) -> RangedFile:
        m = self._get(relpath)
        label = f"{self.name}/{relpath}"
        if m.path is not None:
            return LocalFile(m.path, name=label)
        assert m.offset is not None
        return MemberFile(self._outer, m.offset, m.size, label)

    def exists(self, relpath: str) -> bool:
        return relpath.strip("/") in self._members

    def listdir(self, reldir: str = "") -> list[str]:
        d = reldir.strip("/")
        return sorted(posixpath.basename(n) for n in self._members if posixpath.dirname(n) == d)

    def local_dir(self) -> str | None:
        """The scratch directory when every member was unpacked there (a gzip tarball)."""
        if self._scratch is not None and all(m.path is not None for m in self._members.values()):
            return self._scratch.path
        return None

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.remove()
        self._outer.close()
        if self.owner is not None:
            self.owner.close()


class Scratch:
    """A temporary directory for unpacked members (or, by ``kind``, another local copy: an upload's), removed on
    close, errors and signals.

    It is named like every temporary of ckptbridge (``_atomic.TMP_SUFFIX``) and
    sits in the process's ledger of pending temporaries, which the CLI sweeps
    when a command stops and the interpreter sweeps at exit.
    """

    def __init__(self, directory: str | None, kind: str = "unpack") -> None:
        self.path = tempfile.mkdtemp(prefix=f".ckptbridge-{kind}.", suffix=_atomic.TMP_SUFFIX, dir=directory)
        self.used = 0
        self._tree: dict[str, object] = {}  # what was unpacked: directory name -> its tree, file name -> _FILE
        _atomic.track_pending(self.path, self.remove)  # the ledger _atomic.discard_pending sweeps

    def dest(self, name: str, archive: str) -> str:
        """Where the member ``name`` (a clean relative path) of ``archive`` is unpacked, its directories made.

        A name that is a file here and a directory there (``m`` and ``m/x``) cannot both be unpacked, and would
        otherwise fail as a "File exists" that says nothing about the archive; directories are made one by one
        (``os.makedirs`` recurses once per level)."""
        parts = name.split("/")
        node = self._tree
        made = len(parts) - 1
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is _FILE:
                raise self._clash(archive, "/".join(parts[:i + 1]))
            if child is None:
                made = min(made, i)
                child = node[part] = {}
            assert isinstance(child, dict)
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise self._clash(archive, name)
        node[parts[-1]] = _FILE
        path = os.path.join(self.path, *parts)
        try:
            for i in range(made, len(parts) - 1):
                os.mkdir(os.path.join(self.path, *parts[:i + 1]))
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            raise FormatError(f"{archive}: member {name[:80]!r}... is too long a path to unpack under {self.path} "
                              f"({len(path)} characters); unpack the archive yourself into a shorter directory") from None
        return path

    @staticmethod
    def _clash(archive: str, both: str) -> FormatError:
        return FormatError(f"{archive} holds both a file and a directory named {both!r} (a member {both!r} and members under "
                           f"{both + '/'!r}); no file system unpacks both, so ckptbridge refuses the archive; remove one of them and retry")

    def reserve(self, nbytes: int, what: str) -> None:
        """Refuse to unpack ``nbytes`` more when that would leave less than RESERVE_BYTES free."""
        free = shutil.disk_usage(self.path).free
        if nbytes > free - RESERVE_BYTES:
            raise CkptBridgeError(f"not enough free space to unpack {what}: it needs {nbytes} bytes and "
                                  f"{os.path.dirname(self.path)} has {free} free (keeping {RESERVE_BYTES} spare); "
                                  "free some space, or unpack the archive yourself and pass the checkpoint")
        self.used += nbytes

    def remove(self) -> None:
        with signals_deferred():
            _atomic.untrack_pending(self.path)
            shutil.rmtree(self.path, ignore_errors=True)


_FILE = object()


# --- member names --------------------------------------------------------------


def _safe_name(archive: str, name: str) -> str:
    """A member's name as a clean relative path, or UnsafeArchiveError when it could land outside."""
    if len(name) > MAX_NAME_BYTES or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UnsafeArchiveError(f"{archive}: a member name of {len(name.encode('utf-8', 'surrogateescape'))} bytes "
                                 f"(starting {name[:60]!r}) is longer than any file system path ({MAX_NAME_BYTES} bytes); "
                                 "the archive is damaged or crafted and ckptbridge refuses it; re-create it with shorter names")
    parts = name.replace("\\", "/").split("/")   # a backslash counts as a separator too (archives made on Windows)
    if len(parts) > MAX_NAME_DEPTH:
        raise UnsafeArchiveError(f"{archive}: member {name[:60]!r}... is {len(parts)} path segments deep, over the "
                                 f"{MAX_NAME_DEPTH} ckptbridge takes; the archive is damaged or crafted and ckptbridge refuses it; "
                                 "re-create it with a shallower tree")
    if parts[0] == "" or (len(parts[0]) == 2 and parts[0][1] == ":") or ".." in parts or "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the archive (an absolute path or '..'); "
                                 "ckptbridge refuses archives with such members; unpack it yourself after checking it")
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _link_target(archive: str, name: str, target: str, hard: bool) -> str:
    """Where a link member points, as a member name; UnsafeArchiveError when it leaves the archive."""
    joined = target if hard else posixpath.join(posixpath.dirname(name), target)
    norm = posixpath.normpath(joined) if joined else ""
    if target.startswith("/") or norm.startswith("../") or norm in ("..", ".", ""):
        raise UnsafeArchiveError(f"{archive}: member {name!r} is a link to {target!r}, outside the archive; "
                                 "ckptbridge refuses archives with such members; unpack it yourself after checking it")
    return norm


def _resolve_links(archive: str, members: dict[str, _Member], links: dict[str, str]) -> None:
    """Add each link that ends at a member file as another name of it (chains followed, loops refused).

    Each link is followed once: a chain's end is remembered for every link on it (a chain of
    100,000 links followed from each of them would take minutes)."""
    end: dict[str, str] = {}
    for name in links:
        chain: list[str] = []
        on_chain: set[str] = set()
        target = name
        while target in links and target not in end:
            if target in on_chain:
                raise FormatError(f"{archive}: member {name!r} is a link in a loop")
            chain.append(target)
            on_chain.add(target)
            target = links[target]
        final = end.get(target, target)
        for link in chain:
            end[link] = final
        if final in members:
            members[name] = members[final]


# --- reading the outer file as a stream ------------------------------------------


class _RawReader(io.RawIOBase):
    """A seekable raw stream over a RangedFile, so tarfile and zipfile can read it."""

    def __init__(self, f: RangedFile) -> None:
        self.f = f
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.f.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: WriteableBuffer, /) -> int:
        out = memoryview(b).cast("B")
        n = min(out.nbytes, max(0, self.f.size - self.pos))
        if n == 0:
            return 0
        data = self.f.pread(self.pos, n)
        out[:n] = data
        self.pos += n
        return n


def _stream(f: RangedFile, read_ahead: int) -> io.BufferedReader:
    return io.BufferedReader(_RawReader(f), buffer_size=read_ahead)


def _truncated(name: str, err: BaseException) -> FormatError:
    return FormatError(f"{name} is truncated or damaged ({err or type(err).__name__}); download or copy it again")


def _copy_out(src: IO[bytes], dest: str, size: int, what: str) -> None:
    """Copy exactly ``size`` bytes of an unpacking stream to ``dest``."""
    done = 0
    with open(dest, "wb") as out:
        while True:
            raise_if_signalled()
            chunk = src.read(_COPY_BYTES)
            if not chunk:
                break
            done += len(chunk)
            if done > size:
                raise FormatError(f"{what} holds more bytes than its header says ({size})")
            out.write(chunk)
    if done != size:
        raise FormatError(f"{what} is truncated: {done} of its {size} bytes")


# --- tar ---------------------------------------------------------------------------


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended header (pax records, a GNU long name) is refused over ``_MAX_EXT_HEADER``
    before tarfile reads it whole into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXT_HEADERS and self.size > _MAX_EXT_HEADER:
            raise _ExtHeaderTooLarge(self.size)
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]  # private: typeshed omits it
        return member


class _ExtHeaderTooLarge(Exception):
    """Raised inside tarfile's parsing; _open_tar names the archive."""


_EXT_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


def _open_tar(f: RangedFile, compressed: bool, wanted: Callable[[str], bool], scratch_dir: str | None) -> ArchivePlace:
    members: dict[str, _Member] = {}
    links: dict[str, str] = {}
    scratch = Scratch(scratch_dir) if compressed else None
    try:
        try:
            gz = gzip.GzipFile(fileobj=_stream(f, _STREAM_READ_AHEAD), mode="rb") if compressed else None
            if gz is not None:
                # GzipFile reads every gzip member, as gzip -d does (tarfile's own "r|gz" stops at the
                # end of the first: a .tar.gz written in parts, by pigz or by concatenation, lost the rest).
                # It is read as a stream, once, in bounded reads.
                tar = tarfile.open(fileobj=gz, mode="r|", tarinfo=_BoundedTarInfo)
            else:
                tar = tarfile.open(fileobj=_stream(f, _SCAN_READ_AHEAD), mode="r:", tarinfo=_BoundedTarInfo)
            with tar:
                for info in tar:
                    raise_if_signalled()
                    name = _safe_name(f.name, info.name)
                    if info.issym() or info.islnk():
                        links[name] = _link_target(f.name, name, info.linkname, info.islnk())
                    elif info.isdir():
                        continue
                    elif not info.isreg() or info.issparse():
                        continue  # devices, FIFOs, sparse files: never a checkpoint's file
                    elif not compressed:
                        if info.offset_data + info.size > f.size:
                            raise FormatError(f"{f.name} is truncated: member {name!r} runs past its end "
                                              f"({info.offset_data + info.size} > {f.size} bytes); download or copy it again")
                        members[name] = _Member(info.size, offset=info.offset_data)
                    elif wanted(name):
                        assert scratch is not None
                        scratch.reserve(info.size, f"{f.name}/{name}")
                        dest = scratch.dest(name, f.name)
                        src = tar.extractfile(info)
                        assert src is not None
                        _copy_out(src, dest, info.size, f"{f.name}/{name}")
                        members[name] = _Member(info.size, path=dest)
                if gz is not None:
                    # On past the tar's end to the gzip's, so the last member's CRC-32 is checked too;
                    # a crafted archive can put gigabytes there, so not further than _GZIP_TAIL.
                    gz.read(_GZIP_TAIL)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise _truncated(f.name, e) from None
        except _ExtHeaderTooLarge as e:
            raise UnsafeArchiveError(f"{f.name}: an extended tar header (pax records or a GNU long name) of {e.args[0]} bytes, "
                                     f"over the {_MAX_EXT_HEADER} ckptbridge reads (real ones hold a long name and a few "
                                     "attributes); the archive is damaged or crafted and ckptbridge refuses it") from None
        _resolve_links(f.name, members, links)
        return ArchivePlace(f.name, f, members, scratch)
    except BaseException:
        if scratch is not None:
            scratch.remove()
        raise


# --- zip ---------------------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"


def _raw_name_length(info: zipfile.ZipInfo) -> int:
    """How many bytes the member's name takes in its local header (zipfile checks that it equals the directory's)."""
    try:
        return len(info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"))
    except UnicodeEncodeError:
        return 0


def _zip_bounds(f: RangedFile, zf: zipfile.ZipFile, stream: IO[bytes]) -> dict[int, int]:
    """Check that the directory describes bytes that exist, each once; return, for each member's header
    offset, where the next member (or the directory) starts: its data must end there.

    Python 3.11's zipfile checks none of it: 400 directory entries naming one deflated member
    unpack it 400 times, and a directory offset past the end gives negative member offsets.
    Each member's local header and data take at least 30 + its name's bytes + its compressed
    size; those spans must not overlap and must end before the directory, so the members
    together claim no more bytes than the file holds, and each inflates at most _MAX_DEFLATE_RATIO-fold."""
    start_dir = int(getattr(zf, "start_dir", f.size))
    try:
        end = zipfile._EndRecData(stream)  # type: ignore[attr-defined]  # the stdlib's own parser, private: typeshed omits it
    except (OSError, struct.error, ValueError):
        end = None
    if end:
        offset_cd = int(end[zipfile._ECD_OFFSET])  # type: ignore[attr-defined]  # private: typeshed omits it
        if offset_cd > start_dir:  # zipfile then shifts every member's offset down, below 0
            where = (f"past the end of the {f.size}-byte file" if offset_cd >= f.size
                     else f"but it is at byte {start_dir}")
            raise CorruptError(f"{f.name}: its end record puts the zip directory at byte {offset_cd}, {where}; "
                               "the archive is damaged; download or copy it again")
    infos = zf.infolist()
    claimed = int(end[zipfile._ECD_ENTRIES_TOTAL]) if end else len(infos)  # type: ignore[attr-defined]  # private: typeshed omits it
    if claimed != len(infos):  # zipfile stops at an entry whose lengths run past the directory, and returns the rest
        raise CorruptError(f"{f.name}: the zip directory lists {claimed} members but {len(infos)} can be read; "
                           "the archive is damaged; download or copy it again")
    seen: set[str] = set()
    spans = []
    for info in infos:
        if info.filename in seen:
            raise CorruptError(f"{f.name}: member {info.filename!r} appears twice in the zip directory; "
                               "refusing an ambiguous (damaged or crafted) archive")
        seen.add(info.filename)
        lo = info.header_offset
        hi = lo + _LOCAL_HEADER.size + _raw_name_length(info) + info.compress_size
        if lo < 0 or hi > start_dir:
            raise CorruptError(f"{f.name}: the zip directory puts member {info.filename!r} at bytes {lo}..{hi}, outside the "
                               f"{start_dir} bytes before the directory (a {f.size}-byte file); the archive is damaged or "
                               "truncated; download or copy it again")
        if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 4096:
            raise UnsafeArchiveError(f"{f.name}: member {info.filename!r} claims {info.file_size} bytes from {info.compress_size} "
                                     "compressed, more than deflate can give; refusing a crafted archive")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CorruptError(f"{f.name}: stored member {info.filename!r} claims {info.file_size} bytes but holds "
                               f"{info.compress_size}; the archive is damaged; download or copy it again")
        spans.append((lo, hi, info.filename))
    spans.sort()
    limits = {}
    for (lo, hi, name), nxt in zip(spans, spans[1:] + [(start_dir, start_dir, "")]):
        if hi > nxt[0]:
            raise UnsafeArchiveError(f"{f.name}: members {name!r} and {nxt[2]!r} share bytes in the file; "
                                     "refusing an overlapping (crafted) archive")
        limits[lo] = nxt[0]
    return limits


def _local_data(f: RangedFile, info: zipfile.ZipInfo, name: str, limit: int) -> int:
    """Where ``info``'s data starts, from its local header; refused when the data would run past ``limit``."""
    fields = _LOCAL_HEADER.unpack(f.pread(info.header_offset, _LOCAL_HEADER.size))
    if fields[0] != _LOCAL_MAGIC:
        raise CorruptError(f"{f.name}: member {name!r} has no local header where the directory says; the zip is damaged")
    name_bytes, extra_bytes = int(fields[9]), int(fields[10])
    offset = info.header_offset + _LOCAL_HEADER.size + name_bytes + extra_bytes
    if offset + info.compress_size > f.size:
        raise FormatError(f"{f.name} is truncated: member {name!r} runs past its end")
    if offset + info.compress_size > limit:
        raise UnsafeArchiveError(f"{f.name}: member {name!r}'s data runs into the next member's bytes; "
                                 "refusing an overlapping (crafted) archive")
    return offset


def _open_zip(f: RangedFile, wanted: Callable[[str], bool], scratch_dir: str | None) -> ArchivePlace:
    stream = _stream(f, _SCAN_READ_AHEAD)
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise _truncated(f.name, e) from None
    members: dict[str, _Member] = {}
    links: dict[str, str] = {}
    scratch: Scratch | None = None
    try:
        infos = zf.infolist()
        for info in infos:
            _safe_name(f.name, info.filename)   # every member checked before any is read
        limits = _zip_bounds(f, zf, stream)
        for info in infos:
            name = _safe_name(f.name, info.filename)
            mode = info.external_attr >> 16
            if info.is_dir():
                continue
            if stat.S_ISLNK(mode):
                if info.file_size > 4096:
                    raise FormatError(f"{f.name}: link member {name!r} is {info.file_size} bytes long")
                _local_data(f, info, name, limits[info.header_offset])
                links[name] = _link_target(f.name, name, zf.read(info).decode("utf-8", "surrogateescape"), False)
                continue
            if info.flag_bits & 0x1:
                raise FormatError(f"{f.name}: member {name!r} is encrypted; ckptbridge reads unencrypted zip archives only")
            if info.compress_type == zipfile.ZIP_STORED:
                offset = _local_data(f, info, name, limits[info.header_offset])
                members[name] = _Member(info.file_size, offset=offset)
            elif wanted(name):
                _local_data(f, info, name, limits[info.header_offset])
                if scratch is None:
                    scratch = Scratch(scratch_dir)
                scratch.reserve(info.file_size, f"{f.name}/{name}")
                dest = scratch.dest(name, f.name)
                try:
                    with zf.open(info) as src:
                        _copy_out(src, dest, info.file_size, f"{f.name}/{name}")
                except (zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error) as e:
                    raise _truncated(f"{f.name}/{name}", e) from None
                members[name] = _Member(info.file_size, path=dest)
        _resolve_links(f.name, members, links)
        return ArchivePlace(f.name, f, members, scratch)
    except BaseException:
        if scratch is not None:
            scratch.remove()
        raise
    finally:
        zf.close()


# --- the registry ---------------------------------------------------------------------

#: suffix -> how to open an archive of checkpoints of that kind: (outer file, wanted(member), scratch dir) -> place
CONTAINERS: dict[str, Callable[[RangedFile, Callable[[str], bool], str | None], ArchivePlace]] = {
    ".tar": lambda f, wanted, scratch: _open_tar(f, False, wanted, scratch),
    ".tar.gz": lambda f, wanted, scratch: _open_tar(f, True, wanted, scratch),
    ".tgz": lambda f, wanted, scratch: _open_tar(f, True, wanted, scratch),
    ".zip": _open_zip,
}


def container_kind(name: str) -> str | None:
    """The registered archive-of-checkpoints suffix ``name`` ends with (``.tar.gz`` before ``.gz``); None otherwise."""
    low = name.lower().rstrip("/")
    for suffix in sorted(CONTAINERS, key=len, reverse=True):
        if low.endswith(suffix):
            return suffix
    return None


def member_files(member: str) -> Callable[[str], bool]:
    """Which member files belong to the checkpoint ``member`` names (its prefix, or one of its files)."""
    from .ckptfiles import strip_file_suffix

    prefix = strip_file_suffix(member.strip("/"))
    return lambda name: name == prefix or name.startswith(prefix + ".") or name.startswith(prefix + "-")


def open_container(f: RangedFile, *, member: str | None = None, scratch_dir: str | None = None) -> ArchivePlace:
    """The archive ``f`` (of a kind :func:`container_kind` knows) as a place.

    Compressed members are unpacked into a temporary directory in ``scratch_dir``
    (None: the system temp): all of them, or with ``member`` only that
    checkpoint's files.  The place owns ``f`` and closes it."""
    kind = container_kind(f.name)
    if kind is None:
        raise FormatError(f"{f.name} is not an archive ckptbridge opens; archives of checkpoints end with {', '.join(CONTAINERS)}")
    wanted = member_files(member) if member else (lambda name: True)
    try:
        return CONTAINERS[kind](f, wanted, scratch_dir)
    except BaseException:
        f.close()
        raise


def names_in(place: Place) -> Iterable[str]:
    """Every file of ``place`` as a relative path: an archive's members, or a local directory walked."""
    if isinstance(place, ArchivePlace):
        return place.files()
    top = place.local_dir()
    if top is None:
        return place.listdir("") or []
    found = []
    for root, _, files in os.walk(top):
        rel = os.path.relpath(root, top).replace(os.sep, "/")
        found += [n if rel == "." else f"{rel}/{n}" for n in files]
    return sorted(found)


def stage(place: Place, relpaths: list[str], scratch_dir: str | None = None) -> tuple[Scratch, str]:
    """Copy ``relpaths`` of ``place`` into a new scratch directory (for engines that need real files).

    Returns the scratch (its caller removes it) and the directory the files keep their relative paths in."""
    scratch = Scratch(scratch_dir)
    try:
        for rel in relpaths:
            with place.open(rel) as f:
                scratch.reserve(f.size, f.name)
                dest = scratch.dest(rel, place.name)
                with open(dest, "wb") as out:
                    for pos in range(0, f.size, _COPY_BYTES):
                        raise_if_signalled()
                        out.write(f.pread(pos, min(_COPY_BYTES, f.size - pos)))
        return scratch, scratch.path
    except BaseException:
        scratch.remove()
        raise
