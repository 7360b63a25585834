"""Protocol-buffer wire format and checksum helpers, just what the bundle needs.

Decoding never trusts its input: every function here raises :class:`_Bad`
(a private signal the callers turn into a CorruptError naming the file and
tensor) instead of IndexError, struct.error or ValueError.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import crc32c as _crc32c

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_U64 = 1 << 64
_MASK_DELTA = 0xA282EAD8


class _Bad(Exception):
    """Malformed bytes; the message says what was wrong."""


# --- crc32c ----------------------------------------------------------------

def crc(data: ReadableBuffer, value: int = 0) -> int:
    """crc32c of a buffer, continuing from ``value``."""
    return _crc32c.crc32c(data, value=value)


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
