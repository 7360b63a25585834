"""An archive written to a URL: any format's sink, writing into scratch space, whose :meth:`publish` uploads.

The format's own sink writes and finishes the archive in a local scratch
directory (``scratch_dir``, else the system temp), and the pipe reads it back
there as it reads back every output; only then does :meth:`UrlSink.publish`
hand the verified file to :class:`ckptbridge.io.upload.Destination`, which
uploads it, checks what the store holds and publishes it.  The scratch
directory is in the process's ledger of temporaries, and removed when the sink
publishes or aborts.  Its free space is checked when the tensors are known
(:meth:`begin`), before a byte is written.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from .._source import ArchiveSink, Encoded, Source
from ..errors import CkptBridgeError, option
from ..io import atomic as _atomic
from ..io.chunks import BlockStream
from ..io.containers import RESERVE_BYTES, Scratch
from ..io.durability import durability
from ..io.signals import signals_deferred
from ..io.upload import Destination, Uploaded
from ..spec import TensorSpec
from . import Format

#: What an archive adds to its tensors' bytes, at most, as the free-space check reckons it: per tensor
#: (a member's headers, a dataset's object header, its metadata record) and for the file.
_PER_TENSOR = 4 << 10
_PER_FILE = 1 << 20


class UrlSink(ArchiveSink):
    """A format's sink writing into scratch space; :meth:`publish` uploads the verified file to the URL."""

    def __init__(self, url: str, fmt: Format, *, compress: bool = False, force: bool = False, source: str | None = None,
                 scratch_dir: str | None = None, progress: bool | None = False) -> None:
        dest = Destination(url, force=force)  # refuses what it can before anything is made
        try:
            self._scratch = Scratch(scratch_dir, kind="upload")
        except BaseException:
            dest.abort()
            raise
        try:
            local = os.path.join(self._scratch.path, url.rstrip("/").rsplit("/", 1)[-1])
            with durability(False):  # the store makes the upload durable; the local copy only has to be read back
                inner = fmt.open_sink(local, compress=compress, force=False, source=source)
        except BaseException:
            dest.abort()
            self._scratch.remove()
            raise
        if not isinstance(inner, ArchiveSink):
            inner.abort()
            dest.abort()
            self._scratch.remove()
            raise CkptBridgeError(f"internal error: the {fmt.name} sink writes no single file, so it cannot be uploaded to {url}")
        super().__init__(dest.url, inner._out)
        inner.path = dest.url  # what its messages name
        self._inner, self._dest, self._local, self._progress = inner, dest, local, progress
        self.streams = inner.streams
        self.source_class = inner.source_class
        self._records = inner._records
        #: what the upload published, once it has
        self.uploaded: Uploaded | None = None

    def begin(self, specs: list[TensorSpec]) -> None:
        self._reserve(specs)
        self._inner.begin(specs)

    def _reserve(self, specs: list[TensorSpec]) -> None:
        """Refuse to start when the scratch space cannot hold the archive (as it would be uncompressed)."""
        need = sum(s.stored_nbytes if s.stored_nbytes is not None else s.nbytes for s in specs)
        need += _PER_TENSOR * len(specs) + _PER_FILE
        free = shutil.disk_usage(self._scratch.path).free
        if need > free - RESERVE_BYTES:
            where = os.path.dirname(self._scratch.path)
            raise CkptBridgeError(f"not enough free space for the local copy of {self.path}: it needs up to {need} bytes and "
                                  f"{where} has {free} free (keeping {RESERVE_BYTES} spare); pass {option('scratch_dir')} with "
                                  "more space, or set TMPDIR")

    def check_name(self, name: str) -> None:
        self._inner.check_name(name)

    def write(self, name: str, array: Any) -> int:
        return self._inner.write(name, array)

    def write_blocks(self, name: str, stream: BlockStream) -> int:
        return self._inner.write_blocks(name, stream)

    def put(self, tensor: Encoded) -> None:
        self._inner.put(tensor)

    def write_extra(self, key: str, payload: bytes) -> None:
        self._inner.write_extra(key, payload)

    def start_writeback(self) -> None:
        self._inner.start_writeback()

    def start_sync(self) -> None:
        self._inner.start_sync()

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        self._inner.finish(metadata)

    @property
    def readback_path(self) -> str:
        return self._inner.readback_path

    def open_readback(self) -> Source:
        return self._inner.open_readback()

    def publish(self) -> None:
        """Put the read-back file at its local name, then upload it: the URL has it, checked, or nothing."""
        with signals_deferred():  # the local copy is no output of the command's: never reported as written
            self._inner.publish()
            _atomic.forget_published(self._local)
        try:
            self.uploaded = self._dest.upload(self._local, progress=self._progress)
        finally:
            self._dest.abort()  # nothing, once it is published
            self._scratch.remove()

    def abort(self) -> None:
        try:
            self._inner.abort()
        finally:
            self._dest.abort()
            self._scratch.remove()
