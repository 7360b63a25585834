"""The messages stored in a bundle's table: BundleHeaderProto and BundleEntryProto.

Field numbers follow tensorflow/core/protobuf/tensor_bundle.proto,
framework/tensor_shape.proto, tensor_slice.proto and versions.proto.
Also the key under which one slice of a partitioned tensor is stored
(TensorFlow's EncodeTensorNameSlice, built on its OrderedCode).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from .. import _dtypes
from ..io.wire import _U64, _Bad, field_bytes, field_fixed32, field_varint, get_varint, parse_message, to_int32, to_int64

HEADER_KEY = b""
TENSOR_BUNDLE_VERSION = 1    # what TensorFlow writes as VersionDef.producer
LITTLE, BIG = 0, 1

# TensorFlow DataType enum (types.proto) <-> canonical ckptbridge dtype names, for the carried dtypes
# (the table, with the dtypes that are not carried, is ckptbridge._dtypes).
DTYPE_BY_ENUM = {e: d.name for e, d in _dtypes.BY_ENUM.items() if d.carried}
ENUM_BY_DTYPE = {v: k for k, v in DTYPE_BY_ENUM.items()}


def dtype_enum_name(enum: int) -> str:
    d = _dtypes.by_enum(enum)
    return d.name if d is not None else f"DataType {enum}"


@dataclasses.dataclass
class Header:
    num_shards: int = 0
    endianness: int = LITTLE
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: tuple[int, ...] = ()


@dataclasses.dataclass
class Entry:
    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    # One (starts, lengths) pair per stored slice; a length of -1 means the full extent.
    slices: list[tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)


def _ints(wire: int, value: int | bytes, conv: Callable[[int], int]) -> list[int]:
    """A repeated integer field that may be packed (wire type 2) or not."""
    if wire == 0 and isinstance(value, int):
        return [conv(value)]
    if wire == 2 and isinstance(value, bytes):
        out, pos, buf = [], 0, value
        while pos < len(buf):
            v, pos = get_varint(buf, pos, len(buf))
            out.append(conv(v))
        return out
    raise _Bad("integer field with a non-integer wire type")


def _varint(wire: int, value: int | bytes) -> int:
    if wire != 0 or not isinstance(value, int):
        raise _Bad("expected a varint field")
    return value


def _bytes(wire: int, value: int | bytes) -> bytes:
    if wire != 2 or not isinstance(value, bytes):
        raise _Bad("expected a length-delimited field")
    return value


def parse_header(buf: bytes) -> Header:
    h = Header()
    version = b""
    for number, wire, value in parse_message(buf):
        if number == 1:
            h.num_shards = to_int32(_varint(wire, value))
        elif number == 2:
            h.endianness = to_int32(_varint(wire, value))
        elif number == 3:
            version += _bytes(wire, value)    # repeated occurrences merge
    bad: list[int] = []
    for number, wire, value in parse_message(version):
        if number == 1:
            h.producer = to_int32(_varint(wire, value))
        elif number == 2:
            h.min_consumer = to_int32(_varint(wire, value))
        elif number == 3:
            bad += _ints(wire, value, to_int32)
    h.bad_consumers = tuple(bad)
    return h


def encode_header(num_shards: int, endianness: int = LITTLE) -> bytes:
    version = field_varint(1, TENSOR_BUNDLE_VERSION)   # min_consumer 0 is the default: omitted
    out = field_varint(1, num_shards)
    if endianness:
        out += field_varint(2, endianness)
    return out + field_bytes(3, version)


def _parse_shape(buf: bytes | memoryview) -> tuple[int, ...]:
    """A TensorShapeProto's dimensions (refusing an unknown rank)."""
    dims = _shape_as_written(buf)
    return dims if dims is not None else _parse_shape_field_by_field(buf)


def _shape_as_written(buf: bytes | memoryview) -> tuple[int, ...] | None:
    """The dimensions of a TensorShapeProto written as TensorFlow writes one (``dim { size: N }`` fields only),
    in one pass with no per-field objects; None for anything else (a dim's name, unknown_rank, another field,
    damage), which :func:`_parse_shape_field_by_field` then reads or refuses with its own message.

    Whatever this accepts, the field-by-field parser accepts with the same result: the same bounds, the same
    varint rules (multi-byte varints go through :func:`get_varint`), the same last-wins for repeated sizes."""
    dims: list[int] = []
    n = len(buf)
    pos = 0
    try:
        while pos < n:
            if buf[pos] != 0x12 or pos + 1 >= n:   # field 2 (dim), length-delimited, with a length byte
                return None
            length = buf[pos + 1]
            pos += 2
            if length >= 0x80:
                length, pos = get_varint(buf, pos - 1, n)
            end = pos + length
            if end > n:
                return None
            size = 0
            while pos < end:
                if buf[pos] != 0x08 or pos + 1 >= end:   # field 1 (size), a varint inside this dim
                    return None
                v = buf[pos + 1]
                pos += 2
                if v >= 0x80:
                    v, pos = get_varint(buf, pos - 1, end)
                size = v - _U64 if v >> 63 else v
            dims.append(size)
    except _Bad:
        return None
    return tuple(dims)


def _parse_shape_field_by_field(buf: bytes | memoryview) -> tuple[int, ...]:
    dims: list[int] = []
    for number, wire, value in parse_message(buf):
        if number == 2:
            size = 0
            for n2, w2, v2 in parse_message(_bytes(wire, value)):
                if n2 == 1:
                    size = to_int64(_varint(w2, v2))
            dims.append(size)
        elif number == 3 and _varint(wire, value):
            raise _Bad("shape has unknown rank")
    return tuple(dims)


def _parse_slice(buf: bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    starts: list[int] = []
    lengths: list[int] = []
    for number, wire, value in parse_message(buf):
        if number == 1:
            start, length = 0, -1
            for n2, w2, v2 in parse_message(_bytes(wire, value)):
                if n2 == 1:
                    start = to_int64(_varint(w2, v2))
                elif n2 == 2:
                    length = to_int64(_varint(w2, v2))
                    if length < 0:
                        raise _Bad("slice extent has a negative length")
            starts.append(start)
            lengths.append(length)
    return tuple(starts), tuple(lengths)


def parse_entry(buf: bytes | memoryview) -> Entry:
    """A BundleEntryProto; every malformed one raises :class:`_Bad` saying what is wrong."""
    e = _entry_as_written(buf)
    return e if e is not None else _parse_entry_field_by_field(buf)


def _entry_as_written(buf: bytes | memoryview) -> Entry | None:
    """A BundleEntryProto of a tensor stored whole, as TensorFlow writes one, in one pass; None for anything
    else (slices, unknown fields, another wire type, an out-of-range value, damage), which
    :func:`_parse_entry_field_by_field` then reads or refuses, so a damaged entry gets the same message as before.

    An index of 40,000 entries spent most of its opening time in the general field walk."""
    n = len(buf)
    pos = 0
    crc32c = 0
    ints = [0, 0, 0, 0, 0, 0]                  # by field number: 1 dtype, 3 shard_id, 4 offset, 5 size
    shape: bytes | None = None
    while pos < n:
        tag = buf[pos]
        if pos + 1 >= n:
            return None
        if tag == 0x12:                        # 2: shape, length-delimited (repeated ones merge)
            field = _delimited_at(buf, pos, n)
            if field is None:
                return None
            part, pos = field
            shape = part if shape is None else shape + part
        elif tag == 0x35:                      # 6: crc32c, fixed32
            if pos + 5 > n:
                return None
            crc32c = int.from_bytes(buf[pos + 1:pos + 5], "little")
            pos += 5
        elif tag in _VARINT_TAGS:              # 1 dtype, 3 shard_id, 4 offset, 5 size: varints
            v = buf[pos + 1]
            pos += 2
            if v >= 0x80:                      # inline: offsets and sizes take a few bytes
                v &= 0x7F
                shift = 7
                while True:
                    if pos >= n or shift > 63:
                        return None
                    b = buf[pos]
                    pos += 1
                    v |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                if v >> 64:
                    return None
            if tag <= 0x18 and v >> 31:        # dtype or shard_id out of int32's positive range:
                return None                    # the full parser decides
            ints[tag >> 3] = v
        else:
            return None
    dims = _shape_as_written(shape) if shape is not None else ()
    if dims is None:
        return None
    dtype, _, shard, offset, size = ints[1:]
    return Entry(dtype, dims, shard, offset - _U64 if offset >> 63 else offset, size - _U64 if size >> 63 else size, crc32c)


_VARINT_TAGS = frozenset((0x08, 0x18, 0x20, 0x28))


def _delimited_at(buf: bytes | memoryview, pos: int, n: int) -> tuple[bytes, int] | None:
    """The payload of the length-delimited field whose tag is at ``buf[pos]`` and the position after it;
    None where it runs past ``n`` or its length is damaged.  ``pos + 1 < n``."""
    length = buf[pos + 1]
    pos += 2
    if length >= 0x80:
        try:
            length, pos = get_varint(buf, pos - 1, n)
        except _Bad:
            return None
    end = pos + length
    if end > n:
        return None
    return bytes(buf[pos:end]), end


def _parse_entry_field_by_field(buf: bytes | memoryview) -> Entry:
    e = Entry()
    shape = b""
    for number, wire, value in parse_message(buf):
        if number == 1:
            e.dtype = to_int32(_varint(wire, value))
        elif number == 2:
            shape += _bytes(wire, value)      # repeated occurrences merge
        elif number == 3:
            e.shard_id = to_int32(_varint(wire, value))
        elif number == 4:
            e.offset = to_int64(_varint(wire, value))
        elif number == 5:
            e.size = to_int64(_varint(wire, value))
        elif number == 6:
            if wire != 5 or not isinstance(value, int):
                raise _Bad("crc32c field is not a fixed32")
            e.crc32c = value
        elif number == 7:
            e.slices.append(_parse_slice(_bytes(wire, value)))
    e.shape = _parse_shape_field_by_field(shape)
    return e


def encode_entry(dtype: int, shape: tuple[int, ...], shard_id: int, offset: int, size: int, crc_masked: int) -> bytes:
    """Serialize like protobuf does: fields in number order, defaults (zeros) omitted."""
    dims = b"".join(field_bytes(2, field_varint(1, d) if d else b"") for d in shape)
    out = field_varint(1, dtype) + field_bytes(2, dims)
    if shard_id:
        out += field_varint(3, shard_id)
    if offset:
        out += field_varint(4, offset)
    if size:
        out += field_varint(5, size)
    return out + field_fixed32(6, crc_masked)


# --- slice keys (OrderedCode) ----------------------------------------------

_HEADER_BITS = [(0, 0), (0x80, 0), (0xC0, 0), (0xE0, 0), (0xF0, 0), (0xF8, 0),
                (0xFC, 0), (0xFE, 0), (0xFF, 0), (0xFF, 0x80), (0xFF, 0xC0)]
_BITS_TO_LENGTH = [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4,
                   4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 7,
                   7, 7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 10]


def _num_increasing(v: int) -> bytes:
    body = v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""
    return bytes([len(body)]) + body


def _signed_num_increasing(v: int) -> bytes:
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    length = _BITS_TO_LENGTH[x.bit_length()]
    raw = bytearray((v & ((1 << 80) - 1)).to_bytes(10, "big")[10 - length:])
    raw[0] ^= _HEADER_BITS[length][0]
    raw[1] ^= _HEADER_BITS[length][1]
    return bytes(raw)


def _ordered_string(s: bytes) -> bytes:
    escaped = re.sub(rb"[\x00\xff]", lambda m: b"\x00\xff" if m.group() == b"\x00" else b"\xff\x00", s)
    return escaped + b"\x00\x01"


def slice_key(name: bytes, starts: tuple[int, ...], lengths: tuple[int, ...]) -> bytes:
    """The table key holding one slice of ``name`` (TensorFlow's EncodeTensorNameSlice)."""
    out = _num_increasing(0) + _ordered_string(name) + _num_increasing(len(starts))
    for start, length in zip(starts, lengths):
        out += _signed_num_increasing(start) + _signed_num_increasing(length)
    return out
