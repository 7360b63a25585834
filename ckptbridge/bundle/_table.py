"""The sorted key/value table of a bundle's ``.index`` file (LevelDB's SSTable layout).

File: data blocks, a metaindex block, an index block, then a 48-byte footer.
Each block is followed by a 5-byte trailer: a compression type byte and the
masked crc32c of the block contents plus that type byte.  Block entries share
key prefixes with their predecessor; restart points (fixed32 offsets at the
block's end, then their count) mark entries that store their whole key.

Blocks may be snappy-compressed (trailer type 1).  TensorFlow never writes
them (its V1 and V2 writers both ask for no compression) but its readers accept
them, so we decode them too, with the small decoder below: index blocks are a
few hundred KiB at most, where pure Python takes milliseconds, and no new
dependency is needed for files that hardly exist.

Two readers: :func:`read_table` walks every entry of a small table (a V2
``.index``); :class:`Table` opens a large one lazily (a V1 checkpoint, whose
values are whole tensors): only its index block at first, then a data block when
a key in it is looked up.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from ..io.wire import _Bad, crc, get_varint, mask, put_varint

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48            # two padded block handles (2 * 20 bytes) + 8 magic bytes
HANDLES_SIZE = 40
TRAILER_SIZE = 5
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1
BLOCK_SIZE = 262144          # TensorFlow's table::Options default
RESTART_INTERVAL = 16

# Key memory.  A block entry stores only the bytes its key does not share with the
# previous key, so a few bytes on disk can stand for a key of any length, and every
# key read is kept.  Two bounds keep that proportional to the file:
#  - MAX_KEY_BYTES for one key.  Keys are tensor names (a slice key adds at most
#    about 20 bytes per dimension).  TensorFlow sets no limit of its own, but real
#    names are paths of scope names: a few hundred bytes for deep TF2 object paths
#    with optimizer slots.  64 times that is still far from any real checkpoint,
#    and below zip's 65535-byte member names, so every key can be exported.
#  - KEY_BYTES_PER_INDEX_BYTE for all keys together, relative to the file.  Every
#    RESTART_INTERVAL-th entry stores its whole key, and each key is at most its
#    predecessor plus its own stored bytes, so a table written with TensorFlow's
#    interval of 16 holds at most 16 key bytes per stored byte (a real one about
#    10: 1M tensors with 300-byte names take ~300 MB of keys in a ~40 MB index).
#    Twice that, plus KEY_BYTES_SLACK for tiny tables, is refused before the keys
#    are built.
MAX_KEY_BYTES = 16384
KEY_BYTES_PER_INDEX_BYTE = 32
KEY_BYTES_SLACK = 1 << 20


class SnappyBlock(Exception):
    """No longer raised: snappy blocks are decoded (:func:`snappy_decompress`).  Kept while
    ``reader.py`` still names it in an ``except`` clause."""


# --- snappy ------------------------------------------------------------------
#
# Snappy's block format (google/snappy, format_description.txt): a varint32 with the
# uncompressed length, then elements, each starting with a tag byte whose low two
# bits say what it is:
#   0  literal: length-1 in the upper six bits; 60..63 there mean the length-1
#      follows in 1..4 little-endian bytes; then that many bytes to copy out;
#   1  copy, 1-byte offset: length 4..11 in bits 2-4, offset's high 3 bits in 5-7,
#      its low 8 bits in the next byte;
#   2  copy, 2-byte offset: length 1..64 in the upper six bits, offset in 2 bytes;
#   3  copy, 4-byte offset: the same with a 4-byte offset.
# A copy repeats ``length`` bytes starting ``offset`` bytes back in the output
# (offset < length repeats a pattern).  The best ratio any element achieves is a
# 3-byte copy of 64 bytes, so an honest stream never claims more than about 21.4
# times its own size: a larger claim is refused before anything is allocated.
SNAPPY_MAX_RATIO = 22


def snappy_decompress(src: bytes | memoryview, what: str = "snappy") -> bytes:
    """Decode one snappy block (raw format, no framing); raises _Bad on anything malformed."""
    n = len(src)
    length, pos = get_varint(src, 0, n, bits=32)
    if length > SNAPPY_MAX_RATIO * n:
        raise _Bad(f"{what} block claims {length} uncompressed bytes, more than its {n} compressed bytes can hold")
    src = bytes(src)
    out = bytearray()
    while pos < n:
        tag = src[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                if extra > n - pos:
                    raise _Bad(f"{what} block: a literal's length runs past the block")
                size = int.from_bytes(src[pos:pos + extra], "little")
                pos += extra
            size += 1
            if size > n - pos or size > length - len(out):
                raise _Bad(f"{what} block: a literal runs past the block or the claimed length")
            out += src[pos:pos + size]
            pos += size
            continue
        if kind == 1:
            if pos >= n:
                raise _Bad(f"{what} block: a copy runs past the block")
            size = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | src[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            if width > n - pos:
                raise _Bad(f"{what} block: a copy runs past the block")
            size = 1 + (tag >> 2)
            offset = int.from_bytes(src[pos:pos + width], "little")
            pos += width
        if offset == 0 or offset > len(out):
            raise _Bad(f"{what} block: a copy reaches before the start of the output")
        if size > length - len(out):
            raise _Bad(f"{what} block: a copy runs past the claimed length")
        start = len(out) - offset
        if offset >= size:
            out += out[start:start + size]
        else:
            out += (out[start:] * (size // offset + 1))[:size]
    if len(out) != length:
        raise _Bad(f"{what} block decodes to {len(out)} bytes, not the {length} it claims")
    return bytes(out)


class KeyTooLong(_Bad):
    """A key is longer than MAX_KEY_BYTES; ``head`` is its first bytes, ``length`` its length."""

    def __init__(self, head: bytes, length: int) -> None:
        super().__init__(f"a key of {length} bytes is longer than the {MAX_KEY_BYTES} bytes the native engine accepts")
        self.head = head
        self.length = length


def has_magic(tail: bytes) -> bool:
    return len(tail) >= 8 and int.from_bytes(tail[-8:], "little") == MAGIC


def is_table_file(path: str) -> bool:
    """Whether ``path`` is a file that ends with the table magic number (cheap; reads 8 bytes)."""
    import os

    try:
        if not os.path.isfile(path) or os.path.getsize(path) < FOOTER_SIZE:
            return False
        with open(path, "rb") as f:
            f.seek(-8, os.SEEK_END)
            return has_magic(f.read(8))
    except OSError:
        return False


def _handle(buf: bytes, pos: int, limit: int) -> tuple[int, int, int]:
    offset, pos = get_varint(buf, pos, limit)
    size, pos = get_varint(buf, pos, limit)
    return offset, size, pos


def _read_block(data: Any, offset: int, size: int, end: int, what: str, budget: _KeyBudget | None = None,
                verify: bool = True) -> Any:
    """A block's contents (decompressed), its trailer's crc checked unless ``verify`` is false.

    ``data`` is bytes or a memoryview (then an uncompressed block comes back as a view, no copy).
    A snappy block grants ``budget`` key bytes for what it adds by decompressing."""
    if offset > end or size > end - offset or TRAILER_SIZE > end - offset - size:
        raise _Bad(f"{what} block handle (offset {offset}, size {size}) points outside the table")
    raw = data[offset:offset + size + TRAILER_SIZE]   # one read: a ranged file fetches the block and its trailer at once
    contents = raw[:size]
    btype = raw[size]
    if verify:
        stored = int.from_bytes(raw[size + 1:size + TRAILER_SIZE], "little")
        if mask(crc(bytes([btype]), crc(contents))) != stored:
            raise _Bad(f"{what} block at offset {offset} fails its crc32c check")
    if btype == SNAPPY_COMPRESSION:
        contents = snappy_decompress(contents, f"{what} block at offset {offset}: snappy-compressed")
        if budget is not None:
            budget.grant(len(contents) - size)
    elif btype != NO_COMPRESSION:
        raise _Bad(f"{what} block at offset {offset} has unknown compression type {btype}")
    return contents


class KeysTooLarge(_Bad):
    """The keys together would take more memory than any real table of this size needs."""


class _KeyBudget:
    """The key bytes a table may still build (see KEY_BYTES_PER_INDEX_BYTE)."""

    def __init__(self, table_size: int) -> None:
        self.total = KEY_BYTES_PER_INDEX_BYTE * table_size + KEY_BYTES_SLACK
        self.left = self.total

    def grant(self, extra_bytes: int) -> None:
        """More table bytes to allow keys for: what a compressed block adds by decompressing
        (so the bound is per byte of the uncompressed table; snappy's ratio keeps that finite)."""
        self.total += KEY_BYTES_PER_INDEX_BYTE * max(0, extra_bytes)
        self.left += KEY_BYTES_PER_INDEX_BYTE * max(0, extra_bytes)

    def spend(self, key: bytes, shared: int, non_shared: int, block: bytes, pos: int) -> None:
        """Check a key of ``shared + non_shared`` bytes before it is built."""
        length = shared + non_shared
        if length > MAX_KEY_BYTES:
            raise KeyTooLong(key[:min(shared, 64)] + block[pos:pos + max(0, 64 - shared)], length)
        self.left -= length
        if self.left < 0:
            raise KeysTooLarge(f"its keys would take more than {self.total} bytes of memory ({KEY_BYTES_PER_INDEX_BYTE} per "
                               "byte of the index: most of them are stored as a few bytes after a long shared prefix, "
                               "which no table TensorFlow writes does)")


def _block_entries(block: bytes, what: str, budget: _KeyBudget | None = None) -> Iterator[tuple[bytes, bytes]]:
    n = len(block)
    if n < 4:
        raise _Bad(f"{what} block is too short ({n} bytes) to hold its restart count")
    num_restarts = int.from_bytes(block[n - 4:], "little")
    if num_restarts > (n - 4) // 4:
        raise _Bad(f"{what} block claims {num_restarts} restart points, more than fit in {n} bytes")
    limit = n - 4 - 4 * num_restarts
    restarts = {int.from_bytes(block[limit + 4 * i:limit + 4 * i + 4], "little") for i in range(num_restarts)}
    if any(r >= limit and not (r == 0 and limit == 0) for r in restarts):
        raise _Bad(f"{what} block has a restart point outside its entries")
    key = b""
    pos = 0
    while pos < limit:
        start = pos
        # Three varints, nearly always one byte each: read those inline, the rest (and damage) by get_varint.
        if pos + 3 <= limit and block[pos] < 0x80 and block[pos + 1] < 0x80 and block[pos + 2] < 0x80:
            shared, non_shared, value_len = block[pos], block[pos + 1], block[pos + 2]
            pos += 3
        else:
            shared, pos = get_varint(block, pos, limit, bits=32)
            non_shared, pos = get_varint(block, pos, limit, bits=32)
            value_len, pos = get_varint(block, pos, limit, bits=32)
        if shared > len(key):
            raise _Bad(f"{what} block entry shares {shared} key bytes but the previous key has {len(key)}")
        if start in restarts and shared:
            raise _Bad(f"{what} block entry at a restart point shares key bytes")
        if non_shared > limit - pos or value_len > limit - pos - non_shared:
            raise _Bad(f"{what} block entry runs past the end of its block")
        if budget is not None:
            budget.spend(key, shared, non_shared, block, pos)
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


def read_table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield every (key, value) of a table in stored order; keys must be strictly increasing."""
    if len(data) < FOOTER_SIZE:
        raise _Bad(f"file is {len(data)} bytes, shorter than the {FOOTER_SIZE}-byte table footer")
    footer_at = len(data) - FOOTER_SIZE
    if not has_magic(data):
        raise _Bad("the table footer's magic number is missing")
    _, _, pos = _handle(data, footer_at, footer_at + HANDLES_SIZE)   # metaindex: unused
    idx_off, idx_size, _ = _handle(data, pos, footer_at + HANDLES_SIZE)
    budget = _KeyBudget(len(data))
    index = _read_block(data, idx_off, idx_size, footer_at, "index", budget)
    last: bytes | None = None
    prev_index_key: bytes | None = None
    for index_key, handle in _block_entries(index, "index", budget):
        if prev_index_key is not None and index_key <= prev_index_key:
            raise _Bad("index block keys are out of order")
        prev_index_key = index_key
        off, size, used = _handle(handle, 0, len(handle))
        if used != len(handle):
            raise _Bad("index block entry holds trailing bytes after its block handle")
        block = _read_block(data, off, size, footer_at, "data", budget)
        for key, value in _block_entries(block, "data", budget):
            if last is not None and key <= last:
                raise _Bad("table keys are out of order or repeated")
            if key > index_key:
                raise _Bad("a data block holds a key beyond its index entry")
            last = key
            yield key, value


class Table:
    """A table opened lazily over ``data`` (bytes, a memoryview of a memory-mapped file, or
    ``_ranged.SliceableFile``: anything with ``len`` and slicing to bytes).

    Opening reads the footer and the index block (its crc always checked).  A data
    block is read, checked (unless ``verify`` is false) and parsed when one of its
    keys is looked up; the last few parsed blocks are kept.  Values come back as
    memoryviews of ``data`` (of the decompressed block for snappy blocks).

    The checks :func:`read_table` makes over the whole table hold block by block:
    keys strictly increase inside a block, stay at or below the block's index key
    and above the previous block's, and every key is at most MAX_KEY_BYTES long,
    with the keys of one block bounded by KEY_BYTES_PER_INDEX_BYTE per block byte.
    """

    KEEP_BLOCKS = 4

    def __init__(self, data: Any, *, verify: bool = True) -> None:
        if len(data) < FOOTER_SIZE:
            raise _Bad(f"file is {len(data)} bytes, shorter than the {FOOTER_SIZE}-byte table footer")
        self.data = data
        self.verify = verify
        self.end = len(data) - FOOTER_SIZE
        footer = bytes(data[self.end:])   # one read, then parsed from memory
        if int.from_bytes(footer[HANDLES_SIZE:], "little") != MAGIC:
            raise _Bad("the table footer's magic number is missing")
        _, _, pos = _handle(footer, 0, HANDLES_SIZE)   # metaindex: unused
        idx_off, idx_size, _ = _handle(footer, pos, HANDLES_SIZE)
        budget = _KeyBudget(idx_size)
        index = _read_block(data, idx_off, idx_size, self.end, "index", budget)
        self.keys: list[bytes] = []
        self.handles: list[tuple[int, int]] = []
        for key, handle in _block_entries(index, "index", budget):
            if self.keys and key <= self.keys[-1]:
                raise _Bad("index block keys are out of order")
            off, size, used = _handle(handle, 0, len(handle))
            if used != len(handle):
                raise _Bad("index block entry holds trailing bytes after its block handle")
            if off > self.end or size > self.end - off or TRAILER_SIZE > self.end - off - size:
                raise _Bad(f"data block handle (offset {off}, size {size}) points outside the table")
            self.keys.append(bytes(key))
            self.handles.append((off, size))
        self._cache: dict[int, dict[bytes, Any]] = {}

    def __len__(self) -> int:
        """The number of data blocks."""
        return len(self.keys)

    def block(self, i: int) -> dict[bytes, Any]:
        """Data block ``i``'s entries, key -> value, in stored order."""
        found = self._cache.pop(i, None)
        if found is None:
            off, size = self.handles[i]
            budget = _KeyBudget(size)
            block = _read_block(self.data, off, size, self.end, "data", budget, verify=self.verify)
            found = {}
            last = self.keys[i - 1] if i else None
            for key, value in _block_entries(block, "data", budget):
                if last is not None and key <= last:
                    raise _Bad("table keys are out of order or repeated")
                if key > self.keys[i]:
                    raise _Bad("a data block holds a key beyond its index entry")
                last = key
                found[key] = value
            while len(self._cache) >= self.KEEP_BLOCKS:
                self._cache.pop(next(iter(self._cache)))
        self._cache[i] = found
        return found

    def get(self, key: bytes) -> Any | None:
        """The value stored under ``key``, or None."""
        i = bisect.bisect_left(self.keys, key)
        if i == len(self.keys):
            return None
        return self.block(i).get(key)

    def first(self) -> tuple[bytes, Any] | None:
        """The table's first entry, or None for an empty table."""
        for i in range(len(self.keys)):
            entries = self.block(i)
            if entries:
                key = next(iter(entries))
                return key, entries[key]
        return None


class TableBuilder:
    """Builds an uncompressed table in memory from keys added in increasing order.

    The ``.index`` holds only small entries (a few dozen bytes per tensor), so
    building it in memory is fine even for very large checkpoints.
    """

    def __init__(self, *, block_size: int = BLOCK_SIZE, restart_interval: int = RESTART_INTERVAL) -> None:
        self.out = bytearray()
        self.block_size = block_size
        self.restart_interval = restart_interval
        self.index: list[tuple[bytes, bytes]] = []
        self.last_key: bytes | None = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0

    @staticmethod
    def _encode_block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
        block = bytearray()
        restarts = [0]
        prev = b""
        for i, (key, value) in enumerate(entries):
            shared = 0
            if i % restart_interval == 0:
                if i:
                    restarts.append(len(block))
            else:
                limit = min(len(prev), len(key))
                while shared < limit and prev[shared] == key[shared]:
                    shared += 1
            block += put_varint(shared) + put_varint(len(key) - shared) + put_varint(len(value))
            block += key[shared:] + value
            prev = key
        for r in restarts:
            block += r.to_bytes(4, "little")
        block += len(restarts).to_bytes(4, "little")
        return bytes(block)

    def _write_block(self, contents: bytes) -> bytes:
        handle = put_varint(len(self.out)) + put_varint(len(contents))
        self.out += contents
        self.out.append(NO_COMPRESSION)
        self.out += mask(crc(bytes([NO_COMPRESSION]), crc(contents))).to_bytes(4, "little")
        return handle

    def add(self, key: bytes, value: bytes) -> None:
        if self.last_key is not None and key <= self.last_key:
            raise ValueError("table keys must be added in strictly increasing order")
        self.last_key = key
        self._pending.append((key, value))
        self._pending_bytes += len(key) + len(value) + 8
        if self._pending_bytes >= self.block_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        handle = self._write_block(self._encode_block(self._pending, self.restart_interval))
        # The index key must be >= every key of this block and < every key of
        # the next one; the block's last key is the simplest such separator.
        self.index.append((self._pending[-1][0], handle))
        self._pending = []
        self._pending_bytes = 0

    def finish(self) -> bytes:
        self._flush()
        meta_handle = self._write_block(self._encode_block([], 1))
        index_handle = self._write_block(self._encode_block(self.index, 1))
        footer = meta_handle + index_handle
        footer += b"\0" * (HANDLES_SIZE - len(footer))
        footer += MAGIC.to_bytes(8, "little")
        self.out += footer
        return bytes(self.out)
