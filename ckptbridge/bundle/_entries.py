"""The messages stored in a bundle's table: BundleHeaderProto and BundleEntryProto.

Field numbers follow tensorflow/core/protobuf/tensor_bundle.proto,
framework/tensor_shape.proto, tensor_slice.proto and versions.proto.
Also the key under which one slice of a partitioned tensor is stored
(TensorFlow's EncodeTensorNameSlice, built on its OrderedCode).
"""

from __future__ import annotations

import dataclasses
import re

from .. import _dtypes
from ._wire import _Bad, field_bytes, field_fixed32, field_varint, get_varint, parse_message, to_int32, to_int64

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


def _ints(wire: int, value: object, conv) -> list[int]:
    """A repeated integer field that may be packed (wire type 2) or not."""
    if wire == 0:
        return [conv(value)]
    if wire == 2:
        out, pos, buf = [], 0, value
        while pos < len(buf):
            v, pos = get_varint(buf, pos, len(buf))
            out.append(conv(v))
        return out
    raise _Bad("integer field with a non-integer wire type")


def _varint(wire: int, value: object) -> int:
    if wire != 0:
        raise _Bad("expected a varint field")
    return value  # type: ignore[return-value]


def _bytes(wire: int, value: object) -> bytes:
    if wire != 2:
        raise _Bad("expected a length-delimited field")
    return value  # type: ignore[return-value]


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


def _parse_shape(buf: bytes) -> tuple[int, ...]:
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


def parse_entry(buf: bytes) -> Entry:
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
            if wire != 5:
                raise _Bad("crc32c field is not a fixed32")
            e.crc32c = value  # type: ignore[assignment]
        elif number == 7:
            e.slices.append(_parse_slice(_bytes(wire, value)))
    e.shape = _parse_shape(shape)
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
