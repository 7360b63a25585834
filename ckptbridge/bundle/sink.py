"""A graph-free checkpoint sink on the native writer, published atomically."""

from __future__ import annotations

from typing import Any

from .._source import Encoded, Sink, Source
from ..io.atomic import AtomicCheckpoint
from ..io.chunks import BlockStream
from ..spec import TensorSpec
from .reader import BundleReader
from .writer import BundleWriter, check_keys


class NativeCheckpointSink(Sink):
    """Streams tensors into a V2 checkpoint in a temporary directory; publish moves it into place."""

    streams = True
    _out: AtomicCheckpoint

    def __init__(self, prefix: str, *, force: bool = False, max_shard_bytes: int | None = None, update_state: bool = True) -> None:
        super().__init__(prefix)
        self._out = AtomicCheckpoint(prefix, force=force, update_state=update_state)
        try:
            self._writer = BundleWriter(self._out.tmp_prefix, max_shard_bytes=max_shard_bytes)
        except BaseException:
            self._out.abort()
            raise

    def begin(self, specs: list[TensorSpec]) -> None:
        check_keys([s.name for s in specs], self.path)  # every bad name refused before the first byte

    def check_name(self, name: str) -> None:
        self._writer.check_name(name)

    def put(self, tensor: Encoded) -> None:
        self._writer.put(tensor)

    def put_blocks(self, name: str, stream: BlockStream) -> None:
        self._writer.put_blocks(name, stream)

    def write_extra(self, key: str, payload: bytes) -> None:
        self._writer.write_extra(key, payload)

    @property
    def readback_path(self) -> str:
        return self._out.tmp_prefix

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        self._writer.finish(metadata)

    def open_readback(self) -> Source:
        return BundleReader(self._out.tmp_prefix, verify=True)

    def abort(self) -> None:
        try:
            self._writer.abort()
        finally:
            self._out.abort()
