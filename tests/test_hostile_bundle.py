"""Hostile TensorFlow V2 checkpoints for the native reader (issue #17, findings 5 and 6).

Each checkpoint is crafted here, byte by byte, with the bundle package's own table,
entry and wire helpers (no TensorFlow), and fed to the real command line in a
subprocess under an address-space cap and a timeout (see helpers.run_cli): one
``ckptbridge: error:`` line naming the file and tensor, exit status 2, nothing
written, and no allocation or computation out of proportion to the files.

* ``.index`` keys that share a long prefix: each entry stores a few bytes, but
  the reader built every full key.  Keys are now bounded one by one and in total,
  relative to the size of the index, before they are built.
* partitioned tensors whose slices all point at the same stored bytes: no two
  stored entries may share a byte of a data file, so what the slices of a tensor
  claim is bounded by the data files.
* the slice overlap check was quadratic in the number of slices.

And the other side: a legitimately partitioned variable with thousands of
slices still reads bit-exactly, quickly.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptbridge.bundle import BundleReader
from ckptbridge.bundle import reader as bundle_reader
from ckptbridge.bundle._entries import encode_entry, encode_header, slice_key
from ckptbridge.bundle._table import HANDLES_SIZE, MAGIC, TableBuilder
from ckptbridge.errors import FormatError
from ckptbridge.io.wire import crc, field_bytes, field_varint, mask, put_varint

from helpers import assert_fails, run_cli  # noqa: E402

AS_LIMIT = 1 << 30      # the old reader needed 1.5-3 GB for the files below
TIMEOUT = 60.0          # the old overlap check took minutes
FLOAT = 1               # DT_FLOAT


# --- crafting bundles ----------------------------------------------------------------


def entry(shape: tuple[int, ...], offset: int = 0, data: bytes = b"", slices: list[tuple[tuple[int, ...], tuple[int, ...]]] = ()) -> bytes:
    """A float32 BundleEntryProto; with ``slices``, the entry of a partitioned tensor
    (TensorSlice extents; a length of -1 is the full extent)."""
    out = encode_entry(FLOAT, shape, 0, offset, len(data), mask(crc(data)))
    for starts, lengths in slices:
        extents = b"".join(field_bytes(1, field_varint(1, s) + (field_varint(2, n) if n >= 0 else b""))
                           for s, n in zip(starts, lengths))
        out += field_bytes(7, extents)
    return out


def write_bundle(prefix: str, entries: dict[bytes, bytes], data: bytes) -> None:
    """One shard; the table written by the project's own TableBuilder."""
    table = TableBuilder()
    table.add(b"", encode_header(1))
    for key in sorted(entries):
        table.add(key, entries[key])
    with open(prefix + ".index", "wb") as f:
        f.write(table.finish())
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)


def _block(raw_entries: bytes) -> bytes:
    return raw_entries + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")   # one restart point, at 0


def write_prefix_bomb(prefix: str, first_key: bytes, suffixes: list[bytes], value: bytes = b"") -> None:
    """An index whose one data block holds ``first_key`` in full, then entries that
    each share all of it and store only their suffix: a few bytes on disk per entry."""
    out = bytearray()

    def add(contents: bytes) -> bytes:
        handle = put_varint(len(out)) + put_varint(len(contents))
        out.extend(contents + b"\0" + mask(crc(b"\0", crc(contents))).to_bytes(4, "little"))
        return handle

    def ent(shared: int, key: bytes, val: bytes) -> bytes:
        return put_varint(shared) + put_varint(len(key)) + put_varint(len(val)) + key + val

    body = ent(0, b"", encode_header(1)) + ent(0, first_key, value)
    body += b"".join(ent(len(first_key), s, value) for s in suffixes)
    data = add(_block(body))
    meta = add(_block(b""))
    index = add(_block(ent(0, b"\xff", data)))
    out += (meta + index).ljust(HANDLES_SIZE, b"\0") + MAGIC.to_bytes(8, "little")
    with open(prefix + ".index", "wb") as f:
        f.write(out)
    open(prefix + ".data-00000-of-00001", "wb").close()


def refused(prefix: str, needles: list[str], commands: tuple[str, ...] = ("ls", "export", "verify")) -> None:
    root = os.path.dirname(prefix)
    argvs = {"ls": ["ls", prefix], "export": ["export", prefix, os.path.join(root, "out.npz")], "verify": ["verify", prefix]}
    for cmd in commands:
        assert_fails(argvs[cmd], needles, root, as_limit=AS_LIMIT, timeout=TIMEOUT)


def partitioned(prefix: str, full: np.ndarray, boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], name: bytes = b"w",
                listed: list | None = None) -> None:
    """``full`` saved as the slices ``boxes`` (starts, lengths), each with bytes of its own;
    the full tensor's entry lists ``listed`` (default: ``boxes``)."""
    entries, data = {}, bytearray()
    for starts, lengths in boxes:
        extent = tuple(d if n < 0 else n for n, d in zip(lengths, full.shape))
        part = np.ascontiguousarray(full[tuple(slice(s, s + n) for s, n in zip(starts, extent))]).tobytes()
        entries[slice_key(name, starts, lengths)] = entry(extent, len(data), part)
        data += part
    entries[name] = entry(full.shape, slices=boxes if listed is None else listed)
    write_bundle(prefix, entries, bytes(data))


# --- key memory ----------------------------------------------------------------------


def test_keys_sharing_a_huge_prefix_refused(tmp_path):
    """1500 entries of ~6 bytes each share a 1 MiB prefix: 1.5 GB of keys from a 1 MB index."""
    prefix = str(tmp_path / "m.ckpt")
    write_prefix_bomb(prefix, b"a" * (1 << 20), [b"\1" * (i + 1) for i in range(1500)])
    refused(prefix, ["m.ckpt.index", "(tensor 'aaaa", f"{1 << 20} bytes long", "TensorFlow engine"])


def test_keys_within_the_length_limit_but_too_many_bytes_refused(tmp_path):
    """Keys of 16000 bytes, each stored as 3: 100k of them would be 1.6 GB from an 800 KB index."""
    prefix = str(tmp_path / "m.ckpt")
    write_prefix_bomb(prefix, b"k" * 15997 + b"\0\0\0", [i.to_bytes(3, "big") for i in range(1, 100_000)])
    assert os.path.getsize(prefix + ".index") < 1 << 20
    refused(prefix, ["m.ckpt.index", "its keys would take more than", "damaged"])


def test_a_70_kb_tensor_name_is_a_clear_message(tmp_path):
    prefix = str(tmp_path / "m.ckpt")
    d = np.zeros(12, np.float32).tobytes()
    write_bundle(prefix, {b"n" * 70_000: entry((3, 4), 0, d)}, d)
    refused(prefix, ["m.ckpt.index", "(tensor 'nnnn", "70000 bytes long", "16384"])


def test_long_but_real_names_and_deep_slice_keys_are_read(tmp_path):
    """A 4 KB name (far beyond any real one) and its rank-8 slices stay readable."""
    prefix = str(tmp_path / "m.ckpt")
    name = ("scope/" * 700).encode()[:4096]
    full = np.arange(2 ** 8, dtype=np.float32).reshape((2,) * 8)
    partitioned(prefix, full, [((0,) + (0,) * 7, (1,) + (-1,) * 7), ((1,) + (0,) * 7, (1,) + (-1,) * 7)], name=name)
    with BundleReader(prefix) as r:
        got = r.read(name.decode())
    assert got.dtype == full.dtype and got.tobytes() == full.tobytes()


# --- slices --------------------------------------------------------------------------


def test_slices_sharing_stored_bytes_refused(tmp_path):
    """700 row slices of a [700, 1M] float32 tensor all point at the same 4 MiB: the old
    reader exported 2.9 GB from a 4 MB checkpoint."""
    prefix = str(tmp_path / "m.ckpt")
    n, c = 700, 1 << 20
    row = np.ones(c, np.float32).tobytes()
    entries = {slice_key(b"w", (i, 0), (1, -1)): entry((1, c), 0, row) for i in range(n)}
    entries[b"w"] = entry((n, c), slices=[((i, 0), (1, -1)) for i in range(n)])
    write_bundle(prefix, entries, row)
    refused(prefix, ["m.ckpt.data-00000-of-00001", "(tensor 'w')", "slice [(1, 1), (0, 1048576)]",
                     "overlap bytes [0, 4194304) of slice [(0, 1), (0, 1048576)] of tensor 'w'"])


def test_tensors_sharing_stored_bytes_refused(tmp_path):
    """The same rule for plain tensors: 'b' lies inside the bytes of 'a'."""
    prefix = str(tmp_path / "m.ckpt")
    d = np.arange(8, dtype=np.float32).tobytes()
    write_bundle(prefix, {b"a": entry((8,), 0, d), b"b": entry((2,), 8, d[8:16])}, d)
    refused(prefix, ["m.ckpt.data-00000-of-00001", "(tensor 'b')", "bytes [8, 16) overlap bytes [0, 32) of tensor 'a'"])


def test_padding_between_entries_is_fine(tmp_path):
    """TensorFlow may pad entries to an alignment: gaps are not overlaps."""
    prefix = str(tmp_path / "m.ckpt")
    a, b = np.arange(3, dtype=np.float32), np.arange(5, dtype=np.float32)
    data = a.tobytes() + b"\0" * 52 + b.tobytes()
    write_bundle(prefix, {b"a": entry((3,), 0, a.tobytes()), b"b": entry((5,), 64, b.tobytes())}, data)
    with BundleReader(prefix) as r:
        assert r.read("a").tobytes() == a.tobytes() and r.read("b").tobytes() == b.tobytes()


def _grid(prefix: str, g: int) -> tuple[np.ndarray, list]:
    full = np.arange(g * g, dtype=np.float32).reshape(g, g)
    boxes = [((i, j), (1, 1)) for i in range(g) for j in range(g)]
    partitioned(prefix, full, boxes)
    return full, boxes


def test_forty_thousand_slices_checked_in_bounded_time(tmp_path):
    """A 200x200 grid of one-element slices (a 2 MB index): the old pairwise check took minutes."""
    prefix = str(tmp_path / "m.ckpt")
    full, _ = _grid(prefix, 200)
    root = str(tmp_path)
    r = run_cli("export", prefix, os.path.join(root, "out.npz"), "-q", cwd=root, as_limit=AS_LIMIT, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr.decode()
    with np.load(os.path.join(root, "out.npz")) as z:
        assert z["w"].dtype == full.dtype and z["w"].tobytes() == full.tobytes()


def test_overlapping_slices_among_forty_thousand_refused_in_bounded_time(tmp_path):
    """One slice of the grid listed twice and another left out: sizes still add up (the pair
    comes last, where a pairwise check meets it only after nearly all of its work)."""
    prefix = str(tmp_path / "m.ckpt")
    full = np.arange(200 * 200, dtype=np.float32).reshape(200, 200)
    boxes = [((i, j), (1, 1)) for i in range(200) for j in range(200)]
    partitioned(prefix, full, boxes[:-1], listed=boxes[:-1] + [boxes[-2]])
    refused(prefix, ["m.ckpt.index", "(tensor 'w')", "two of them overlap"], commands=("ls", "export"))


def test_two_thousand_axis0_partitions_read_bit_exactly_and_fast(tmp_path):
    """What TensorFlow's partitioners write: one axis cut, here into 2000 uneven parts."""
    prefix = str(tmp_path / "m.ckpt")
    rng = np.random.default_rng(0)
    rows = rng.integers(1, 5, size=2000)
    full = rng.standard_normal((int(rows.sum()), 3)).astype(np.float32)
    starts = np.concatenate(([0], np.cumsum(rows)[:-1]))
    partitioned(prefix, full, [((int(s), 0), (int(n), -1)) for s, n in zip(starts, rows)])
    t = time.perf_counter()
    with BundleReader(prefix) as r:
        got = r.read("w")
    assert time.perf_counter() - t < 10
    assert got.dtype == full.dtype and got.tobytes() == full.tobytes()


def test_slices_too_irregular_to_check_are_a_clear_refusal(tmp_path, monkeypatch):
    """Past its bounds the check gives up with a message, never by accepting."""
    prefix = str(tmp_path / "m.ckpt")
    _grid(prefix, 20)
    monkeypatch.setattr(bundle_reader, "MAX_CORNER_VALUES", 0)
    monkeypatch.setattr(bundle_reader, "MAX_SWEEP_WORK", 100)
    with pytest.raises(FormatError, match=r"m\.ckpt\.index \(tensor 'w'\): its 400 slices are cut too irregularly.*TensorFlow engine"):
        BundleReader(prefix)


# --- the overlap check against painting every element --------------------------------


@st.composite
def tilings(draw):
    """Boxes from random guillotine cuts of a random shape, sometimes with one box moved
    (sizes still add up, so anything but an exact tiling overlaps)."""
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank)))
    boxes = [((0,) * rank, shape)]
    for _ in range(draw(st.integers(0, 30))):
        i = draw(st.integers(0, len(boxes) - 1))
        starts, lengths = boxes[i]
        axis = draw(st.integers(0, rank - 1))
        if lengths[axis] < 2:
            continue
        cut = draw(st.integers(1, lengths[axis] - 1))
        a = (starts, lengths[:axis] + (cut,) + lengths[axis + 1:])
        b = (starts[:axis] + (starts[axis] + cut,) + starts[axis + 1:], lengths[:axis] + (lengths[axis] - cut,) + lengths[axis + 1:])
        boxes[i:i + 1] = [a, b]
    if draw(st.booleans()):
        i = draw(st.integers(0, len(boxes) - 1))
        lengths = boxes[i][1]
        boxes[i] = (tuple(draw(st.integers(0, d - n)) for d, n in zip(shape, lengths)), lengths)
    return shape, boxes


def painted_overlap(shape, boxes) -> bool:
    count = np.zeros(shape, np.int64)
    for starts, lengths in boxes:
        count[tuple(slice(s, s + n) for s, n in zip(starts, lengths))] += 1
    return bool((count > 1).any())


@pytest.mark.parametrize("method", ["default", "sweep"])
@settings(max_examples=300, deadline=None)
@given(case=tilings())
def test_overlap_check_is_exact(method, case):
    shape, boxes = case
    parts = [(s, n, b"") for s, n in boxes]
    assert sum(math.prod(n) for _, n in boxes) == math.prod(shape)
    saved = bundle_reader.MAX_CORNER_VALUES
    try:
        if method == "sweep":
            bundle_reader.MAX_CORNER_VALUES = 0
        assert bundle_reader._overlap(parts, shape) == painted_overlap(shape, boxes)
    finally:
        bundle_reader.MAX_CORNER_VALUES = saved
