"""Outputs that appear whole or not at all.

Everything is written under a temporary name beside the destination (same
directory, so the final rename is atomic), with an unpredictable, recognisable
name: ``.<dest name>.<pid>-<start>-<where>.<random>.ckptbridge-tmp``, which says
which process writes it (see :func:`owner_tag`).  A process killed outright
(SIGKILL, the OOM killer) leaves its temporary behind; the next output to the
same destination removes it once that process is provably gone, and names any it
cannot judge (:func:`stale_notes`).  A symlink at the destination is replaced,
never written through.  Files end up with the user's umask.

Without ``force`` the final step is a rename that refuses to replace anything
(``renameat2(RENAME_NOREPLACE)``, else a hard link and an unlink), so of two
runs racing to one output the second fails instead of replacing the first.

The signal deferral these outputs rely on is :mod:`._signals`; fsync, writeback
and the umask are :mod:`._durability`.  This module also keeps the process's
ledger of outputs (pending temporaries, published outputs, state-file notes),
which the CLI reads to say truthfully what was written when a command stops.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import glob
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import CkptBridgeError, NotFoundError, OutputExistsError, StateFileError, option
from . import ckptfiles as _ckptfiles
from . import durability as _durability
from . import state as _state
from .ckptfiles import checkpoint_files
from .ckptfiles import taken_names as _taken_names
from .signals import raise_if_signalled, signals_deferred
from .threads import Job

TMP_SUFFIX = ".ckptbridge-tmp"

# Temporary outputs of this process not yet committed or aborted: temp path -> its abort().
# A sink's constructor can be interrupted (a signal, an error) after its temporary exists
# and before anyone holds the sink to abort it; the CLI and interpreter exit sweep these.
_pending: dict[str, Callable[[], None]] = {}


def track_pending(path: str, abort: Callable[[], None]) -> None:
    """Put a temporary this process made (``path``) in the ledger, with the call that removes it."""
    _pending[path] = abort


def untrack_pending(path: str) -> None:
    """Take a temporary out of the ledger: it was committed or removed."""
    _pending.pop(path, None)


def discard_pending() -> None:
    """Abort every temporary output this process started and did not finish (safe to call any time)."""
    with signals_deferred():
        for abort in list(_pending.values()):
            try:
                abort()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


atexit.register(discard_pending)

# Destinations this process has published, so that a signal arriving during or
# after the final rename is not reported as "nothing was written".
_published: list[str] = []


def published_outputs() -> list[str]:
    """The outputs this process has moved into place (complete), in order."""
    return list(_published)


def note_published(dest: str) -> None:
    """Record an output published by other means than a rename here (an object uploaded to a URL)."""
    _published.append(dest)


def forget_published(dest: str) -> None:
    """Take back the record of ``dest``'s publishing: a local copy that is only a step to another output."""
    for i in range(len(_published) - 1, -1, -1):
        if _published[i] == dest:
            del _published[i]
            return


@dataclasses.dataclass(frozen=True)
class StateNote:
    """What a checkpoint commit did with its directory's ``checkpoint`` state file.

    ``action`` is "created" (there was none), "updated" (it now names
    ``prefix`` as the latest; ``kept`` earlier checkpoints stay listed),
    "unchanged" (it already named ``prefix``) or "left" (it names ``latest``,
    which is what TensorFlow still restores; updating it was not asked for).
    """

    path: str
    prefix: str
    action: str
    latest: str | None
    kept: int = 0


_state_notes: list[StateNote] = []


def state_notes() -> list[StateNote]:
    """What every checkpoint commit of this process did with a state file, in order."""
    return list(_state_notes)


# --------------------------------------------------------------------------- whose temporary is it

_NAME_MAX = 255
_RANDOM = r"[a-z0-9_]{8}"  # what tempfile puts between prefix and suffix
_OWNED = re.compile(r"(?P<pid>\d{1,10})-(?P<start>\d{1,20})-(?P<where>[0-9a-f]{8})\." + _RANDOM)
_UNOWNED = re.compile(_RANDOM)  # named before owners were recorded
_owner: str | None = None


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None where it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    fields = stat_line[stat_line.rfind(b")") + 2:].split()  # the command name, in parentheses, may hold anything
    return fields[19].decode() if len(fields) > 19 else None


def _where() -> str | None:
    """This boot of this machine in this PID namespace, hashed: where a pid and a start time name one process."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return hashlib.sha256(boot + b"/" + str(namespace).encode()).hexdigest()[:8]


def owner_tag() -> str | None:
    """``<pid>-<start>-<where>`` for this process, put in the names of its temporaries; None without /proc.

    A pid alone is reused; with its start time it names one process of one boot, and
    ``where`` (boot id and PID namespace) says whose ``/proc`` can tell whether it still runs.
    """
    global _owner
    if _owner is None:
        start, where = _start_time(os.getpid()), _where()
        _owner = f"{os.getpid()}-{start}-{where}" if start is not None and where is not None else ""
    return _owner or None


def _tmp_prefix(dest: str) -> str:
    """The start of every temporary name for ``dest``: ``.<basename>.`` (shortened to leave room for the rest)."""
    base = os.path.basename(dest)
    room = _NAME_MAX - len(".." + "4194304-" + "9" * 20 + "-" + "f" * 8 + ".xxxxxxxx" + TMP_SUFFIX)
    while len(os.fsencode(base)) > room:
        base = base[:-1]
    return f".{base}."


def _new_tmp_prefix(dest: str) -> str:
    owner = owner_tag()
    return _tmp_prefix(dest) + (f"{owner}." if owner else "")


@dataclasses.dataclass(frozen=True)
class StaleNote:
    """A temporary of an earlier run found beside an output this process wrote.

    ``action`` is "removed" (the process that wrote it is gone: pid ``pid`` no
    longer runs, or runs a later process) or "left" (``why`` says why it cannot be
    told: written on another machine, boot or container, by another user, or
    under a name that does not say by whom).
    """

    path: str
    dest: str
    action: str
    nbytes: int
    pid: int | None = None
    why: str = ""


_stale_notes: list[StaleNote] = []


def stale_notes() -> list[StaleNote]:
    """What every output of this process found of earlier runs' temporaries, in order."""
    return list(_stale_notes)


def _size(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(d, n)).st_size
            except OSError:
                pass
    return total


def sweep_stale(dest: str) -> list[StaleNote]:
    """Remove the temporaries of ``dest`` whose writer is gone; note the others; return what was found.

    A temporary is removed only when its name records a process of this boot and
    PID namespace (so this ``/proc`` is the one that can answer) that no longer
    runs, and it belongs to this user.  A live writer's temporary, including one
    racing this run, is never touched.  A temporary directory holding ``previous/``
    (a forced checkpoint replace killed midway kept the old checkpoint there) is
    never removed: :mod:`._resolve` tells the user to move it back.
    """
    parent = os.path.dirname(os.path.abspath(dest))
    start = _tmp_prefix(dest)
    where = _where()
    found: list[StaleNote] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return found
    for entry in entries:
        candidate = _stale_candidate(entry, start)
        if candidate is None:
            continue
        owned, st = candidate
        path = entry.path
        is_dir = stat.S_ISDIR(st.st_mode)
        nbytes = _size(path) if is_dir else st.st_size
        pid = int(owned.group("pid")) if owned is not None else None
        why = _why_kept(owned, pid, st, path, where)
        if why is None:
            continue  # a writer that is still running: its own
        if not why:
            why = _remove_stale(path, is_dir)
            if why is None:
                continue  # another run removed it meanwhile
        note = StaleNote(os.path.join(os.path.dirname(dest), entry.name), dest, "left" if why else "removed", nbytes, pid, why)
        found.append(note)
        _stale_notes.append(note)
    return found


def _stale_candidate(entry: os.DirEntry[str], start: str) -> tuple[re.Match[str] | None, os.stat_result] | None:
    """For a temporary of the destination whose names start ``start``: the match of its name's record of
    its writer (None for a name without one) and its ``lstat``; None for anything else."""
    name = entry.name
    if not (name.startswith(start) and name.endswith(TMP_SUFFIX)):
        return None
    middle = name[len(start): -len(TMP_SUFFIX)]
    owned, unowned = _OWNED.fullmatch(middle), _UNOWNED.fullmatch(middle)
    if owned is None and unowned is None:
        return None  # another destination's, whose name starts like this one
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return None  # ckptbridge makes files and directories only
    return owned, st


def _why_kept(owned: re.Match[str] | None, pid: int | None, st: os.stat_result, path: str, where: str | None) -> str | None:
    """Why a temporary must stay ("" when it may go); None when its writer is still running."""
    if owned is None:
        return "its name does not record which process wrote it (an older ckptbridge, or a system without /proc)"
    if owned.group("where") != where:
        return "it was written on another machine, boot or container"
    if pid == os.getpid() or _start_time(pid or 0) == owned.group("start"):
        return None
    if st.st_uid != os.geteuid():
        return "it belongs to another user"
    if stat.S_ISDIR(st.st_mode) and os.path.isdir(os.path.join(path, PREVIOUS_DIR)):
        return f"it holds the previous checkpoint of a forced replace that was killed midway (in {PREVIOUS_DIR}/)"
    return ""


def _remove_stale(path: str, is_dir: bool) -> str | None:
    """Remove a stale temporary: "" when done, why not when it could not be, None when it was already gone."""
    try:
        if is_dir:
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"it could not be removed ({e.strerror})"
    return ""


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: Any = None


def _renameat2_fn() -> Any:
    global _renameat2
    if _renameat2 is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    return _renameat2


# errnos meaning "this file system (or kernel) cannot do that", not "that failed"
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV}


def rename_noreplace(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` in one step that fails with FileExistsError if ``dst``
    exists, even as a dangling symlink.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system have it;
    else ``link`` + ``unlink`` (the link fails if ``dst`` exists); on a file
    system with neither (some network and FAT mounts) a check and a rename,
    which a concurrent writer can still race.
    """
    fn = _renameat2_fn()
    if fn:
        import ctypes

        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), dst)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _place(src: str, dst: str, force: bool) -> None:
    if force:
        os.replace(src, dst)
    else:
        rename_noreplace(src, dst)


def _check_parent(dest: str) -> str:
    parent = _parent_of(dest)
    if not os.path.isdir(parent):
        up = parent
        while up and not os.path.exists(up) and os.path.dirname(up) != up:
            up = os.path.dirname(up)
        if os.path.exists(up) and not os.path.isdir(up):
            raise NotFoundError(f"cannot write {dest}: {up} is a file, not a directory; choose another output location")
        raise NotFoundError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        try:
            read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        what = "read-only file system" if read_only else "permission denied"
        raise CkptBridgeError(f"{what}: cannot write in {parent}; choose another output location")
    return parent


def _parent_of(dest: str) -> str:
    """The directory ``dest``'s files go in: ``out/`` (a prefix with an empty base name, as
    ``Saver.save(sess, "out/")`` writes ``out/.index``) is in ``out``."""
    return os.path.abspath(os.path.dirname(dest) or os.curdir)


class AttachedFile(Protocol):
    """A file object on an :class:`AtomicFile`'s temporary that records write failures for later."""

    def check(self) -> None: ...

    def close(self) -> None: ...

    def fileno(self) -> int: ...


class AtomicFile:
    """A temporary file that becomes ``dest`` on :meth:`commit`."""

    def __init__(self, dest: str, *, force: bool = False) -> None:
        self.dest = dest
        self.force = force
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise OutputExistsError(f"output {dest} is a directory; name a file")
        if os.path.lexists(dest) and not force:
            raise OutputExistsError(f"output {dest} already exists; pass {option('force', True)} to overwrite it")
        parent = _check_parent(dest)
        # Every attribute abort() uses is set before the temporary exists: a signal
        # raised right after it is registered must find abort() able to run.
        self._raw: AttachedFile | None = None
        self._sync: Job | None = None
        self.durable = _durability.fsync_wanted()
        self._done = False
        sweep_stale(dest)
        with signals_deferred():
            fd, self.tmp = tempfile.mkstemp(dir=parent, prefix=_new_tmp_prefix(dest), suffix=TMP_SUFFIX)
            os.close(fd)
            _pending[self.tmp] = self.abort

    def start_writeback(self) -> None:
        """Start writing what is written so far to disk (see :func:`._durability.start_writeback`)."""
        if self.durable:  # without an fsync to shorten, it only slows the writing down
            _durability.start_writeback(self.tmp)

    def start_sync(self) -> None:
        """Start the fsync that :meth:`commit` needs, on a helper thread: the caller
        reads the file back meanwhile (the disk and the CPU work at the same time)."""
        if self._sync is None and not self._done:
            os.chmod(self.tmp, 0o666 & ~_durability.current_umask())
            self._sync = Job(_durability.fsync_files, [self.tmp] if self.durable else [], name="ckptbridge-fsync")

    def attach(self, f: AttachedFile) -> None:
        """Hand over a file object open on :attr:`tmp` (HDF5's ``formats._guarded.GuardedFile``):
        :meth:`commit` raises the write failure it recorded, if any, then closes it;
        :meth:`abort` closes it."""
        self._raw = f

    def fileno(self) -> int:
        """The descriptor of the :meth:`attach`-ed file, for writing raw bytes at known offsets."""
        assert self._raw is not None
        return self._raw.fileno()

    def check_writes(self) -> None:
        """Raise the first failed write through the :meth:`attach`-ed file, if any."""
        if self._raw is not None:
            self._raw.check()

    def commit(self) -> None:
        if self._done:
            return
        raise_if_signalled()
        if self._raw is not None:
            self._raw.check()
            self._raw.close()
        if self._sync is None:
            self.start_sync()
        assert self._sync is not None
        self._sync.wait()
        with signals_deferred():
            try:
                _place(self.tmp, self.dest, self.force)
            except FileExistsError:
                # Another run published it since our check in __init__: theirs stays.
                raise OutputExistsError(f"output {self.dest} already exists (written meanwhile by another process); "
                                        f"pass {option('force', True)} to overwrite it") from None
            _published.append(self.dest)
            _pending.pop(self.tmp, None)
            if self.durable:
                _durability.fsync_dir(os.path.dirname(os.path.abspath(self.dest)))
            self._done = True

    def abort(self) -> None:
        if self._done:
            return
        with signals_deferred():
            self._done = True
            _pending.pop(self.tmp, None)
            if self._raw is not None:
                self._raw.close()
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


PREVIOUS_DIR = "previous"


class AtomicCheckpoint:
    """A temporary directory holding a checkpoint that becomes ``prefix`` on commit.

    Writers write to :attr:`tmp_prefix`.  On commit the data shards and the
    ``.meta`` graph are moved into place first and the ``.index`` last, since
    the index is what makes a V2 checkpoint visible to readers: at every instant
    ``prefix`` is the old checkpoint whole or the new one whole.  The one
    exception is a forced replace whose new data shards have the names of the old
    ones (the same shard count): the old index and data are then hard-linked into
    ``<tmpdir>/previous/`` before the old index is removed, so until the new index
    is in place the old checkpoint stays whole there (a process killed in that
    window leaves it for the user to move back; :mod:`._resolve` says where).

    The directory's ``checkpoint`` state file (what ``tf.train.latest_checkpoint``
    restores) is written when the directory has none, and updated to name
    ``prefix`` as the latest, every earlier checkpoint kept, only with ``force``;
    ``update_state=False`` never touches it.  Any
    update is written and synced before the first rename, and renamed into place
    after the index.  :func:`state_notes` records what was done.
    """

    def __init__(self, prefix: str, *, force: bool = False, update_state: bool = True) -> None:
        self.prefix = prefix
        self.force = force
        self.update_state = update_state
        existing = _taken_names(prefix)
        if existing and not force:
            raise OutputExistsError(f"output checkpoint {prefix} already exists ({os.path.basename(existing[0])}); "
                                    f"pass {option('force', True)} to overwrite it")
        if os.path.isdir(prefix) and not os.path.islink(prefix) and os.path.basename(prefix):
            raise OutputExistsError(f"output prefix {prefix} is a directory; name a checkpoint prefix such as {os.path.join(prefix, 'model.ckpt')}")
        # A checkpoint lives in a directory of its own, as with Saver.save: create it
        # (and remove it again if nothing is published).
        self._created: list[str] = []
        d = _parent_of(prefix)
        while not os.path.exists(d):
            self._created.append(d)
            d = os.path.dirname(d)
        for d in reversed(self._created):
            try:
                os.mkdir(d)
            except OSError as e:
                self._remove_created()
                raise CkptBridgeError(f"cannot create output directory {d} ({e.strerror}); choose another output location") from None
        try:
            self._parent = _check_parent(prefix)
            self._plan_state()  # a state file we would have to update but cannot: refused before any work
        except BaseException:
            self._remove_created()
            raise
        sweep_stale(prefix)
        with signals_deferred():
            self.tmpdir = tempfile.mkdtemp(dir=self._parent, prefix=_new_tmp_prefix(prefix), suffix=TMP_SUFFIX)
            self.tmp_prefix = os.path.join(self.tmpdir, os.path.basename(prefix))
            self._sync: Job | None = None
            self.durable = _durability.fsync_wanted()
            self._done = False
            _pending[self.tmpdir] = self.abort

    def start_writeback(self) -> None:
        """Start writing the data shards written so far to disk (see :func:`._durability.start_writeback`)."""
        if self.durable:
            _durability.start_writeback(*(p for p in glob.glob(os.path.join(glob.escape(self.tmpdir), "*")) if os.path.isfile(p)))

    def start_sync(self) -> None:
        """Start the fsync of every finished file on a helper thread (see :meth:`AtomicFile.start_sync`)."""
        if self._sync is None and not self._done:
            produced = checkpoint_files(self.tmp_prefix)
            mask = _durability.current_umask()
            for src in produced:
                os.chmod(src, 0o666 & ~mask)
            self._sync = Job(_durability.fsync_files, produced if self.durable else [], name="ckptbridge-fsync")

    def _plan_state(self) -> tuple[str, _state.CheckpointState | None, str | None]:
        """(action, the state to write or None, the latest the file names now)."""
        if not self.update_state:
            return "off", None, None
        wanted = self.force
        path = _state.state_path(self._parent)
        basename = os.path.basename(self.prefix)
        if not os.path.lexists(path):
            return "created", _state.with_latest(None, self._parent, basename, time.time()), None
        try:
            current = _state.read_state(self._parent, fix=f"fix or remove it before making {basename} the latest")
        except CkptBridgeError:
            if wanted:
                raise
            return "left", None, None  # not ours to fix, and not needed to leave it as it is
        latest = current.model_checkpoint_path if current is not None else None
        if latest is not None and os.path.normpath(os.path.join(self._parent, latest)) == os.path.normpath(os.path.abspath(self.prefix)):
            return "unchanged", None, latest
        if wanted:
            return "updated", _state.with_latest(current, self._parent, basename, time.time()), latest
        return "left", None, latest

    def _write_state_tmp(self, state: _state.CheckpointState) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.tmpdir, prefix=f".{_state.STATE_NAME}.", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(_state.format_state(state))
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_durability.current_umask())
        return tmp

    def commit(self) -> None:
        if self._done:
            return
        raise_if_signalled()
        produced = checkpoint_files(self.tmp_prefix)
        if not any(_ckptfiles.is_index(p) for p in produced) and not os.path.isfile(self.tmp_prefix):
            raise CkptBridgeError(f"internal error: no checkpoint was written for {self.prefix}")
        if self._sync is None:
            self.start_sync()
        assert self._sync is not None
        self._sync.wait()
        with signals_deferred():
            # Everything that can fail for a reason of its own (a malformed state file, no
            # space for its new text) fails here, while nothing has been renamed yet.
            action, new_state, latest = self._plan_state()
            state_tmp = self._write_state_tmp(new_state) if new_state is not None else None
            old = set(_taken_names(self.prefix))
            placed = self._move_into_place(produced, old)
            _published.append(self.prefix)
            # The old index goes first: a V1 file just placed at the prefix takes over from it.
            for stale in sorted(old - set(placed), key=lambda p: not _ckptfiles.is_index(p)):
                try:
                    os.unlink(stale)
                except FileNotFoundError:
                    pass
            state = _state.state_path(self._parent)
            try:
                if state_tmp is not None:
                    try:
                        _place(state_tmp, state, force=action == "updated")
                    except FileExistsError:  # another process wrote one meanwhile: its choice stands
                        action, latest = "left", None
            except OSError as e:
                self._finish()
                was = f"it still names {latest} as the latest" if latest else "it was not created"
                raise StateFileError(
                    f"checkpoint {self.prefix} was written and is complete, but the state file {state} could not be "
                    f"{'created' if action == 'created' else 'updated'} ({e.strerror}): {was}; fix the cause and write it "
                    f"again, or name the checkpoint prefix when restoring"
                ) from None
            if action != "off":
                kept = len(new_state.all_model_checkpoint_paths) - 1 if new_state is not None and action == "updated" else 0
                _state_notes.append(StateNote(state, self.prefix, action, latest, kept))
            self._finish()

    def _move_into_place(self, produced: list[str], old: set[str]) -> list[str]:
        """Rename the new files to their final names, the index last; return them.

        Without ``force`` no name is ever replaced: if another process took one
        since ``__init__``, what was moved goes back and OutputExistsError is raised.
        """
        dst = {src: self.prefix + src[len(self.tmp_prefix):] for src in produced}
        ordered = sorted(produced, key=_ckptfiles.is_index)  # index last
        old_index = _ckptfiles.index_path(self.prefix)
        if self.force and old_index in old and any(dst[s] in old for s in ordered if not _ckptfiles.is_index(s)):
            self._keep_previous(old, old_index)
        placed: list[str] = []
        try:
            for src in ordered:
                _place(src, dst[src], self.force)
                placed.append(dst[src])
        except FileExistsError as e:
            for src, final in zip(ordered, placed):  # ours alone: nothing was replaced
                try:
                    os.rename(final, src)
                except OSError:
                    os.unlink(final)
            raise OutputExistsError(f"output checkpoint {self.prefix} already exists ({os.path.basename(e.filename or '')} written "
                                    f"meanwhile by another process); pass {option('force', True)} to overwrite it") from None
        return placed

    def _keep_previous(self, old: set[str], old_index: str) -> None:
        """Keep the old checkpoint whole in the temporary directory, then remove its index."""
        keep = os.path.join(self.tmpdir, PREVIOUS_DIR)
        os.mkdir(keep)
        try:
            for f in sorted(old):
                os.link(f, os.path.join(keep, os.path.basename(f)), follow_symlinks=False)
        except OSError:
            # No hard links here: move the old files instead, index first (the prefix then
            # shows no checkpoint rather than a mix of old and new).
            for f in sorted(old, key=lambda p: not _ckptfiles.is_index(p)):
                os.replace(f, os.path.join(keep, os.path.basename(f)))
            return
        if self.durable:
            _durability.fsync_dir(keep)
        os.unlink(old_index)

    def _finish(self) -> None:
        if self.durable:
            _durability.fsync_dir(self._parent)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        _pending.pop(self.tmpdir, None)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        with signals_deferred():
            self._done = True
            _pending.pop(self.tmpdir, None)
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self._remove_created()

    def _remove_created(self) -> None:
        for d in self._created:
            try:
                os.rmdir(d)
            except OSError:
                break


def previous_kept(prefix: str) -> str | None:
    """The prefix of an old checkpoint a killed forced replace of ``prefix`` left whole, if any."""
    d, base = os.path.split(os.path.abspath(prefix))
    found = _kept(d, glob.escape(base))
    return found[-1] if found else None


def previous_kept_in(directory: str) -> list[str]:
    """The prefixes of old checkpoints killed forced replaces left whole in ``directory``, oldest first."""
    return _kept(os.path.abspath(directory), "*")


def _kept(directory: str, base_pattern: str) -> list[str]:
    pattern = os.path.join(glob.escape(directory), ".*" + glob.escape(TMP_SUFFIX), PREVIOUS_DIR, base_pattern + _ckptfiles.INDEX)
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return [f[: -len(_ckptfiles.INDEX)] for f in found]
