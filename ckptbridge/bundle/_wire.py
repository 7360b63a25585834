"""The protobuf wire helpers' old place, kept for tools outside the package that craft bundles
byte by byte (fuzzers, the hostile-input reproductions): they live in :mod:`ckptbridge.io.wire`
since the tree was split into layers.  Nothing in the package imports this; it goes at 1.0."""

from ..io.wire import crc, field_bytes, field_fixed32, field_varint, get_varint, mask, put_varint

__all__ = ["crc", "field_bytes", "field_fixed32", "field_varint", "get_varint", "mask", "put_varint"]
