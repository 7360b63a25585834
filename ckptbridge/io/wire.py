"""Protocol-buffer wire format and checksum helpers, just what the bundle needs.

Messages in memory are split by :func:`iter_fields`; one inside a file (a V1
checkpoint's table block, read by range) is walked by :func:`fields_at` through
a read-ahead :class:`Window`, its large values left unread.

Decoding never trusts its input: every function here raises :class:`_Bad`
(a private signal the callers turn into a CorruptError naming the file and
tensor) instead of IndexError, struct.error or ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import checksum as _checksum

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_U64 = 1 << 64
_MASK_DELTA = 0xA282EAD8


class _Bad(Exception):
    """Malformed bytes; the message says what was wrong."""


# --- crc32c ----------------------------------------------------------------

def crc(data: ReadableBuffer, value: int = 0) -> int:
    """crc32c of a buffer, continuing from ``value``."""
    return _checksum.crc32c(data, value=value)


def mask(c: int) -> int:
    """LevelDB/TensorFlow masked crc: rotate right by 15, add a constant."""
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(m: int) -> int:
    rot = (m - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --- varints ---------------------------------------------------------------

def put_varint(value: int) -> bytes:
    """Unsigned LEB128; negative values are written as their 64-bit two's complement."""
    if value < 0:
        value += _U64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def get_varint(buf: bytes | memoryview, pos: int, limit: int, *, bits: int = 64) -> tuple[int, int]:
    """Decode one varint (at most ``bits`` wide) from ``buf[pos:limit]``; returns (value, new position)."""
    result = 0
    shift = 0
    end = min(limit, pos + (bits + 6) // 7)
    while pos < end:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if result >> bits:
                raise _Bad("varint out of range")
            return result, pos
        shift += 7
    raise _Bad("truncated or overlong varint")


def to_int64(v: int) -> int:
    return v - _U64 if v >= (1 << 63) else v


def to_int32(v: int) -> int:
    v = to_int64(v)
    if not -(1 << 31) <= v < (1 << 31):
        raise _Bad(f"int32 field out of range: {v}")
    return v


# --- messages --------------------------------------------------------------

def parse_message(buf: bytes | memoryview) -> list[tuple[int, int, int | bytes]]:
    """Split a serialized message into (field number, wire type, value) triples.

    Varints come back as unsigned ints, fixed32/64 as ints, length-delimited
    fields as ``bytes``.  Groups are rejected (nothing in a bundle uses them).
    """
    return [(number, wire, bytes(value) if isinstance(value, memoryview) else value) for number, wire, value in iter_fields(buf)]


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Like :func:`parse_message`, one field at a time, and length-delimited fields as
    ``memoryview`` slices of ``buf`` (no copy: V1 checkpoints hold whole tensors in one field)."""
    view = memoryview(buf)
    pos, n = 0, len(view)
    value: int | memoryview
    while pos < n:
        tag, pos = get_varint(view, pos, n)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Bad("field number 0")
        if wire == 0:
            value, pos = get_varint(view, pos, n)
        elif wire == 1:
            if pos + 8 > n:
                raise _Bad("truncated fixed64")
            value = int.from_bytes(view[pos:pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = get_varint(view, pos, n)
            if length > n - pos:
                raise _Bad("length-delimited field runs past its message")
            value = view[pos:pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > n:
                raise _Bad("truncated fixed32")
            value = int.from_bytes(view[pos:pos + 4], "little")
            pos += 4
        else:
            raise _Bad(f"unsupported wire type {wire}")
        yield number, wire, value


def field_varint(number: int, value: int) -> bytes:
    return put_varint(number << 3) + put_varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    return put_varint((number << 3) | 2) + put_varint(len(payload)) + payload


def field_fixed32(number: int, value: int) -> bytes:
    return put_varint((number << 3) | 5) + (value & 0xFFFFFFFF).to_bytes(4, "little")


# --- one field's value, checked to be of the wire type wanted ----------------

def as_varint(wire: int, value: object) -> int:
    """A varint field's value (as :func:`iter_fields` gives it); _Bad for another wire type."""
    if wire != 0 or not isinstance(value, int):
        raise _Bad("expected a varint field")
    return value


def as_varints(wire: int, value: object) -> Iterator[int]:
    """A repeated integer field's values, packed or not, as int64s."""
    if wire == 0 and isinstance(value, int):
        yield value
        return
    if wire != 2 or not isinstance(value, (bytes, memoryview)):
        raise _Bad("integer field with a non-integer wire type")
    buf = value
    pos = 0
    while pos < len(buf):
        v, pos = get_varint(buf, pos, len(buf))
        yield to_int64(v)


def as_bytes(wire: int, value: object) -> Any:
    """A length-delimited field's bytes (a ``memoryview`` slice from :func:`iter_fields`)."""
    if wire != 2:
        raise _Bad("expected a length-delimited field")
    return value


# --- messages inside a file, read through a window ----------------------------

class Window:
    """Small reads of a file (up to offset ``end``) through a read-ahead window: walking a table
    block's entries and a value's field headers costs a few ranged reads, not one per varint."""

    AHEAD = 64 << 10

    def __init__(self, read: Callable[[int, int], Any], end: int) -> None:
        self._read, self._end = read, end
        self._at, self._buf = 0, b""

    def get(self, pos: int, n: int) -> Any:
        """``n`` bytes at file offset ``pos`` (the caller has checked that they lie before ``end``)."""
        at = self._at
        if not (at <= pos and pos + n <= at + len(self._buf)):
            self._buf = self._read(pos, min(self._end - pos, max(n, self.AHEAD)))
            self._at = at = pos
        return self._buf[pos - at:pos - at + n]

    def varint(self, pos: int, limit: int, *, bits: int = 64) -> tuple[int, int]:
        """The varint at ``pos`` (ending before ``limit``) and the offset after it."""
        window = self.get(pos, min(limit - pos, 10))
        value, used = get_varint(window, 0, len(window), bits=bits)
        return value, pos + used


def fields_at(w: Window, lo: int, hi: int) -> Iterator[tuple[int, int, Any]]:
    """:func:`iter_fields` over the message at file bytes [lo, hi), the same checks, but
    length-delimited values come back as (offset, length), unread."""
    pos = lo
    while pos < hi:
        tag, pos = w.varint(pos, hi)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Bad("field number 0")
        value: Any
        if wire == 0:
            value, pos = w.varint(pos, hi)
        elif wire == 1:
            if pos + 8 > hi:
                raise _Bad("truncated fixed64")
            value = int.from_bytes(w.get(pos, 8), "little")
            pos += 8
        elif wire == 2:
            length, pos = w.varint(pos, hi)
            if length > hi - pos:
                raise _Bad("length-delimited field runs past its message")
            value = (pos, length)
            pos += length
        elif wire == 5:
            if pos + 4 > hi:
                raise _Bad("truncated fixed32")
            value = int.from_bytes(w.get(pos, 4), "little")
            pos += 4
        else:
            raise _Bad(f"unsupported wire type {wire}")
        yield number, wire, value


def as_range(wire: int, value: Any) -> tuple[int, int]:
    """A length-delimited field's (offset, length), as :func:`fields_at` gives it."""
    if wire != 2:
        raise _Bad("expected a length-delimited field")
    offset, length = value
    return int(offset), int(length)
