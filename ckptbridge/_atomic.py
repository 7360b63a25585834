"""Outputs that appear whole or not at all.

Everything is written under a temporary name beside the destination (same
directory, so the final rename is atomic), with an unpredictable, recognisable
name: ``.<dest name>.<random>.ckptbridge-tmp``.  A symlink at the destination is
replaced, never written through.  Files end up with the user's umask.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

from .errors import CkptBridgeError, NotFoundError, OutputExistsError

TMP_SUFFIX = ".ckptbridge-tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_parent(dest: str) -> str:
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise NotFoundError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise CkptBridgeError(f"permission denied: cannot write in {parent}; choose another output location")
    return parent


class AtomicFile:
    """A temporary file that becomes ``dest`` on :meth:`commit`."""

    def __init__(self, dest: str, *, force: bool = False) -> None:
        self.dest = dest
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise OutputExistsError(f"output {dest} is a directory; name a file")
        if os.path.lexists(dest) and not force:
            raise OutputExistsError(f"output {dest} already exists; pass --force to overwrite it")
        parent = _check_parent(dest)
        fd, self.tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(dest)}.", suffix=TMP_SUFFIX)
        os.close(fd)
        self._done = False

    def commit(self) -> None:
        if self._done:
            return
        os.chmod(self.tmp, 0o666 & ~_umask())
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.dest)
        _fsync_dir(os.path.dirname(os.path.abspath(self.dest)))
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def checkpoint_files(prefix: str) -> list[str]:
    """The files that make up the checkpoint at ``prefix`` (index, data shards, meta)."""
    found = [prefix + ".index", prefix + ".meta", prefix]
    found = [p for p in found if os.path.isfile(p)]
    found += sorted(glob.glob(glob.escape(prefix) + ".data-?????-of-?????"))
    return found


class AtomicCheckpoint:
    """A temporary directory holding a checkpoint that becomes ``prefix`` on commit.

    Writers write to :attr:`tmp_prefix`.  On commit the data shards and the
    ``.meta`` graph are moved into place first and the ``.index`` last, since
    the index is what makes a V2 checkpoint visible to readers.  Stale shards
    of an overwritten checkpoint are removed only after the new one is whole.
    """

    def __init__(self, prefix: str, *, force: bool = False, update_state: bool = True) -> None:
        self.prefix = prefix
        self.update_state = update_state
        existing = checkpoint_files(prefix)
        if existing and not force:
            raise OutputExistsError(f"output checkpoint {prefix} already exists ({os.path.basename(existing[0])}); pass --force to overwrite it")
        if os.path.isdir(prefix):
            raise OutputExistsError(f"output prefix {prefix} is a directory; name a checkpoint prefix such as {os.path.join(prefix, 'model.ckpt')}")
        # A checkpoint lives in a directory of its own, as with Saver.save: create it
        # (and remove it again if nothing is published).
        self._created: list[str] = []
        d = os.path.dirname(os.path.abspath(prefix))
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
            parent = _check_parent(prefix)
        except BaseException:
            self._remove_created()
            raise
        self.tmpdir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(prefix)}.", suffix=TMP_SUFFIX)
        self.tmp_prefix = os.path.join(self.tmpdir, os.path.basename(prefix))
        self._done = False

    def commit(self) -> None:
        if self._done:
            return
        old = set(checkpoint_files(self.prefix))
        produced = checkpoint_files(self.tmp_prefix)
        if not any(p.endswith(".index") for p in produced) and not os.path.isfile(self.tmp_prefix):
            raise CkptBridgeError(f"internal error: no checkpoint was written for {self.prefix}")
        mask = _umask()
        ordered = sorted(produced, key=lambda p: p.endswith(".index"))  # index last
        placed = []
        for src in ordered:
            dst = self.prefix + src[len(self.tmp_prefix):]
            os.chmod(src, 0o666 & ~mask)
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            os.replace(src, dst)
            placed.append(dst)
        for stale in old - set(placed):
            os.unlink(stale)
        parent = os.path.dirname(os.path.abspath(self.prefix))
        if self.update_state:
            write_checkpoint_state(parent, os.path.basename(self.prefix))
        _fsync_dir(parent)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for d in self._created:
            try:
                os.rmdir(d)
            except OSError:
                break


def write_checkpoint_state(directory: str, basename: str) -> None:
    """Write the ``checkpoint`` file (a text proto) naming ``basename`` as the latest."""
    text = f'model_checkpoint_path: "{basename}"\nall_model_checkpoint_paths: "{basename}"\n'
    state = os.path.join(directory, "checkpoint")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, state)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
