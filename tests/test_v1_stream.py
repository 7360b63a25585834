"""Streaming a V1 tensor out of its table block (``V1Reader.read_blocks``).

TensorFlow's table writer gives an entry larger than its 256 KiB block size a
block of its own (vgg_16's fc6: 411 MB), which ``read`` maps or reads whole.
``read_blocks`` finds the values inside the block from small reads and streams
them, computing the block's crc32c on the way and raising at the end.  The
TensorFlow-free tests use the committed fixtures (tests/data/v1, whose
expected.json records what TensorFlow read) and V1 files crafted here with
multi-MB tensors, locally (mmap) and through the in-memory place of
test_containers that counts the bytes it serves; the ``tf`` tests have
TensorFlow write the file and read it back as the oracle.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from test_containers import MemoryPlace, load_dir
from test_v1_native import CRAFTED, DATA, FIXTURES, _meta, _slice_entry, craft_v1, digest, expected, snappy_table

import ckptbridge
from ckptbridge.bundle import V1Reader, _table, v1
from ckptbridge.bundle._entries import slice_key
from ckptbridge.errors import CkptBridgeError, CorruptError
from ckptbridge.io.wire import field_bytes, field_varint, put_varint
from ckptbridge.pipe import transfer as _pipe

from helpers import flip, leftovers

# DataType enums and TensorProto fields the crafted files use.
DTYPE_ENUM = {"float32": 1, "float64": 2, "complex64": 8, "int64": 9}
FIELD = {"float32": 5, "float64": 6, "complex64": 9}
CONTENT = 4


def tensor_proto(arr: np.ndarray, *, content: bool = False) -> bytes:
    """A TensorProto as TensorFlow's V1 writer lays it out: dtype, shape, then the values
    (``content``: in tensor_content instead of the typed field)."""
    dtype = arr.dtype.name
    dims = b"".join(field_bytes(2, field_varint(1, d) if d else b"") for d in arr.shape)
    head = field_varint(1, DTYPE_ENUM[dtype]) + field_bytes(2, dims)
    if dtype == "int64":
        return head + field_bytes(10, b"".join(put_varint(int(v)) for v in arr.reshape(-1)))
    raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    return head + field_bytes(CONTENT if content else FIELD[dtype], raw)


def big_tensors() -> dict[str, tuple[np.ndarray, bool]]:
    """name -> (values, stored in tensor_content); sorted names are the table's order."""
    rng = np.random.default_rng(7)
    return {
        "a/bias": (rng.standard_normal(5).astype(np.float32), False),                # shares the block before b/kernel
        "b/kernel": (rng.standard_normal((512, 1024)).astype(np.float32), False),    # 2 MiB: ends its block
        "c/table": (rng.standard_normal((300, 700)), True),                          # float64 in tensor_content
        "d/complex": ((rng.standard_normal((200, 300)) + 1j * rng.standard_normal((200, 300))).astype(np.complex64), False),
        "e/step": (np.array(7, np.int64), False),                                    # int64_val varints: read whole
        "f/tail": (np.arange(3, dtype=np.float32), False),
    }


def write_big(path: str, *, block_size: int = _table.BLOCK_SIZE, meta_block: bool = True) -> dict[str, np.ndarray]:
    """A V1 file of big_tensors(): TensorFlow's block size, or everything in one block; the metadata
    in a block of its own (as when smaller tensors come first: vgg_16's first block is 452 KB), or not."""
    metas, entries = [], {}
    for name, (arr, content) in big_tensors().items():
        full = tuple((0, d) for d in arr.shape)
        metas.append(_meta(name.encode(), DTYPE_ENUM[arr.dtype.name], arr.shape, [full]))
        key, value = _slice_entry(name.encode(), full, tensor_proto(arr, content=content))
        entries[key] = value
    meta = b"".join(field_bytes(1, m) for m in metas)
    t = _table.TableBuilder(block_size=block_size)
    t.add(b"", field_bytes(1, meta))
    if meta_block:
        t._flush()
    for key in sorted(entries):
        t.add(key, entries[key])
    with open(path, "wb") as f:
        f.write(t.finish())
    return {n: a for n, (a, _) in big_tensors().items()}


@pytest.fixture(params=["tf-blocks", "one-block"])
def big(request: Any, tmp_path: Any) -> tuple[str, dict[str, np.ndarray]]:
    path = str(tmp_path / "big.ckpt")
    return path, write_big(path, block_size=_table.BLOCK_SIZE if request.param == "tf-blocks" else 1 << 30)


def streamed(r: V1Reader, name: str, chunk_bytes: int) -> np.ndarray | None:
    """The stream's blocks joined and shaped, or None when the reader does not stream the tensor."""
    stream = r.read_blocks(name, chunk_bytes)
    if stream is None:
        return None
    parts = []
    for _, block in stream:
        assert block.nbytes <= max(chunk_bytes, block.itemsize) and block.flags.c_contiguous
        parts.append(block.copy())
    assert stream.crc is not None
    return np.concatenate(parts).reshape(stream.spec.shape)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def open_reader(path: str, how: str, **kw: Any) -> tuple[V1Reader, MemoryPlace | None]:
    if how == "mmap":
        return V1Reader(path, **kw), None
    place = MemoryPlace(load_dir(os.path.dirname(path)))
    return V1Reader(os.path.basename(path), place=place, **kw), place


# --------------------------------------------------------------------------- bit-exact


@pytest.mark.parametrize("how", ["mmap", "ranged"])
@pytest.mark.parametrize("chunk", [4, 24, 1000, 1 << 20])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_streamed_fixture_tensors_are_what_tensorflow_read(name: str, chunk: int, how: str) -> None:
    """Every tensor the reader streams is, bit for bit, what TensorFlow read (expected.json) and what read() gives."""
    want = expected()[name]
    with open_reader(os.path.join(DATA, FIXTURES[name]), how)[0] as r:
        n_streamed = 0
        for n, spec in r.specs().items():
            got = streamed(r, n, chunk)
            if got is None:
                continue
            n_streamed += 1
            assert digest(got) == want[n]["sha256"] and list(got.shape) == want[n]["shape"] and spec.dtype == want[n]["dtype"], n
            assert same_bytes(got, np.asarray(r.read(n))), n
        if how == "ranged" and chunk == 1 << 20:
            assert n_streamed == 0                     # blocks no larger than a chunk, off the map: read() reads them whole
        else:
            assert n_streamed >= (2 if name == "partitioned" else 8)


def test_which_tensors_stream() -> None:
    with V1Reader(os.path.join(DATA, FIXTURES["dtypes"])) as r:
        for n in ("float32/2x3", "float64/scalar", "complex64/2x3", "complex128/2x3"):   # packed fixed-width fields
            assert r.read_blocks(n, 8) is not None, n
        for n in ("int8/2x3", "float16/2x3", "bool/2x3", "int64/2x3",                   # varints: read whole
                  "string/2x3", "float32/empty", "sliced/w"):                           # strings, nothing, three slices
            assert r.read_blocks(n, 8) is None, n
    with V1Reader(os.path.join(DATA, FIXTURES["partitioned"])) as r:
        assert r.read_blocks("dev0/embedding", 8) is None                              # partitioned


@pytest.mark.parametrize("how", ["mmap", "ranged"])
@pytest.mark.parametrize("chunk", [1000, 64 << 10, 16 << 20])
def test_big_tensors_stream_bit_exact(big: tuple[str, dict[str, np.ndarray]], how: str, chunk: int) -> None:
    path, values = big
    r, _ = open_reader(path, how)
    with r:
        for name, want in values.items():
            got = streamed(r, name, chunk)
            if got is None:
                assert name == "e/step" or how == "ranged", name            # varints; or small blocks off the map: read whole
                got = r.read(name)
            assert same_bytes(got, want), name
            assert same_bytes(r.read(name), want), name
        stream = r.read_blocks("b/kernel", chunk)
        assert stream is not None or how == "ranged"
        if stream is not None:
            assert (stream.span is not None) == (how == "mmap" and chunk < (1 << 20))        # the kernel may copy from the file
            assert stream.drain() == _pipe.exchange_checksum(values["b/kernel"])


def test_a_big_tensor_is_read_about_once_through_a_counting_place(tmp_path: Any) -> None:
    """Streaming reads the block's bytes once, in ranges of at most one chunk; read() fetches the whole block at once."""
    path = str(tmp_path / "big.ckpt")
    values = write_big(path)
    nbytes = values["b/kernel"].nbytes
    chunk = 64 << 10
    r, place = open_reader(path, "ranged")
    assert place is not None
    with r:
        before = len(place.log)
        got = streamed(r, "b/kernel", chunk)
        assert got is not None and same_bytes(got, values["b/kernel"])
        reads = [n for _, _, n in place.log[before:]]
        assert nbytes <= sum(reads) < nbytes + 3 * chunk, reads
        assert max(reads) <= chunk
        before = len(place.log)
        r.read("b/kernel")
        assert max(n for _, _, n in place.log[before:]) > nbytes                         # the whole block, in one read


RSS_PROBE = r"""
import sys, numpy as np
from ckptbridge.bundle import V1Reader

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith("VmRSS:"))

start = rss()
with V1Reader(sys.argv[1]) as r:
    base = rss()
    opened = base - start
    peak = base
    stream = r.read_blocks("big", 4 << 20)
    assert stream is not None
    for _, block in stream:
        float(block.sum())
        peak = max(peak, rss())
    streamed = peak - base
    arr = r.read("big")
    float(arr.sum())
    whole = rss() - base
print(opened, streamed, whole)
"""


def test_streaming_a_mapped_block_keeps_rss_to_a_few_chunks(tmp_path: Any) -> None:
    """The pages of a 64 MiB block (the first, with the metadata) are released as the stream moves on,
    and opening reads only the metadata from it; read() keeps them all."""
    path = str(tmp_path / "big.ckpt")
    arr = np.random.default_rng(1).standard_normal(16 << 20, dtype=np.float32)
    craft_v1(path, [_meta(b"big", 1, arr.shape, [((0, arr.size),)])], dict([_slice_entry(b"big", ((0, arr.size),), tensor_proto(arr))]))
    del arr
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    opened, streamed_rss, whole_rss = map(int, proc.stdout.split())
    assert opened < 8 << 20 and streamed_rss < 16 << 20, proc.stdout                    # the metadata shares the block: not read whole
    assert whole_rss > 60 << 20, proc.stdout                                             # the probe does measure mapped pages


# --------------------------------------------------------------------------- damage


def _block_of(path: str, name: str) -> tuple[int, int]:
    """(offset, size) of the table block holding ``name``'s one slice."""
    with V1Reader(path, verify=False) as r:
        t = r._tensors[name]
        _, stored, _, _ = t.slices[0]
        table = r._tables[0]
        return table.handles[bisect.bisect_left(table.keys, slice_key(t.raw, *stored))]


def _where(path: str, what: str) -> int:
    """A byte to damage: inside b/kernel's values, before them in its block (a/bias's values),
    after them in its block (f/tail's values: the one-block file), or in the block's trailer."""
    with open(path, "rb") as f:
        data = f.read()
    values = big_tensors()
    kernel = values["b/kernel"][0].tobytes()
    if what == "values":
        return data.index(kernel) + len(kernel) // 2 + 1
    if what == "before":
        return data.index(values["a/bias"][0].tobytes()) + 2
    if what == "after":
        return data.index(values["f/tail"][0].tobytes()) + 5
    off, size = _block_of(path, "b/kernel")
    return off + size + 2                                                                # the masked crc32c


@pytest.mark.parametrize("how", ["mmap", "ranged"])
@pytest.mark.parametrize("what", ["values", "before", "after", "trailer"])
def test_a_flipped_byte_fails_at_the_end_of_the_stream(tmp_path: Any, what: str, how: str) -> None:
    path = str(tmp_path / "big.ckpt")
    values = write_big(path, block_size=1 << 30 if what == "after" else _table.BLOCK_SIZE)
    flip(path, _where(path, what))
    chunk = 64 << 10
    r, _ = open_reader(path, how)
    with r:
        stream = r.read_blocks("b/kernel", chunk)
        assert stream is not None
        seen = 0
        with pytest.raises(CorruptError, match="crc32c") as e:
            for _, block in stream:
                seen += block.nbytes
        assert seen == values["b/kernel"].nbytes                                        # every block came first
        assert "big.ckpt" in str(e.value) and "'b/kernel'" in str(e.value) and "data block at offset" in str(e.value)
        with pytest.raises(CorruptError, match="crc32c"):
            r.read("b/kernel")
    with open_reader(path, how, verify=False)[0] as r:
        got = streamed(r, "b/kernel", chunk)
        assert got is not None and same_bytes(got, r.read("b/kernel"))
        assert same_bytes(got, values["b/kernel"]) == (what != "values")


@pytest.mark.parametrize("how", ["mmap", "ranged"])
def test_a_big_first_block_is_checked_when_the_metadata_is_read(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """With the metadata in the big tensor's block, opening checks that block's crc32c a chunk at a time, not whole."""
    monkeypatch.setattr(v1, "CHUNK_BYTES", 256 << 10)
    path = str(tmp_path / "big.ckpt")
    values = write_big(path, meta_block=False)
    assert _block_of(path, "b/kernel")[0] == 0
    r, place = open_reader(path, how)
    with r:
        if place is not None:
            assert max(n for _, _, n in place.log) <= 256 << 10
        assert same_bytes(r.read("b/kernel"), values["b/kernel"])
    flip(path, _where(path, "values"))
    with pytest.raises(CorruptError, match="data block at offset 0 fails its crc32c"):
        open_reader(path, how)
    with open_reader(path, how, verify=False)[0] as r:
        assert not same_bytes(r.read("b/kernel"), values["b/kernel"])


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_export_of_a_damaged_block_leaves_nothing(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    path = str(tmp_path / "big.ckpt")
    write_big(path)
    flip(path, _where(path, "values"))
    monkeypatch.setattr(_pipe, "CHUNK_BYTES", 64 << 10)                                  # so b/kernel's 1 MiB block streams
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CorruptError, match="crc32c"):
        ckptbridge.export(path, str(out / f"model{suffix}"), ckptbridge.Naming(select=ckptbridge.Select(include=["^b/"])))
    assert os.listdir(out) == [] and leftovers(str(tmp_path)) == []


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_export_streams_big_tensors_exactly(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    path = str(tmp_path / "big.ckpt")
    values = write_big(path)
    calls: list[bool] = []
    real = V1Reader.read_blocks

    def spy(self: V1Reader, name: str, chunk_bytes: int) -> Any:
        stream = real(self, name, chunk_bytes)
        calls.append(stream is not None and stream.span is not None)
        return stream

    monkeypatch.setattr(V1Reader, "read_blocks", spy)
    monkeypatch.setattr(_pipe, "CHUNK_BYTES", 64 << 10)
    out = str(tmp_path / f"model{suffix}")
    ckptbridge.export(path, out)
    assert sum(calls) >= 3                                                               # b/kernel, c/table, d/complex from the file
    with ckptbridge.read(out) as back:
        for name, want in values.items():
            assert same_bytes(np.asarray(back[name]), want), name


def test_a_damaged_header_is_reported_as_the_crc_when_verified(tmp_path: Any) -> None:
    """A byte flipped in the entry's own headers: the crc32c is what fails (as read() says), or with
    verify=False, what the parse finds."""
    path = str(tmp_path / "big.ckpt")
    write_big(path)
    with open(path, "rb") as f:
        data = f.read()
    at = data.rindex(b"\x0a\x08b/kernel", 0, data.index(big_tensors()["b/kernel"][0].tobytes()))   # SavedSlice.name
    flip(path, at + 3)
    with V1Reader(path) as r:
        with pytest.raises(CorruptError, match="crc32c"):
            r.read_blocks("b/kernel", 1000)
    with V1Reader(path, verify=False) as r:
        with pytest.raises(CorruptError, match="names another tensor") as e:
            r.read_blocks("b/kernel", 1000)
        assert "big.ckpt" in str(e.value) and "'b/kernel'" in str(e.value)


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_lies_get_reads_errors_when_streamed(tmp_path: Any, case: str) -> None:
    metas, entries, needle = CRAFTED[case]
    path = str(tmp_path / "x.ckpt")
    craft_v1(path, metas, dict(entries))
    with pytest.raises(CorruptError, match=needle):
        with V1Reader(path) as r:
            for n in r.specs():
                stream = r.read_blocks(n, 1)
                if stream is None:
                    r.read(n)
                else:
                    stream.drain()


def test_snappy_blocks_take_the_whole_block_path(tmp_path: Any) -> None:
    path = str(tmp_path / "big.ckpt")
    values = write_big(path)
    with open(path, "rb") as f:
        blob = snappy_table(f.read(), block_size=_table.BLOCK_SIZE)
    with open(path, "wb") as f:
        f.write(blob)
    with V1Reader(path) as r:
        assert r.read_blocks("b/kernel", 64 << 10) is None
        assert same_bytes(r.read("b/kernel"), values["b/kernel"])


def test_random_flips_stream_the_truth_or_fail(tmp_path: Any) -> None:
    """Any one byte of a small-block file flipped: every stream gives the original values or a
    ckptbridge error (never another exception), verified or not."""
    with open(os.path.join(DATA, FIXTURES["dtypes"]), "rb") as f:
        entries = list(_table.read_table(f.read()))
    t = _table.TableBuilder(block_size=512)
    for key, value in entries:
        t.add(key, value)
    good = t.finish()
    path = str(tmp_path / "model.ckpt")
    with open(path, "wb") as f:
        f.write(good)
    with V1Reader(path) as r:
        want = {n: np.asarray(r.read(n)) for n in r.specs()}
    rng = np.random.default_rng(3)
    for at in rng.integers(0, len(good), 200).tolist():
        damaged = bytearray(good)
        damaged[at] ^= 1 << int(rng.integers(0, 8))
        with open(path, "wb") as f:
            f.write(damaged)
        for verify in (True, False):
            try:
                r = V1Reader(path, verify=verify)
            except CkptBridgeError:
                continue
            with r:
                for n in r.specs():
                    try:
                        got = streamed(r, n, 8)
                    except CkptBridgeError:
                        continue
                    if got is not None and verify and n in want:
                        assert same_bytes(got, want[n]), (at, n)


# --------------------------------------------------------------------------- with TensorFlow


@pytest.fixture(scope="module")
def tf_v1(module_tmp: Any) -> str:
    """A V1 file written by Saver(write_version=V1) with multi-MB tensors (each a block of its own)."""
    tf = pytest.importorskip("tensorflow")
    v1 = tf.compat.v1
    d = str(module_tmp("tf_v1_stream"))
    with tf.Graph().as_default():
        v1.set_random_seed(4)
        v1.get_variable("conv1/weights", [3, 3, 3, 64], dtype=tf.float32)
        v1.get_variable("conv1/biases", [64], dtype=tf.float32)
        v1.get_variable("fc6/weights", [1024, 1536], dtype=tf.float32)     # 6 MiB
        v1.get_variable("fc7/weights", [512, 640], dtype=tf.float64)       # 2.5 MiB
        v1.get_variable("fc8/biases", [1000], dtype=tf.float64)
        v1.train.get_or_create_global_step()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            return str(v1.train.Saver(write_version=v1.train.SaverDef.V1).save(sess, os.path.join(d, "vgg.ckpt"), write_meta_graph=False))


@pytest.mark.tf
@pytest.mark.parametrize("how", ["mmap", "ranged"])
def test_tf_written_big_tensors_stream_bit_exact(tf_v1: str, assert_same_as_tf: Any, how: str) -> None:
    r, place = open_reader(tf_v1, how)
    with r:
        got = {}
        for n in r.specs():
            arr = streamed(r, n, 256 << 10)
            if n in ("fc6/weights", "fc7/weights"):
                assert arr is not None, n                                           # streamed from the file, not read whole
            got[n] = arr if arr is not None else r.read(n)
        assert assert_same_as_tf(got, tf_v1) == 6
        if place is not None:
            before = len(place.log)
            streamed(r, "fc6/weights", 256 << 10)
            reads = [n for _, _, n in place.log[before:]]
            assert 6 << 20 <= sum(reads) < (6 << 20) + (1 << 20) and max(reads) <= 256 << 10


@pytest.mark.tf
@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_tf_written_v1_exports_through_the_stream(tf_v1: str, assert_same_as_tf: Any, tmp_path: Any,
                                                  monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    monkeypatch.setattr(_pipe, "CHUNK_BYTES", 1 << 20)
    out = str(tmp_path / f"vgg{suffix}")
    ckptbridge.export(tf_v1, out, read=ckptbridge.ReadOptions(engine="native"))
    with ckptbridge.read(out) as back:
        assert assert_same_as_tf(back, tf_v1) == 6
