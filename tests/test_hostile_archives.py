"""Hostile archives, found by testing from outside (issue #17): the classes of input that
got past the size checks of the .npz, HDF5 and .safetensors readers, and the names and
shapes that made the archive writers end in "internal error".

Each case crafts its input here and runs the real command line in a subprocess under
an address-space cap and a timeout (see helpers.assert_refused), expecting one
``ckptbridge: error:`` line, exit status 2 and nothing written.  Variants of a class
that are refused when the archive is opened (before any value is read) are checked
in this process, through the library, to keep the file fast:

* zero-itemsize dtypes (``|S0``): elements without bytes pass every byte count, so
  element counts are bounded too (strings: their in-memory size);
* HDF5 chunk indexes whose entries share stored bytes, and datasets sharing storage:
  expansion is measured against distinct stored bytes;
* HDF5 variable-length strings whose heap references share one heap object;
* metadata JSON too large, too deep or with too many values (npz, h5, safetensors);
* ``format_version`` of the wrong type, string lengths that wrap around in uint64;
* names and ranks an archive cannot hold, refused before the output is created;
* archives of checkpoints (issue #21): zip directories that name the same bytes many
  times (a 82 KB zip that unpacked 20 GB), members claiming more than deflate gives, tar
  extended headers that ask for gigabytes of memory, chains of links.

No TensorFlow needed.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import struct
import tarfile
import time
import zipfile
import zlib

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

import ckptbridge  # noqa: E402
from ckptbridge.bundle import BundleWriter  # noqa: E402
from ckptbridge.errors import CkptBridgeError, CorruptError, FormatError, UnsafeArchiveError  # noqa: E402
from ckptbridge.formats import meta  # noqa: E402
from ckptbridge.io import containers as _containers  # noqa: E402
from ckptbridge.io.ranged import LocalFile  # noqa: E402

from helpers import assert_fails, assert_refused, npy_header, write_zip  # noqa: E402

# Every case must be refused well inside these: the bombs below need several GB (or
# minutes) when they are not.
AS = 1 << 30
SECONDS = 30.0


def refused(archive: str, needles: list[str], good: str, commands: tuple[str, ...] = ("ls", "verify")) -> None:
    assert_refused(archive, needles, good, commands=commands, as_limit=AS, timeout=SECONDS)


def refused_on_open(archive: str, needle: str, error: type[CkptBridgeError] = UnsafeArchiveError) -> None:
    """The library refuses ``archive`` when it opens it, before any value is read."""
    with pytest.raises(error, match=needle):
        ckptbridge.read(archive).close()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _meta_doc(tensors: dict | None = None, **extra: object) -> dict:
    return {"format": "ckptbridge", "format_version": 1, "tensors": tensors or {}, **extra}


# --- 1. elements without bytes ------------------------------------------------------


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_zero_itemsize_dtypes_refused(tmp_path, good_npz, compress):
    """|S0 x 400M elements is 0 bytes: it passed every byte check, then took GBs to read."""
    p = str(tmp_path / "zero.npz")
    write_zip(p, {"w.npy": npy_header("|S0", (400_000_000,))}, compress)
    refused(p, ["'w'", "take no bytes"], good_npz, commands=("verify", "import") if compress else ("ls",))
    for descr in ("|V0", "<U0", "|S0"):
        write_zip(p, {"w.npy": npy_header(descr, (3, 1 << 30))}, compress)
        refused_on_open(p, "take no bytes")


def test_npz_fixed_width_strings_bounded_by_elements_not_bytes(tmp_path, good_npz):
    """|S1 x 64M compresses to 64 KB and would become 64M bytes objects (about 3 GB)."""
    p = str(tmp_path / "s1.npz")
    write_zip(p, {"w.npy": npy_header("|S1", (64 << 20,)) + bytes(64 << 20)}, zipfile.ZIP_DEFLATED)
    assert os.path.getsize(p) < 1 << 20
    refused(p, ["'w'", "strings", "memory bomb"], good_npz, commands=("verify",))
    # The same in HDF5, and within --max-tensor-gb when it is the smaller bound.
    h = str(tmp_path / "s1.h5")
    with h5py.File(h, "w") as f:
        f.create_dataset("w", data=np.zeros(64 << 20, "S1"), chunks=(1 << 20,), compression="gzip")
    refused(h, ["'w'", "strings", "memory bomb"], good_npz, commands=("verify",))
    # ckptbridge's own string encoding: 8M empty strings are 64 MB of lengths, deflated to 64 KB.
    n = 8 << 20
    blob = np.zeros(8 * n, np.uint8)
    rec = meta.tensor_record("string", (n,), meta.ENC_STRINGS, meta.checksum(blob))
    own = str(tmp_path / "own.npz")
    np.savez_compressed(own, w=blob, __ckptbridge__=np.frombuffer(json.dumps(_meta_doc({"w": rec})).encode(), np.uint8))
    del blob
    refused_on_open(own, f"'w': {n} strings .* memory bomb")
    small = str(tmp_path / "small.npz")
    np.savez(small, w=np.array([b"ab"] * 100_000))
    assert_fails(["ls", small, "--max-tensor-gb", "0.001"], ["'w'", "100000 strings", "--max-tensor-gb"], str(tmp_path), as_limit=AS, timeout=SECONDS)


# --- 2. distinct stored bytes (HDF5 storage shared by chunks or datasets) -----------


def _alias_chunks(path: str, n: int, chunk: int) -> None:
    """A gzip dataset of ``n`` chunks whose index entries all point at chunk 0's bytes
    (v1 B-tree keys: size, filter mask, offset, 0; then the child address)."""
    comp = zlib.compress(np.zeros(chunk, np.float32).tobytes(), 9)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("w", shape=(n * chunk,), dtype="f4", chunks=(chunk,), compression="gzip")
        ds.id.write_direct_chunk((0,), comp)
        for i in range(1, n):
            ds.id.write_direct_chunk((i * chunk,), b"\0")
        info = [ds.id.get_chunk_info(i) for i in range(n)]
    raw = bytearray(open(path, "rb").read())
    for c in info[1:]:
        at = raw.find(struct.pack("<IIQQQ", 1, 0, c.chunk_offset[0], 0, c.byte_offset))
        assert at > 0
        struct.pack_into("<IIQQQ", raw, at, info[0].size, 0, c.chunk_offset[0], 0, info[0].byte_offset)
    open(path, "wb").write(bytes(raw))


def test_hdf5_chunk_index_aliasing_refused(tmp_path, good_npz):
    """300 index entries naming one 4 KB gzip chunk: a 20 KB file claiming 1.2 GB 'stored'."""
    p = str(tmp_path / "alias.h5")
    _alias_chunks(p, 300, 1 << 20)
    assert os.path.getsize(p) < 64 << 10
    with h5py.File(p, "r") as f:  # what HDF5 reports as stored counts the one chunk 300 times
        assert f["w"].id.get_storage_size() > 100 * 4096
    refused(p, ["'w'", "same stored bytes"], good_npz, commands=("verify", "import"))


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_hdf5_datasets_sharing_storage_refused(tmp_path, good_npz, layout):
    """Two datasets whose storage is the same bytes of the file: every copy is read again."""
    p = str(tmp_path / f"share_{layout}.h5")
    a, b = np.arange(1 << 16, dtype="f4"), np.arange(1 << 16, dtype="f4")[::-1].copy()
    kw = {"chunks": (1 << 16,)} if layout == "chunked" else {}
    with h5py.File(p, "w") as f:
        da = f.create_dataset("a", data=a, **kw)
        db = f.create_dataset("b", data=b, **kw)
        if layout == "contiguous":
            old, new = db.id.get_offset(), da.id.get_offset()
            key = lambda off: b"\x03\x01" + struct.pack("<QQ", off, a.nbytes)  # noqa: E731 - layout message v3
        else:
            old, new = db.id.get_chunk_info(0).byte_offset, da.id.get_chunk_info(0).byte_offset
            key = lambda off: struct.pack("<QQ", 0, off)  # noqa: E731 - v1 B-tree key tail and child address
    raw = open(p, "rb").read()
    assert raw.count(key(old)) == 1
    open(p, "wb").write(raw.replace(key(old), key(new)))
    with h5py.File(p, "r") as f:  # plain h5py reads a's bytes twice
        assert f["b"][()].tobytes() == a.tobytes()
    refused(p, ["'a'", "'b'", "share stored bytes"], good_npz, commands=("import",))


# --- 3. HDF5 variable-length strings -------------------------------------------------


def _vlen(path: str, n: int, big: int, **kw: object) -> None:
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("s", shape=(n,), dtype=h5py.string_dtype("ascii"), **kw)
        ds[0] = b"A" * big
        ds[1:] = np.array([b"y"] * (n - 1), dtype=object)


def _alias_refs(raw: bytes, n: int) -> bytes:
    """Every one of ``n`` 16-byte heap references made a copy of the first."""
    return raw[:16] * n + raw[16 * n:]


@pytest.mark.parametrize("layout", ["contiguous", "chunked-gzip"])
def test_hdf5_vlen_heap_aliasing_refused(tmp_path, good_npz, layout):
    """2000 references to one 1 MiB heap string: a 1 MB file that reads as 2 GB."""
    p = str(tmp_path / f"vlen_{layout}.h5")
    n = 2000
    if layout == "contiguous":
        _vlen(p, n, 1 << 20)
        with h5py.File(p, "r") as f:
            off = f["s"].id.get_offset()
        raw = bytearray(open(p, "rb").read())
        raw[off:off + 16 * n] = _alias_refs(bytes(raw[off:off + 16 * n]), n)
        open(p, "wb").write(bytes(raw))
    else:
        _vlen(p, n, 1 << 20, chunks=(n,), compression="gzip")
        with h5py.File(p, "r+") as f:
            ds = f["s"]
            mask, chunk = ds.id.read_direct_chunk((0,))
            refs = _alias_refs(zlib.decompress(chunk), n)
            ds.id.write_direct_chunk((0,), zlib.compress(refs), mask)
    with h5py.File(p, "r") as f:
        assert len(f["s"][1]) == 1 << 20  # the trap is real
    refused(p, ["'s'", "more than the whole file"], good_npz, commands=("verify",))


def test_hdf5_vlen_shared_heap_object_refused_even_when_small(tmp_path, good_npz):
    """Sharing within the file's size (three references to one 4 KB string) is refused too."""
    p = str(tmp_path / "share.h5")
    _vlen(p, 3, 4096)
    with h5py.File(p, "a") as f:
        f["pad"] = np.zeros(1 << 14, np.float32)  # the file is larger than the three strings together
    with h5py.File(p, "r") as f:
        off = f["s"].id.get_offset()
    raw = bytearray(open(p, "rb").read())
    raw[off:off + 48] = _alias_refs(bytes(raw[off:off + 48]), 3)
    open(p, "wb").write(bytes(raw))
    refused_on_open(p, "heap objects that other elements already use")


@pytest.mark.parametrize("kw", [{}, {"chunks": (7,), "compression": "gzip", "shuffle": True}, {"chunks": (4,)},
                                {"chunks": (7,), "compression": "lzf"}])
def test_hdf5_genuine_vlen_strings_still_read(tmp_path, kw):
    import ckptbridge

    p = str(tmp_path / "ok.h5")
    want = [b"", b"alpha", b"", b"x" * 5000, b"\xff\xfe", b"beta"] * 5
    with h5py.File(p, "w") as f:
        f.create_dataset("s", data=np.array(want, dtype=object), dtype=h5py.string_dtype("ascii"), **kw)
        f.create_dataset("t", shape=(3,), dtype=h5py.string_dtype())  # never written: fill values
    with ckptbridge.read(p) as r:
        assert [bytes(x) for x in r["s"]] == want
        assert [bytes(x) for x in r["t"]] == [b""] * 3


def test_hdf5_vlen_read_one_by_one_is_bounded(tmp_path):
    """References ckptbridge cannot read itself (lzf) are measured element by element: past
    65,536 elements that would take too long, and it is refused, saying how to re-save."""
    p = str(tmp_path / "many.h5")
    with h5py.File(p, "w") as f:
        f.create_dataset("s", data=np.array([b"ab"] * 70_000, dtype=object), dtype=h5py.string_dtype("ascii"), chunks=(4096,), compression="lzf")
    refused_on_open(p, "70000 variable-length elements .* re-save it with gzip")


# --- 4. metadata JSON ------------------------------------------------------------------


def _npz_with_meta(path: str, js: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("__ckptbridge__.npy", _npy(np.frombuffer(js, np.uint8)))
        z.writestr("w.npy", _npy(np.zeros(3, np.float32)))


def _h5_with_meta(path: str, js: bytes) -> None:
    with h5py.File(path, "w") as f:
        f["w"] = np.zeros(3, np.float32)
        f.create_dataset(".ckptbridge/metadata", data=np.frombuffer(js, np.uint8), chunks=True, compression="gzip", compression_opts=9)


def _st_with_meta(path: str, js: bytes) -> None:
    header = json.dumps({"__metadata__": {"ckptbridge": js.decode()}, "w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(12))


BOMBS = {
    # 20M empty objects: 60 MB of JSON, about 1.5 GB once parsed
    "values": (b'{"format":"ckptbridge","format_version":1,"tensors":{},"x":[' + b"{}," * 20_000_000 + b"{}]}", "JSON values"),
    # nested 100k deep: the parser's recursion
    "depth": (b'{"format":"ckptbridge","format_version":1,"tensors":{},"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper"),
    # over the size limit, though harmless to parse
    "size": (b'{"format":"ckptbridge","format_version":1,"tensors":{},"x":"' + b"a" * (65 << 20) + b'"}', "over the limit"),
}


@pytest.mark.parametrize("kind", ["npz", "h5", "safetensors"])
def test_metadata_json_bombs_refused(tmp_path, good_npz, kind):
    if kind == "safetensors":
        pytest.importorskip("safetensors")
    write = {"npz": _npz_with_meta, "h5": _h5_with_meta, "safetensors": _st_with_meta}[kind]
    for what, (js, needle) in BOMBS.items():
        if kind == "safetensors" and what == "size":
            continue  # the package itself stops headers at 100 MB
        p = str(tmp_path / f"{what}.{kind}")
        write(p, js)
        if kind != "safetensors":
            assert os.path.getsize(p) < 1 << 20, what
        if what == "values":  # the memory bomb: through the command line, memory capped
            refused(p, [needle], good_npz, commands=("ls",))
        else:
            refused_on_open(p, needle)


def test_object_graph_size_bounded(tmp_path, good_npz):
    """A 65 MB object graph deflated to 64 KB (the graph is carried into the checkpoint whole)."""
    p = str(tmp_path / "og.npz")
    n = (64 << 20) + 1
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("__ckptbridge_object_graph__.npy", _npy(np.zeros((n,), np.uint8)))
        z.writestr("w.npy", _npy(np.zeros(3, np.float32)))
    refused_on_open(p, "object graph is .* over the limit")
    assert n == meta.MAX_METADATA_BYTES + 1


def test_format_version_of_the_wrong_type_refused(tmp_path, good_npz):
    def doc(version: str) -> bytes:
        return b'{"format":"ckptbridge","format_version":' + version.encode() + b',"tensors":{}}'

    p = str(tmp_path / "v.npz")
    _npz_with_meta(p, doc("1e400"))
    refused(p, ["format_version inf"], good_npz, commands=("ls",))
    for version in ("1e400", "[1]", '"abc"', "true", "-1", "1.0", "null"):
        for kind, write in (("npz", _npz_with_meta), ("h5", _h5_with_meta)):
            p = str(tmp_path / f"v.{kind}")
            write(p, doc(version))
            refused_on_open(p, "invalid format_version", CorruptError)


# --- 11. string lengths ----------------------------------------------------------------


WRAPS = [
    [2**64 - 1, 4],              # sums to 3 in uint64
    [2**63, 2**63, 3],           # sums to 3 in uint64
    [2**64 - 2**32, 2**32 + 3],  # sums to 3 in uint64
]


def test_string_lengths_that_wrap_around_refused(tmp_path, good_npz):
    for lengths in WRAPS:
        blob = np.frombuffer(np.array(lengths, "<u8").tobytes() + b"abc", np.uint8)
        with pytest.raises(CorruptError, match="do not add up"):
            meta.decode_strings(blob, (len(lengths),), "x")
    p = str(tmp_path / "wrap.npz")
    rec = meta.tensor_record("string", (len(lengths),), meta.ENC_STRINGS, meta.checksum(blob))
    np.savez(p, w=blob, __ckptbridge__=np.frombuffer(json.dumps(_meta_doc({"w": rec})).encode(), np.uint8))
    assert_fails(["import", p, str(tmp_path / "out" / "m.ckpt")], ["'w'", "do not add up"], str(tmp_path), as_limit=AS, timeout=SECONDS)


def test_string_lengths_that_add_up_still_decode():
    items = [b"", b"ab", b"\x00c"]
    blob = meta.encode_strings(np.array(items, dtype=object))
    assert list(meta.decode_strings(blob, (3,), "x")) == items
    assert meta.decode_strings(np.zeros(0, np.uint8), (0,), "x").shape == (0,)


# --- names and shapes an archive cannot hold: refused before anything is written -------


ODD_NAMES = {"long": "n" * 70_000, "non_utf8": "w\udcff", "nul": "w\x00x"}  # non_utf8: the key b"w\xff"
ODD_NEEDLES = {"long": "70000 bytes long", "non_utf8": "not valid UTF-8", "nul": "control character"}


@pytest.fixture()
def odd_ckpts(tmp_path) -> dict[str, str]:
    """Checkpoints with one key each that no archive may hold (written with our own bundle
    writer; the native reader itself refuses keys as long as "long")."""
    out = {}
    for case, name in ODD_NAMES.items():
        if case == "long":
            continue
        arr = np.zeros(3, np.float32)
        prefix = str(tmp_path / "ck" / case / "m.ckpt")
        os.makedirs(os.path.dirname(prefix))
        w = BundleWriter(prefix)
        w.write("ok", np.ones(2, np.float32))  # so that something would have been written first
        w.write(name, arr)
        w.commit()
        out[case] = prefix
    return out


def test_names_no_archive_holds_are_refused_on_export(tmp_path, odd_ckpts):
    root = str(tmp_path)
    assert_fails(["export", odd_ckpts["non_utf8"], str(tmp_path / "x.npz")], [ODD_NEEDLES["non_utf8"], "--rename"], root,
                 as_limit=AS, timeout=SECONDS)
    assert_fails(["export", odd_ckpts["nul"], str(tmp_path / "x.h5")], [ODD_NEEDLES["nul"], "--rename"], root, as_limit=AS, timeout=SECONDS)
    for suffix in (".npz", ".h5", ".safetensors"):
        for case, prefix in odd_ckpts.items():
            if suffix == ".safetensors" and not _has("safetensors"):
                continue
            with pytest.raises(FormatError, match=ODD_NEEDLES[case]):
                ckptbridge.export(prefix, str(tmp_path / f"{case}{suffix}"))
            assert sorted(os.listdir(tmp_path)) == ["ck"], (case, suffix)


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".safetensors"])
def test_archive_sinks_refuse_names_before_writing(tmp_path, suffix):
    """Whatever the source (the TensorFlow engine reads keys of any length), every archive
    sink refuses a name no archive reader accepts when it is announced, and leaves nothing."""
    from ckptbridge.formats.hdf5 import Hdf5Sink
    from ckptbridge.formats.npz import NpzSink
    from ckptbridge.spec import TensorSpec

    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
        from ckptbridge.formats.safetensors import SafetensorsSink as sink_class
    else:
        sink_class = NpzSink if suffix == ".npz" else Hdf5Sink
    for case, name in ODD_NAMES.items():
        out = str(tmp_path / f"out{suffix}")
        sink = sink_class(out)
        with pytest.raises(FormatError, match=ODD_NEEDLES[case]):
            with sink:
                sink.begin([TensorSpec("ok", "float32", (2,)), TensorSpec(name, "float32", (3,))])
        assert os.listdir(tmp_path) == [], case


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_hdf5_rank_over_32_refused_before_writing(tmp_path):
    prefixes = {}
    for rank in (33, 40, 64):
        prefixes[rank] = str(tmp_path / "ck" / str(rank) / "m.ckpt")
        os.makedirs(os.path.dirname(prefixes[rank]))
        w = BundleWriter(prefixes[rank])
        w.write("ok", np.ones(2, np.float32))
        w.write("w", np.zeros((1,) * rank, np.float32))
        w.commit()
    assert_fails(["export", prefixes[40], str(tmp_path / "out.h5")], ["'w'", "40 dimensions", "at most 32", ".npz"], str(tmp_path),
                 as_limit=AS, timeout=SECONDS)
    for rank, prefix in prefixes.items():
        with pytest.raises(FormatError, match=f"{rank} dimensions"):
            ckptbridge.export(prefix, str(tmp_path / "out.h5"))
        ckptbridge.export(prefix, str(tmp_path / f"out{rank}.npz"))  # .npz holds up to 64
    assert sorted(os.listdir(tmp_path)) == ["ck", "out33.npz", "out40.npz", "out64.npz"]


def test_a_comment_length_that_hides_members_is_damage(tmp_path: pathlib.Path) -> None:
    """Found by the fuzz suite: a central-directory entry whose comment length runs past the directory
    made zipfile return only the entries before it, so the archive read as a smaller plain .npz
    (ckptbridge's own record hidden too) and tensors went missing without an error."""
    from helpers import assert_one_line_error, cli

    path = str(tmp_path / "m.npz")
    ckptbridge.save({f"t{i}": np.full(3, i, np.float32) for i in range(4)}, path)
    data = bytearray(open(path, "rb").read())
    cd = data.find(b"PK\x01\x02")
    data[cd + 32:cd + 34] = b"\xff\xff"  # the first entry's comment: 65535 bytes, swallowing the rest
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptError, match="lists 5 members but 1 can be read"):
        ckptbridge.read(path)
    assert_one_line_error(cli("ls", path), "damaged")


# --- archives of checkpoints: bytes named many times, headers that ask for memory -------------


def _zip_naming_one_member(path: str, copies: int, size: int) -> None:
    """A zip whose directory lists one deflated member of ``size`` zero bytes ``copies`` times (Python 3.11's
    zipfile has no overlap check: each entry unpacks the same bytes again)."""
    one = io.BytesIO()
    with zipfile.ZipFile(one, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("run/model.ckpt.data-00000-of-00001", bytes(size))
    data = one.getvalue()
    end = data.rindex(b"PK\x05\x06")
    start, = struct.unpack("<I", data[end + 16:end + 20])
    entry = data[start:end]
    with open(path, "wb") as f:
        f.write(data[:start] + entry * copies + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, copies, copies, len(entry) * copies, start, 0))


def test_zip_directory_naming_one_member_many_times_refused(tmp_path, good_npz):
    """400 entries of one 50 MB member: ls unpacked 20 GB in 75 s."""
    p = str(tmp_path / "dup.zip")
    _zip_naming_one_member(p, 400, 50 << 20)
    assert os.path.getsize(p) < 100_000
    refused(p, ["appears twice", "dup.zip"], good_npz, commands=("ls", "export"))


def _overlapping_zip(path: str, n: int, kernel_bytes: int) -> None:
    """David Fifield's overlapping zip: member k's deflate stream quotes the local headers of the members
    after it (stored blocks) and ends in the one kernel they all share.  Every CRC-32 is right."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    kernel = c.compress(bytes(kernel_bytes)) + c.flush()
    names = [f"run/part{k:04d}".encode() for k in range(n)]
    headers: list[bytes] = [b""] * n
    csize, usize, out = len(kernel), kernel_bytes, b""
    for k in range(n - 1, -1, -1):
        crc = zlib.crc32(bytes(kernel_bytes), zlib.crc32(out))
        headers[k] = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, csize, usize, len(names[k]), 0) + names[k]
        out = headers[k] + out
        csize += 5 + len(headers[k])
        usize += len(headers[k])
    body, offsets = bytearray(), []
    for k, h in enumerate(headers):
        if k:
            body += struct.pack("<BHH", 0, len(h), len(h) ^ 0xFFFF)       # member k-1 quotes member k's header
        offsets.append(len(body))
        body += h
    body += kernel
    cd = b"".join(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, *struct.unpack("<III", h[14:26]),
                              len(names[k]), 0, 0, 0, 0, 0o100644 << 16, offsets[k]) + names[k] for k, h in enumerate(headers))
    with open(path, "wb") as f:
        f.write(bytes(body) + cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), len(body), 0))


def test_zip_members_sharing_bytes_refused(tmp_path):
    p = str(tmp_path / "overlap.zip")
    _overlapping_zip(p, 20, 1 << 20)
    with zipfile.ZipFile(p) as z:                                         # a genuine bomb: the stdlib unpacks it
        assert sum(len(z.read(i)) for i in z.infolist()) > 20 << 20 > 200 * os.path.getsize(p)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(UnsafeArchiveError, match="'run/part0000' and 'run/part0001' share bytes"):
        _containers.open_container(LocalFile(p), scratch_dir=str(scratch))
    assert os.listdir(scratch) == []


def test_zip_member_claiming_more_than_deflate_gives_refused(tmp_path):
    p = str(tmp_path / "claim.zip")
    write_zip(p, {"run/model.ckpt.data-00000-of-00001": bytes(1000)}, zipfile.ZIP_DEFLATED)
    data = bytearray(open(p, "rb").read())
    cd = data.rindex(b"PK\x01\x02")
    data[cd + 24:cd + 28] = struct.pack("<I", 0xFFFFFFF0)                # the directory's uncompressed size: 4 GB
    open(p, "wb").write(bytes(data))
    refused_on_open(p, "claims 4294967280 bytes from .* compressed, more than deflate can give")


def _tgz_with_pax_header(path: str, size: int) -> None:
    """A .tar.gz whose first header is a pax extended header of ``size`` zero bytes (tarfile reads it whole)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, size
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(info.tobuf(format=tarfile.USTAR_FORMAT)) + c.flush(zlib.Z_FULL_FLUSH)
    block = bytes(16 << 20)
    piece = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)                # byte-aligned and reset: it can be repeated
    tail = c.compress(bytes(1024)) + c.flush()
    n = size // len(block)
    crc = zlib.crc32(info.tobuf(format=tarfile.USTAR_FORMAT))
    for _ in range(n):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(bytes(1024), crc)
    total = 512 + n * len(block) + 1024
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head + piece * n + tail + struct.pack("<II", crc, total & 0xFFFFFFFF))


def test_tar_extended_header_asking_for_gigabytes_refused(tmp_path, good_npz):
    p = str(tmp_path / "pax.tar.gz")
    _tgz_with_pax_header(p, 1200 << 20)
    assert os.path.getsize(p) < 2 << 20
    refused(p, ["extended tar header", "1258291200 bytes"], good_npz, commands=("ls",))


def test_a_long_chain_of_links_is_followed_once(tmp_path):
    """Each link was followed to the chain's end on its own: 20,000 links took 28 s, 40,000 four times that."""
    p = str(tmp_path / "chain.tar")
    n = 40_000
    with open(p, "wb") as f:
        with tarfile.open(fileobj=f, mode="w") as t:
            target = tarfile.TarInfo("f")
            target.size = 1
            t.addfile(target, io.BytesIO(b"x"))
            for k in range(n):
                link = tarfile.TarInfo(f"l{k}")
                link.type, link.linkname = tarfile.SYMTYPE, f"l{k + 1}" if k + 1 < n else "f"
                t.addfile(link)
    started = time.monotonic()
    place = _containers.open_container(LocalFile(p))
    try:
        assert time.monotonic() - started < 20
        with place.open("l0") as m:
            assert m.pread(0, 1) == b"x"
    finally:
        place.close()
