"""The sorted key/value table of a bundle's ``.index`` file (LevelDB's SSTable layout).

File: data blocks, a metaindex block, an index block, then a 48-byte footer.
Each block is followed by a 5-byte trailer: a compression type byte and the
masked crc32c of the block contents plus that type byte.  Block entries share
key prefixes with their predecessor; restart points (fixed32 offsets at the
block's end, then their count) mark entries that store their whole key.
"""

from __future__ import annotations

from collections.abc import Iterator

from ._wire import _Bad, crc, get_varint, mask, put_varint

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
    """A block is snappy-compressed, which the native engine does not decode."""


class KeyTooLong(_Bad):
    """A key is longer than MAX_KEY_BYTES; ``head`` is its first bytes, ``length`` its length."""

    def __init__(self, head: bytes, length: int) -> None:
        super().__init__(f"a key of {length} bytes is longer than the {MAX_KEY_BYTES} bytes the native engine accepts")
        self.head = head
        self.length = length


def has_magic(tail: bytes) -> bool:
    return len(tail) >= 8 and int.from_bytes(tail[-8:], "little") == MAGIC


def _handle(buf: bytes, pos: int, limit: int) -> tuple[int, int, int]:
    offset, pos = get_varint(buf, pos, limit)
    size, pos = get_varint(buf, pos, limit)
    return offset, size, pos


def _read_block(data: bytes, offset: int, size: int, end: int, what: str) -> bytes:
    if offset > end or size > end - offset or TRAILER_SIZE > end - offset - size:
        raise _Bad(f"{what} block handle (offset {offset}, size {size}) points outside the table")
    contents = data[offset:offset + size]
    btype = data[offset + size]
    stored = int.from_bytes(data[offset + size + 1:offset + size + TRAILER_SIZE], "little")
    if mask(crc(bytes([btype]), crc(contents))) != stored:
        raise _Bad(f"{what} block at offset {offset} fails its crc32c check")
    if btype == SNAPPY_COMPRESSION:
        raise SnappyBlock()
    if btype != NO_COMPRESSION:
        raise _Bad(f"{what} block at offset {offset} has unknown compression type {btype}")
    return contents


class KeysTooLarge(_Bad):
    """The keys together would take more memory than any real table of this size needs."""


class _KeyBudget:
    """The key bytes a table may still build (see KEY_BYTES_PER_INDEX_BYTE)."""

    def __init__(self, table_size: int) -> None:
        self.total = KEY_BYTES_PER_INDEX_BYTE * table_size + KEY_BYTES_SLACK
        self.left = self.total

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
    index = _read_block(data, idx_off, idx_size, footer_at, "index")
    budget = _KeyBudget(len(data))
    last: bytes | None = None
    prev_index_key: bytes | None = None
    for index_key, handle in _block_entries(index, "index", budget):
        if prev_index_key is not None and index_key <= prev_index_key:
            raise _Bad("index block keys are out of order")
        prev_index_key = index_key
        off, size, used = _handle(handle, 0, len(handle))
        if used != len(handle):
            raise _Bad("index block entry holds trailing bytes after its block handle")
        block = _read_block(data, off, size, footer_at, "data")
        for key, value in _block_entries(block, "data", budget):
            if last is not None and key <= last:
                raise _Bad("table keys are out of order or repeated")
            if key > index_key:
                raise _Bad("a data block holds a key beyond its index entry")
            last = key
            yield key, value


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
