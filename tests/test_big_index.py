"""Large indexes open fast and read the same: the one-pass entry parser against the field-by-field one.

An index of 40,000 entries took about 3 s to open, most of it in the general
protobuf field walk of every BundleEntryProto.  Entries written as TensorFlow
writes them (a tensor stored whole, fields in number order, ``dim { size }``
shapes) now take a one-pass parser; anything else (slices, unknown fields, other
wire types, damage) goes to the field-by-field parser, so damaged entries get
the same message as before.  The speed is measured in benchmarks/ (``ls_big``),
not here; these tests check that the fast path is taken and changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptbridge
from ckptbridge.bundle import _entries
from ckptbridge.io.wire import _Bad, field_bytes, field_fixed32, field_varint

from helpers import cli, write_checkpoint

DTYPES = [1, 2, 3, 7, 9, 10, 14, 19, 21, 99, 1 << 31, (1 << 64) - 1]
DIMS = st.sampled_from([0, 1, 3, 127, 128, 300, 1 << 20, 1 << 40, (1 << 63) - 1, -1])


def outcome(parse: Any, buf: bytes | memoryview) -> tuple[Any, ...]:
    """What a parser makes of ``buf``: the entry's fields, or the message it refuses it with."""
    try:
        e = parse(buf)
    except _Bad as err:
        return ("refused", str(err))
    if isinstance(e, tuple):
        return ("shape", e)
    return ("entry", e.dtype, e.shape, e.shard_id, e.offset, e.size, e.crc32c, e.slices)


@st.composite
def entries(draw: Any) -> bytes:
    """An entry as the native writer and TensorFlow write it, then perhaps grown by odd fields and damaged."""
    shape = tuple(draw(st.lists(DIMS, max_size=5)))
    buf = bytearray(_entries.encode_entry(draw(st.sampled_from(DTYPES)), shape, draw(st.sampled_from([0, 1, 300, 1 << 31])),
                                          draw(st.sampled_from([0, 5, 1 << 33, -1])), draw(st.sampled_from([0, 1, 200, -7])),
                                          draw(st.integers(0, (1 << 32) - 1))))
    extra = draw(st.sampled_from(["", "shape part", "slice", "unknown field", "dim name", "unknown rank", "crc as varint"]))
    buf += {"": b"", "shape part": field_bytes(2, field_bytes(2, field_varint(1, 5))),
            "slice": field_bytes(7, field_bytes(1, field_varint(1, 2))), "unknown field": field_varint(9, 1),
            "dim name": field_bytes(2, field_bytes(2, field_bytes(2, b"x"))), "unknown rank": field_bytes(2, field_varint(3, 1)),
            "crc as varint": field_varint(6, 3)}[extra]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(buf)))
        if kind == "flip" and at < len(buf):
            buf[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del buf[at:]
        else:
            buf.insert(at, draw(st.integers(0, 255)))
    return bytes(buf)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries())
def test_entries_parse_as_the_field_by_field_parser_parses_them(raw: bytes) -> None:
    for buf in (raw, memoryview(raw)):
        assert outcome(_entries.parse_entry, buf) == outcome(_entries._parse_entry_field_by_field, buf)


@settings(max_examples=800, deadline=None)
@given(st.lists(DIMS, max_size=6), st.binary(max_size=4), st.integers(0, 40))
def test_shapes_parse_as_the_field_by_field_parser_parses_them(dims: list[int], junk: bytes, at: int) -> None:
    good = b"".join(field_bytes(2, field_varint(1, d) if d else b"") for d in dims)
    for raw in (good, good[:at] + junk + good[at:], good[:at]):
        assert outcome(_entries._parse_shape, raw) == outcome(_entries._parse_shape_field_by_field, raw)


def test_entries_as_written_take_the_one_pass_parser() -> None:
    # What the writers produce must not fall back, or the speed-up is lost without any test failing.
    for shape in [(), (0,), (3, 3, 64, 128), (1 << 40,), (2, 0, 300)]:
        raw = _entries.encode_entry(1, shape, 2, 1 << 33, 1234, 0xDEADBEEF)
        e = _entries._entry_as_written(raw)
        assert e is not None and (e.dtype, e.shape, e.shard_id, e.offset, e.size, e.crc32c) == (1, shape, 2, 1 << 33, 1234, 0xDEADBEEF)
    sliced = _entries.encode_entry(1, (4,), 0, 0, 0, 0) + field_bytes(7, b"")
    assert _entries._entry_as_written(sliced) is None        # partitioned: the field-by-field parser
    assert _entries._entry_as_written(_entries.encode_entry(1, (4,), 0, 0, 16, 0) + field_fixed32(6, 7)).crc32c == 7  # last wins


def test_a_40000_entry_index_lists_every_tensor_in_key_order(tmp_path: Any) -> None:
    rng = np.random.default_rng(5)
    tensors = {}
    for i in range(40_000):   # half zero-size with distinct shapes of one- to three-byte dims, half small
        shape = (0, 1 + i, 3) if i % 2 == 0 else (1 + i % 5, 1 + (i // 5) % 4)
        tensors[f"layer_{i % 997:03d}/w_{i}"] = rng.standard_normal(shape).astype(np.float32)
    prefix = write_checkpoint(str(tmp_path / "big" / "model.ckpt"), tensors)
    with ckptbridge.read(prefix, engine="native") as r:
        specs = r.specs
        assert list(specs) == sorted(tensors, key=lambda n: n.encode())
        assert {n: (s.dtype, s.shape) for n, s in specs.items()} == {n: ("float32", a.shape) for n, a in tensors.items()}
        for name in [f"layer_{i % 997:03d}/w_{i}" for i in (0, 11, 39_873, 39_998)]:
            assert r[name].tobytes() == tensors[name].tobytes()
    proc = cli("ls", "--json", prefix)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["total_tensors"] == 40_000 and doc["total_bytes"] == sum(a.nbytes for a in tensors.values())


@pytest.mark.tf
def test_a_tensorflow_written_index_of_thousands_reads_as_tensorflow_reads_it(many_ckpt: str, assert_same_as_tf: Any,
                                                                              ckpts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fallbacks = []
    slow = _entries._parse_entry_field_by_field
    monkeypatch.setattr(_entries, "_parse_entry_field_by_field", lambda buf: fallbacks.append(1) or slow(buf))
    with ckptbridge.read(many_ckpt, engine="native") as r:
        got = {n: (s.dtype, s.shape) for n, s in r.specs.items()}
        assert got == ckpts.tf_expected(many_ckpt)
        assert list(r.specs) == sorted(got, key=lambda n: n.encode())
        assert fallbacks == []   # every entry TensorFlow wrote took the one-pass parser
        assert assert_same_as_tf(r, many_ckpt) == 3000
